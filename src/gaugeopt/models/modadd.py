"""Modular-arithmetic transformer for grokking: read ``a b =`` and predict ``(a + b) mod p``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import MLPKind, NormKind, RopeKind
from .lm import TransformerLM, TransformerLMConfig


@dataclass(frozen=True)
class ModularAdditionConfig:
    modulus: int = 97
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int = 512
    rope: RopeKind = "full"
    norm: NormKind = "rmsnorm"
    mlp: MLPKind = "swiglu"
    init_std: float = 0.02

    def lm_config(self) -> TransformerLMConfig:
        return TransformerLMConfig(
            vocab_size=self.modulus + 1, d_model=self.d_model, n_layers=self.n_layers,
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, d_ff=self.d_ff, max_seq_len=3,
            rope=self.rope, norm=self.norm, mlp=self.mlp, init_std=self.init_std,
        )


class ModularAdditionTransformer(nn.Module):
    """inputs (batch, 2) of residues -> logits (batch, p) read at the ``=`` position.

    The sequence is ``[a, b, p]`` (token ``p`` is ``=``); the decoder's logits over the residues are
    the first ``p`` entries of its vocabulary at the last position, taken through a head of exactly
    ``p`` outputs so the logit-shift gauge acts on the classes that are predicted.
    """

    def __init__(self, config: ModularAdditionConfig):
        super().__init__()
        self.config = config
        lm_config = config.lm_config()
        self.decoder = TransformerLM(lm_config)
        # The answer head predicts residues only: replace the decoder's vocab-sized head.
        self.decoder.head = nn.Linear(config.d_model, config.modulus, bias=False)
        nn.init.normal_(self.decoder.head.weight, std=config.init_std)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        equals = torch.full_like(inputs[:, :1], self.config.modulus)
        tokens = torch.cat((inputs, equals), dim=1)
        return self.decoder(tokens)[:, -1]


def modular_addition_data(modulus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair (a, b) in Z_p x Z_p with its label (a + b) mod p, in lexicographic order."""
    a, b = torch.meshgrid(torch.arange(modulus), torch.arange(modulus), indexing="ij")
    inputs = torch.stack((a.flatten(), b.flatten()), dim=1)
    return inputs, (inputs[:, 0] + inputs[:, 1]) % modulus
