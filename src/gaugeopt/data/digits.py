"""scikit-learn's bundled handwritten digits (1797 images, 8x8, 17 grey levels) as tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import import_data_module

SKLEARN_DATASETS = "sklearn.datasets"
SKLEARN_INSTALL = "pip install scikit-learn"


@dataclass(frozen=True)
class ImageSplit:
    """Images (n, channels, height, width) in [0, 1] and integer labels, train and validation."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int


def load_digits_split(val_fraction: float = 0.3, seed: int = 0) -> ImageSplit:
    """A seeded random split of ``sklearn.datasets.load_digits``; pixels are divided by 16."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    datasets = import_data_module(SKLEARN_DATASETS, "digits", SKLEARN_INSTALL)
    bunch = datasets.load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(labels) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return ImageSplit(images[train], labels[train], images[val], labels[val], num_classes=10)
