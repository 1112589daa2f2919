"""Shared by the optimizer test modules: a tiny language model with every scaling gauge, its
gradients, and exact comparisons of parameters and optimizer state."""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gaugeopt

VOCAB, WIDTH, HIDDEN = 7, 6, 8


class TinyLM(nn.Module):
    """Embedding, LayerNorm (norm scale with a bias), a ReLU block (neuron scaling), RMSNorm and an
    output Linear (norm scale and logit shift on one matrix)."""

    def __init__(self, width: int = WIDTH, hidden: int = HIDDEN, norm: str = "layernorm", bias: bool = True):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.norm1 = {"layernorm": lambda: nn.LayerNorm(width, bias=bias), "rmsnorm": lambda: nn.RMSNorm(width),
                      "none": nn.Identity}[norm]()
        self.up = nn.Linear(width, hidden, bias=bias)
        self.down = nn.Linear(hidden, width, bias=bias)
        self.norm2 = nn.RMSNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.down(torch.relu(self.up(self.norm1(x))))
        return self.head(self.norm2(x))


@functools.cache
def _reference(width: int, hidden: int, norm: str, bias: bool):
    """One discovered GaugeSet per architecture (discovery runs once; copies are bound to it)."""
    model = TinyLM(width, hidden, norm, bias).double()
    return model, gaugeopt.find_gauges(model, torch.randint(0, VOCAB, (2, 5)), output="logits")


def tiny(seed: int = 0, *, width: int = WIDTH, hidden: int = HIDDEN, norm: str = "layernorm", bias: bool = True,
         dtype: torch.dtype = torch.float64):
    """A fresh TinyLM (weights from ``seed``) and its GaugeSet."""
    reference, gauges = _reference(width, hidden, norm, bias)
    model = copy.deepcopy(reference)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 and p.shape[0] == width else 0.0))
    model = model.to(dtype)
    return model, gauges.bind(model)


def loss(model: nn.Module, seed: int) -> torch.Tensor:
    """A cross-entropy loss on a fixed random batch."""
    tokens = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(seed))
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).double(), tokens[:, 1:].flatten())


def backward(model: nn.Module, seed: int) -> None:
    """Gradients of :func:`loss`."""
    loss(model, seed).backward()


def train(model: nn.Module, opt, steps) -> None:
    for t in steps:
        opt.zero_grad()
        backward(model, t)
        opt.step()


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested state (tensors bit for bit, NaN-free by construction)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def snapshot(model: nn.Module, opt) -> tuple[dict, Any]:
    """The model's parameters and the optimizer's state dict, copied."""
    return ({n: p.detach().clone() for n, p in model.named_parameters()}, copy.deepcopy(opt.state_dict()))


def assert_untouched(before: tuple[dict, Any], model: nn.Module, opt) -> None:
    params, state = before
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params[name]), f"{name} changed"
    assert same(opt.state_dict(), state), "optimizer state changed"
