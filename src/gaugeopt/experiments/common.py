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
    """Records DDS readings at ``checkpoints`` evenly spaced steps of a run and reads its cells.

    The arc length follows the actual path (measured after every step, Euclidean metric on the
    flattened parameters, the same for every arm) and ``t`` at a recording is the length still to
    travel to the last recording (dds.md §3).
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, sites: Sequence[str],
                 total_steps: int, checkpoints: int):
        from ..dds import TrajectoryRecorder

        self.recorder = TrajectoryRecorder(model, inputs, targets, loss=per_token_cross_entropy, sites=sites)
        self.record_at = {round(i * total_steps / (checkpoints - 1)) for i in range(1, checkpoints)}
        self.recorder.record(0)

    def after_step(self, step: int) -> None:
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
                             total_steps: int, checkpoints: int) -> DDSCellTracker | None:
    """A :class:`DDSCellTracker` on the decoder sites, or None when ``checkpoints`` is 0."""
    if checkpoints <= 0:
        return None
    if checkpoints < 2:
        raise ValueError(f"a DDS readout needs at least 2 checkpoints, got {checkpoints}")
    return DDSCellTracker(model, inputs, targets, lm_dds_sites(model), total_steps, checkpoints)
