"""Reference architectures, each built from a frozen config dataclass with random weights."""

from .blocks import MLP, Attention, Block, RotaryEmbedding, make_norm
from .cnn import BasicBlock, PlainCNN, PlainCNNConfig, ResNet18, ResNet18Config
from .lm import TransformerLM, TransformerLMConfig
from .modadd import ModularAdditionConfig, ModularAdditionTransformer, modular_addition_data
from .moe import MoEConfig, MoELayer, MoELM
from .simple import (
    DeepLinear,
    DeepLinearConfig,
    ReducedRankRegression,
    ReducedRankRegressionConfig,
    ReLUMLP,
    ReLUMLPConfig,
    SwiGLUMLP,
    SwiGLUMLPConfig,
)
from .vit import ViT, ViTConfig

__all__ = [
    "MLP", "Attention", "Block", "RotaryEmbedding", "make_norm",
    "TransformerLM", "TransformerLMConfig",
    "PlainCNN", "PlainCNNConfig", "ResNet18", "ResNet18Config", "BasicBlock",
    "ModularAdditionConfig", "ModularAdditionTransformer", "modular_addition_data",
    "MoEConfig", "MoELayer", "MoELM",
    "DeepLinear", "DeepLinearConfig", "ReducedRankRegression", "ReducedRankRegressionConfig",
    "ReLUMLP", "ReLUMLPConfig", "SwiGLUMLP", "SwiGLUMLPConfig",
    "ViT", "ViTConfig",
]
