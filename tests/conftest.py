"""Test-suite settings: small float64 models run fastest single-threaded."""

import torch

torch.set_num_threads(1)
