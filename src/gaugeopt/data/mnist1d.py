"""MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package: ten 1-D digit templates
of length 12, padded, scaled, translated, sheared and noised into signals of length 40.

Only the package's generator is used (``mnist1d.data.make_dataset``); its pickled copy would be
downloaded from GitHub and is never fetched. Signals are returned as single-row images
``(n, 1, 1, 40)`` so image models take them with a ``(1, p)`` patch.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .digits import ImageSplit
from .errors import import_data_module

MNIST1D_GENERATOR = "mnist1d.data"
MNIST1D_INSTALL = "pip install mnist1d"


def load_mnist1d_split(num_samples: int = 5000, val_fraction: float = 0.2, seed: int = 0) -> ImageSplit:
    """``num_samples`` generated signals (balanced over the ten classes, shuffled), standardised to
    zero mean and unit variance by the generator, split into train and validation.

    The generator seeds Python's and NumPy's global random states; they are restored afterwards, so
    calling this does not disturb other code's randomness.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if num_samples < 20:
        raise ValueError(f"num_samples must be at least 20 (two per class), got {num_samples}")
    generator = import_data_module(MNIST1D_GENERATOR, "MNIST-1D", MNIST1D_INSTALL)
    args = generator.get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, 1.0 - val_fraction, seed
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = generator.make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)

    def signals(x: np.ndarray) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float32).reshape(len(x), 1, 1, -1)

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.tensor(y, dtype=torch.long)

    return ImageSplit(signals(data["x"]), labels(data["y"]), signals(data["x_test"]), labels(data["y_test"]),
                      num_classes=10)
