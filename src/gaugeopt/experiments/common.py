"""Small helpers shared by the experiment modules."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

ARM_LABELS = {"adamw": "AdamW", "ddc-adam": "DDCAdam", "muon": "Muon", "ddc-muon": "DDCMuon",
              "symcompat": "symmetry-compatible"}


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the finite values, None when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None


def readable_cells_along_run(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                             total_steps: int, checkpoints: int) -> Any:
    """Placeholder until the DDS trajectory recorder is wired: returns None (no cell readout)."""
    return None
