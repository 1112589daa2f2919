"""Small helpers shared by the experiment modules."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ARM_LABELS = {"adamw": "AdamW", "ddc-adam": "DDCAdam", "muon": "Muon", "ddc-muon": "DDCMuon",
              "symcompat": "symmetry-compatible"}


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the finite values, None when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian negative log-likelihood ``||y - f(x)||^2 / 2`` (unit noise variance)."""
    return 0.5 * (outputs - targets).pow(2).sum(dim=-1)


def per_token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every token, shape of ``targets`` (tokens count as samples for DDS)."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)


def lm_dds_sites(model: nn.Module) -> list[str]:
    """The monitored DDS sites of a decoder: per block q, k, v, o, FFN up and down, then the head.

    A two-block model has 13 sites, times the 5 slope observables = 65 cells (the paper's count).
    """
    sites = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and last in ("q_proj", "k_proj", "v_proj", "o_proj", "up", "down"):
            sites.append(name)
    return [*sites, "head"]


class DDSCellTracker:
    """Records DDS readings at ``checkpoints`` evenly spaced steps from ``start_step`` to the end of
    a run and reads its cells.

    The arc length follows the actual path (measured after every step from the first recording,
    Euclidean metric on the flattened parameters, the same for every arm) and ``t`` at a recording
    is the length still to travel to the last recording (dds.md §3).
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, sites: Sequence[str],
                 total_steps: int, checkpoints: int, start_step: int = 0):
        from ..dds import TrajectoryRecorder

        if not 0 <= start_step < total_steps:
            raise ValueError(f"start_step must lie in [0, {total_steps}), got {start_step}")
        self.recorder = TrajectoryRecorder(model, inputs, targets, loss=per_token_cross_entropy, sites=sites)
        span = total_steps - start_step
        self.record_at = {start_step + round(i * span / (checkpoints - 1)) for i in range(checkpoints)}
        if start_step == 0:
            self.recorder.record(0)

    def after_step(self, step: int) -> None:
        if self.recorder.steps:  # the path is measured from the first recording on
            self.recorder.update_path()
        if step in self.record_at:
            self.recorder.record(step)

    def readout(self) -> dict[str, Any]:
        readout = self.recorder.readout()
        series: dict[str, dict[str, list[float]]] = {}
        for reading in self.recorder.readings:
            for row in reading.rows:
                for name in ("logdet_G", "lambda_min_G"):
                    series.setdefault(row.site, {}).setdefault(name, []).append(getattr(row, name))
        return {"readable": readout.readable_cells, "total": readout.total_cells, "steps": self.recorder.steps,
                "t": list(readout.t), "cells": [c.as_dict() for c in readout.cells], "series": series}


def readable_cells_along_run(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                             total_steps: int, checkpoints: int, start_fraction: float = 0.0
                             ) -> DDSCellTracker | None:
    """A :class:`DDSCellTracker` on the decoder sites from ``start_fraction`` of the run, or None
    when ``checkpoints`` is 0."""
    if checkpoints <= 0:
        return None
    if checkpoints < 2:
        raise ValueError(f"a DDS readout needs at least 2 checkpoints, got {checkpoints}")
    if not 0.0 <= start_fraction < 1.0:
        raise ValueError(f"start_fraction must lie in [0, 1), got {start_fraction}")
    return DDSCellTracker(model, inputs, targets, lm_dds_sites(model), total_steps, checkpoints,
                          start_step=int(start_fraction * total_steps))
