"""Decoder-only language model: embedding, pre-norm blocks, final norm, untied LM head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import MLP, Attention, Block, MLPKind, NormKind, RopeKind, init_weights, make_norm


@dataclass(frozen=True)
class TransformerLMConfig:
    vocab_size: int = 65
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as query heads; fewer gives grouped-query attention
    d_ff: int = 128
    max_seq_len: int = 128
    rope: RopeKind = "full"
    rope_fraction: float = 0.5  # share of each head's dims that rotate when rope="partial"
    rope_base: float = 10000.0
    norm: NormKind = "rmsnorm"
    norm_bias: bool = True  # LayerNorm bias (ignored by RMSNorm)
    mlp: MLPKind = "swiglu"
    mlp_bias: bool = False
    attn_bias: bool = False
    head_bias: bool = False
    post_norm: bool = False
    init_std: float = 0.02


class TransformerLM(nn.Module):
    """``logits = head(norm(blocks(embed(tokens) [+ pos])))``; a learned absolute position embedding
    is used only when ``rope="none"``."""

    def __init__(self, config: TransformerLMConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.max_seq_len, c.d_model) if c.rope == "none" else None
        self.blocks = nn.ModuleList(
            Block(
                c.d_model,
                Attention(c.d_model, c.n_heads, c.n_kv_heads, rope=c.rope, rope_fraction=c.rope_fraction,
                          rope_base=c.rope_base, bias=c.attn_bias),
                MLP(c.d_model, c.d_ff, c.mlp, bias=c.mlp_bias),
                norm=c.norm, norm_bias=c.norm_bias, post_norm=c.post_norm,
            )
            for _ in range(c.n_layers)
        )
        self.norm = make_norm(c.norm, c.d_model, bias=c.norm_bias)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=c.head_bias)
        init_weights(self, c.init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab)."""
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
