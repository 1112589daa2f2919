"""Transformer building blocks written with plain ``torch.nn`` layers and standard ops.

Everything here is deliberately ordinary (``nn.Linear``, ``nn.Embedding``, ``nn.RMSNorm``,
``nn.LayerNorm``, ``F.scaled_dot_product_attention``) so that :func:`gaugeopt.find_gauges` has to
discover the symmetries by following the computation, exactly as it would on a user's model.

Conventions: a Linear weight has shape (out, in); attention heads are contiguous row blocks of the
query/key/value projections; RoPE uses the rotate-half (GPT-NeoX) pairing, dimension ``i`` with
``i + rotary_dim / 2`` for ``i < rotary_dim / 2``, on the first ``rotary_dim`` dimensions of a head.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

NormKind = Literal["rmsnorm", "layernorm"]
MLPKind = Literal["swiglu", "relu", "gelu", "silu"]
RopeKind = Literal["full", "partial", "none"]


def make_norm(kind: NormKind, dim: int, *, bias: bool = True, eps: float = 1e-6) -> nn.Module:
    """An affine RMSNorm or LayerNorm (LayerNorm optionally without its bias)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=True)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=True, bias=bias)
    raise ValueError(f"unknown norm {kind!r}; expected 'rmsnorm' or 'layernorm'")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last axis split in two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on the first ``rotary_dim`` dimensions of each head.

    Position t rotates the plane (i, i + rotary_dim/2) by angle t * base^(-2i / rotary_dim).
    Frequencies are kept as a float64 buffer and angles are computed in the activations' dtype at
    call time, so a float64 model gets float64 rotations.
    """

    def __init__(self, head_dim: int, rotary_dim: int, base: float = 10000.0):
        super().__init__()
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, {head_dim}], got {rotary_dim}")
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
        self.register_buffer("inv_freq", base**-exponents, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x of shape (batch, heads, seq, head_dim) by its positions along axis 2."""
        seq = x.shape[2]
        positions = torch.arange(seq, device=x.device, dtype=x.dtype)
        angles = torch.outer(positions, self.inv_freq.to(x.dtype))
        angles = torch.cat((angles, angles), dim=-1)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        rot = rot * angles.cos() + rotate_half(rot) * angles.sin()
        return torch.cat((rot, rest), dim=-1)


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads and optional (partial) RoPE."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        rope: RopeKind = "full",
        rope_fraction: float = 0.5,
        rope_base: float = 10000.0,
        bias: bool = False,
        causal: bool = True,
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.causal = causal
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        if rope == "none":
            self.rotary = None
        else:
            rotary_dim = self.head_dim if rope == "full" else 2 * max(1, int(self.head_dim * rope_fraction) // 2)
            self.rotary = RotaryEmbedding(self.head_dim, rotary_dim, rope_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        group = self.n_heads // self.n_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """Feed-forward block: SwiGLU ``down(silu(gate x) * up x)`` or ``down(act(up x))``."""

    def __init__(self, d_model: int, d_ff: int, kind: MLPKind = "swiglu", *, bias: bool = False):
        super().__init__()
        if kind not in ("swiglu", "relu", "gelu", "silu"):
            raise ValueError(f"unknown mlp kind {kind!r}")
        self.kind = kind
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.gate = nn.Linear(d_model, d_ff, bias=bias) if kind == "swiglu" else None
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[self.kind]
        return self.down(act(self.up(x)))


class Block(nn.Module):
    """Transformer block. Pre-norm: x + attn(norm(x)), then x + ffn(norm(x)).

    ``post_norm=True`` gives the original post-norm layout norm(x + f(x)), whose norm output feeds
    the residual stream (it carries no norm-scale gauge; used by the negative tests).
    """

    def __init__(self, d_model: int, attention: Attention, ffn: nn.Module, *, norm: NormKind = "rmsnorm",
                 norm_bias: bool = True, post_norm: bool = False):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = make_norm(norm, d_model, bias=norm_bias)
        self.attn = attention
        self.norm2 = make_norm(norm, d_model, bias=norm_bias)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.ffn(x))
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-style init: normal(0, std) for Linear/Embedding weights, zero biases, unit gains."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)


def scaled_init_std(d_model: int) -> float:
    return 1.0 / math.sqrt(d_model)
