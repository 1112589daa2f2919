"""Mixture-of-experts language model: softmax top-k router over SwiGLU experts.

Each expert is an ordinary SwiGLU :class:`MLP`; a token's output is the sum over its top-k experts
of ``weight_e * expert_e(x)`` where the weights are the router's softmax probabilities renormalised
over the selected experts. The router's logits enter only through that softmax, so a shared shift
of the router rows is a gauge. The Switch-style load-balancing loss ``E * sum_e f_e P_e`` is
returned when ``return_aux=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import MLP, Attention, NormKind, RopeKind, init_weights, make_norm


@dataclass(frozen=True)
class MoEConfig:
    vocab_size: int = 65
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 64  # per expert
    max_seq_len: int = 128
    rope: RopeKind = "full"
    norm: NormKind = "rmsnorm"
    router_bias: bool = False
    head_bias: bool = False
    aux_loss_weight: float = 0.01
    init_std: float = 0.02


class MoELayer(nn.Module):
    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, *, router_bias: bool = False):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be in [1, n_experts={n_experts}]")
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(d_model, n_experts, bias=router_bias)
        self.experts = nn.ModuleList(MLP(d_model, d_ff, "swiglu") for _ in range(n_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (tokens, d) -> (probs (tokens, E), top-k indices, renormalised top-k weights)."""
        probs = F.softmax(self.router(x), dim=-1)
        weights, indices = probs.topk(self.top_k, dim=-1)
        return probs, indices, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (batch, seq, d) -> (output (batch, seq, d), load-balancing loss)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, indices, weights = self.route(flat)
        # Dense combination weights (tokens, E): zero outside each token's top-k.
        combine = torch.zeros_like(probs).scatter(1, indices, weights)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + combine[:, e : e + 1] * expert(flat)
        assigned = torch.zeros_like(probs).scatter(1, indices, torch.ones_like(weights))
        load = assigned.mean(dim=0) / self.top_k  # f_e: share of the top-k assignments
        balance = self.n_experts * (load * probs.mean(dim=0)).sum()
        return out.reshape(shape), balance


class MoEBlock(nn.Module):
    def __init__(self, c: MoEConfig):
        super().__init__()
        self.norm1 = make_norm(c.norm, c.d_model)
        self.attn = Attention(c.d_model, c.n_heads, c.n_kv_heads, rope=c.rope)
        self.norm2 = make_norm(c.norm, c.d_model)
        self.moe = MoELayer(c.d_model, c.d_ff, c.n_experts, c.top_k, router_bias=c.router_bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.norm1(x))
        y, balance = self.moe(self.norm2(x))
        return x + y, balance


class MoELM(nn.Module):
    """tokens (batch, seq) -> logits (batch, seq, vocab), or (logits, aux loss) with ``return_aux``.

    Experts are evaluated densely (every expert on every token, weighted by the sparse combine
    matrix): simple and exact at the small sizes this package trains on a CPU.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.max_seq_len, c.d_model) if c.rope == "none" else None
        self.blocks = nn.ModuleList(MoEBlock(c) for _ in range(c.n_layers))
        self.norm = make_norm(c.norm, c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=c.head_bias)
        init_weights(self, c.init_std)

    def forward(self, tokens: torch.Tensor, return_aux: bool = False):
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(tokens.shape[1], device=tokens.device))
        aux = x.new_zeros(())
        for block in self.blocks:
            x, balance = block(x)
            aux = aux + balance
        logits = self.head(self.norm(x))
        if return_aux:
            return logits, self.config.aux_loss_weight * aux / len(self.blocks)
        return logits
