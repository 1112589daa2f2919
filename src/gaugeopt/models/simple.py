"""Small fully connected reference models: ReLU MLP, deep linear chain, reduced-rank regression."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import MLP


@dataclass(frozen=True)
class ReLUMLPConfig:
    sizes: tuple[int, ...] = (8, 32, 32, 4)  # input, hidden..., output
    bias: bool = True


class ReLUMLP(nn.Module):
    """x -> W_L relu(... relu(W_1 x + b_1) ...) + b_L."""

    def __init__(self, config: ReLUMLPConfig):
        super().__init__()
        if len(config.sizes) < 2:
            raise ValueError("ReLUMLPConfig.sizes needs at least an input and an output size")
        self.config = config
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=config.bias) for a, b in zip(config.sizes[:-1], config.sizes[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


@dataclass(frozen=True)
class SwiGLUMLPConfig:
    d_in: int = 8
    width: int = 16
    d_ff: int = 32
    depth: int = 3
    d_out: int = 4
    bias: bool = False


class SwiGLUMLP(nn.Module):
    """A stack of SwiGLU blocks without residual connections or norms:
    ``x -> out(B_depth(... B_1(inp(x))))`` with ``B(h) = down(silu(gate h) * up h)``.

    Its neuron scalings form one chain: the units of every ``up`` (rows of ``up``, columns of
    ``down``) and the outputs of ``inp`` and of every ``down`` (rows, into the next block's ``gate``
    and ``up`` columns, or ``out``'s) are all positive rescalings, each acting on both axes of the
    matrices between them (the composed gauges of docs/ddc.md).
    """

    def __init__(self, config: SwiGLUMLPConfig):
        super().__init__()
        if config.depth < 1:
            raise ValueError("SwiGLUMLPConfig.depth must be at least 1")
        self.config = config
        self.inp = nn.Linear(config.d_in, config.width, bias=config.bias)
        self.blocks = nn.ModuleList(MLP(config.width, config.d_ff, "swiglu", bias=config.bias)
                                    for _ in range(config.depth))
        self.out = nn.Linear(config.width, config.d_out, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


@dataclass(frozen=True)
class DeepLinearConfig:
    width: int = 6
    depth: int = 4
    init_scale: float | None = None  # std of the weights; None gives 1/sqrt(width)


class DeepLinear(nn.Module):
    """f(x) = W_L ... W_1 x with square (width x width) factors and no biases."""

    def __init__(self, config: DeepLinearConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(nn.Linear(config.width, config.width, bias=False) for _ in range(config.depth))
        std = config.init_scale if config.init_scale is not None else config.width**-0.5
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@dataclass(frozen=True)
class ReducedRankRegressionConfig:
    inputs: int = 10  # M
    outputs: int = 5  # N
    width: int = 3  # H
    init_scale: float = 0.1


class ReducedRankRegression(nn.Module):
    """y = B A x with A (H x M) and B (N x H): the rank-H regression model of Aoyagi and Watanabe."""

    def __init__(self, config: ReducedRankRegressionConfig):
        super().__init__()
        self.config = config
        self.A = nn.Linear(config.inputs, config.width, bias=False)
        self.B = nn.Linear(config.width, config.outputs, bias=False)
        nn.init.normal_(self.A.weight, std=config.init_scale)
        nn.init.normal_(self.B.weight, std=config.init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))
