"""Generated modular-addition data: every pair (a, b) mod p, split at random into train and val."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import modular_addition_data


@dataclass(frozen=True)
class PairSplit:
    """Inputs (n, 2) of residues and labels (a + b) mod p, train and validation."""

    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    val_inputs: torch.Tensor
    val_labels: torch.Tensor
    modulus: int


def modular_addition_split(modulus: int = 97, train_fraction: float = 0.4, seed: int = 0) -> PairSplit:
    """All p^2 pairs, a seeded ``train_fraction`` of them for training and the rest for validation."""
    if modulus < 2:
        raise ValueError(f"modulus must be at least 2, got {modulus}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    inputs, labels = modular_addition_data(modulus)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_train = max(1, int(round(len(labels) * train_fraction)))
    train, val = order[:n_train], order[n_train:]
    return PairSplit(inputs[train], labels[train], inputs[val], labels[val], modulus)
