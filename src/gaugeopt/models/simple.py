"""Small fully connected reference models: ReLU MLP, deep linear chain, reduced-rank regression."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
