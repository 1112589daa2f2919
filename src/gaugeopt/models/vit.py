"""Vision transformer classifier: linear patch embedding, the LM's blocks (non-causal), mean pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import MLP, Attention, Block, MLPKind, NormKind, RopeKind, init_weights, make_norm


@dataclass(frozen=True)
class ViTConfig:
    image_size: int | tuple[int, int] = 8  # side of a square image, or (height, width)
    patch_size: int | tuple[int, int] = 2  # side of a square patch, or (height, width)
    channels: int = 1
    num_classes: int = 10
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int = 128
    rope: RopeKind = "none"  # patches carry a learned position embedding; RoPE over the raster order is optional
    rope_fraction: float = 0.5
    norm: NormKind = "layernorm"
    norm_bias: bool = True
    mlp: MLPKind = "swiglu"
    mlp_bias: bool = True
    attn_bias: bool = True
    head_bias: bool = True
    init_std: float = 0.02

    @property
    def image_shape(self) -> tuple[int, int]:
        return _pair(self.image_size)

    @property
    def patch_shape(self) -> tuple[int, int]:
        return _pair(self.patch_size)

    @property
    def num_patches(self) -> int:
        (h, w), (ph, pw) = self.image_shape, self.patch_shape
        return (h // ph) * (w // pw)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class ViT(nn.Module):
    """images (batch, channels, H, W) -> class logits (batch, classes); 1-D signals are (batch, channels, 1, L).

    Tokens are non-overlapping patches flattened channel-major; blocks are pre-norm and non-causal;
    the final norm is applied to the mean-pooled token.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = self.config = config
        (h, w), (ph, pw) = c.image_shape, c.patch_shape
        if h % ph or w % pw:
            raise ValueError(f"image_size={c.image_size} is not divisible by patch_size={c.patch_size}")
        self.patch_embed = nn.Linear(c.channels * ph * pw, c.d_model)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches, c.d_model))
        self.blocks = nn.ModuleList(
            Block(
                c.d_model,
                Attention(c.d_model, c.n_heads, c.n_kv_heads, rope=c.rope, rope_fraction=c.rope_fraction,
                          bias=c.attn_bias, causal=False),
                MLP(c.d_model, c.d_ff, c.mlp, bias=c.mlp_bias),
                norm=c.norm, norm_bias=c.norm_bias,
            )
            for _ in range(c.n_layers)
        )
        self.norm = make_norm(c.norm, c.d_model, bias=c.norm_bias)
        self.head = nn.Linear(c.d_model, c.num_classes, bias=c.head_bias)
        init_weights(self, c.init_std)
        nn.init.normal_(self.pos_embed, std=c.init_std)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = images.shape
        ph, pw = self.config.patch_shape
        x = images.reshape(b, ch, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // ph) * (w // pw), ch * ph * pw)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.patchify(images)) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(dim=1)))
