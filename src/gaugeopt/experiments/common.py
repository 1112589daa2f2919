"""Small helpers shared by the experiment modules."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ARM_LABELS = {"adamw": "AdamW", "adamw-gains-undecayed": "AdamW, gains undecayed", "ddc-adam": "DDCAdam", "muon": "Muon", "ddc-muon": "DDCMuon",
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


@dataclass
class RecordedTrajectory:
    """A training run with DDS readings at increasing steps, and what the clocks need.

    ``t`` is the true distance to the singular set at each recording where the trajectory has a
    known answer (NaN where nothing is planted); ``arc_length`` the remaining (quotient) arc length
    to the last recording, measured along chords between recordings.
    """

    steps: list[int]
    t: np.ndarray
    readings: list[Any]
    train_loss: list[float]
    arc_length: np.ndarray
    wall_time_s: float

    def clock(self, name: str) -> np.ndarray:
        """t at each recording on a named clock: ``"true-t"`` or one of :data:`gaugeopt.dds.CLOCKS`."""
        from ..dds import CLOCKS, inverse_step_clock

        if name == "true-t":
            return self.t
        if name == "arc-length":
            return self.arc_length
        if name == "inverse-step":
            return inverse_step_clock(self.steps)
        raise ValueError(f"unknown clock {name!r}; choose from {['true-t', *CLOCKS]}")


def record_trajectory(model: nn.Module, probe: tuple[torch.Tensor, torch.Tensor], *, loss: Any, sites: Sequence[str],
                      steps: int, record_at: Sequence[int], train_step: Any, true_t: Any,
                      gauge_example: torch.Tensor | None = None) -> RecordedTrajectory:
    """Run ``train_step(step) -> loss`` for steps 1..``steps`` and record DDS on ``probe`` at ``record_at``.

    At each recording ``true_t()`` gives the known distance (or NaN) and the chord since the last
    recording is measured in the quotient metric of the gauges :func:`gaugeopt.find_gauges` finds on
    ``gauge_example`` (the Euclidean metric without one): the arc-length clock exactly as a training
    run of ``overtrain-lm`` measures it.
    """
    import time

    from ..dds import HorizontalProjection, TrajectoryRecorder
    from ..gauges import find_gauges

    projection = None
    if gauge_example is not None:
        projection = HorizontalProjection(find_gauges(model, gauge_example), model)
    recorder = TrajectoryRecorder(model, probe[0], probe[1], loss=loss, sites=sites, project_horizontal=projection)
    wanted, t_values, losses = set(record_at), [], []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        value = train_step(step)
        if step in wanted:
            t_values.append(true_t())
            recorder.record(step)
            losses.append(float(value))
    return RecordedTrajectory(recorder.steps, np.asarray(t_values, dtype=np.float64), recorder.readings, losses,
                              recorder.remaining_arc_length(), time.perf_counter() - start)


def score_against_planted(readout: Any, planted: dict[str, float]) -> dict[str, Any]:
    """A rate readout (:class:`gaugeopt.dds.RateReadout`) scored against what a known-answer
    trajectory planted: ``planted`` maps ``"site:observable"`` to its planted slope; every other cell
    is a control.

    Returns every cell's verdict with its planted slope (None for a control), how many planted cells
    read, how many controls read, per planted cell that read its slope over the planted one, and the
    *proportionality* of those: the largest relative deviation of slope / planted from their median
    (0 when every read rate is the planted rate in one common unit, as a clock free of distance gives).
    """
    cells = [{**cell.as_dict(), "planted_slope": planted.get(f"{cell.site}:{cell.observable}")}
             for cell in readout.cells]
    planted_read = [c for c in cells if c["planted_slope"] is not None and c["reads"]]
    controls = [c for c in cells if c["planted_slope"] is None]
    ratios = {f"{c['site']}:{c['observable']}": c["fit"]["slope"] / c["planted_slope"] for c in planted_read}
    middle = float(np.median(list(ratios.values()))) if ratios else None
    return {
        "summary": readout.summary(), "cells": cells,
        "planted": len(planted), "planted_read": len(planted_read),
        "controls": len(controls), "controls_read": sum(c["reads"] for c in controls),
        "slope_over_planted": ratios,
        "proportionality": max(abs(v / middle - 1) for v in ratios.values()) if middle else None,
    }


def lm_dds_sites(model: nn.Module) -> list[str]:
    """The monitored DDS sites of a decoder: per block q, k, v, o, FFN up and down, then the head.

    A two-block model has 13 sites; the paper counts 5 observables a site (65 cells), of which
    sigma2_min_X duplicates lambda_min_A (it is N lambda_min_A): 52 distinct cells, 46 after the
    probe artefacts of :func:`lm_probe_artefacts`.
    """
    sites = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and last in ("q_proj", "k_proj", "v_proj", "o_proj", "up", "down"):
            sites.append(name)
    return [*sites, "head"]


def lm_probe_artefacts(sites: Sequence[str]) -> dict[str, str]:
    """Cells of :func:`lm_dds_sites` whose activation side reads the probe rather than the model.

    Block 0's q, k and v project the normed embedding of each token, a function of the token alone:
    their activations have as many distinct rows as the probe has distinct characters, so rank(A)
    and the A-side spectrum count characters in the probe windows.
    """
    artefacts = {}
    for site in sites:
        module = site.split(":")[0]
        if module.endswith(("q_proj", "k_proj", "v_proj")) and ".0." in f".{module}":
            for name in ("lambda_min_A", "logdet_A"):
                artefacts[f"{site if ':' in site else site + ':output'}:{name}"] = (
                    "probe artefact: block 0's q/k/v read a per-token function of the embedding, so "
                    "rank(A) counts the distinct characters in the probe")
    return artefacts


class DDSCellTracker:
    """Records DDS readings at ``checkpoints`` log-spaced steps from ``first_step`` to the end of a run
    and reads its cells with the readout rule of :mod:`gaugeopt.dds.slopes` against ``clock``.

    The remaining arc length at a recording is measured along chords between recordings, each in the
    quotient metric (the Euclidean norm of its horizontal part, :class:`gaugeopt.dds.HorizontalProjection`
    at the later end of the chord) when ``gauges`` are given, the same for every arm. Probe-artefact
    cells (:func:`lm_probe_artefacts`) are excluded. Every site's observables at every recording
    (``series``), the steps and the arc lengths are kept, so the run can be read again on another clock.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, sites: Sequence[str],
                 total_steps: int, checkpoints: int, first_step: int = 10, gauges: Any = None,
                 clock: str = "arc-length"):
        from ..dds import CLOCKS, HorizontalProjection, TrajectoryRecorder, log_spaced_steps

        if clock not in CLOCKS:
            raise ValueError(f"unknown clock {clock!r}; choose from {list(CLOCKS)}")
        projection = HorizontalProjection(gauges, model) if gauges is not None else None
        self.metric = "quotient (horizontal part, Euclidean)" if gauges is not None else "Euclidean"
        self.clock = clock
        self.recorder = TrajectoryRecorder(model, inputs, targets, loss=per_token_cross_entropy, sites=sites,
                                           project_horizontal=projection)
        self.exclude = lm_probe_artefacts(sites)
        self.record_at = set(log_spaced_steps(first_step, total_steps, checkpoints))

    def after_step(self, step: int) -> None:
        if step in self.record_at:
            self.recorder.record(step)

    def readout(self) -> dict[str, Any]:
        from ..dds import SLOPE_OBSERVABLES, VALIDATED_CLOCKS

        readout = self.recorder.readout(clock=self.clock, exclude=self.exclude)
        series: dict[str, dict[str, list[float]]] = {}
        for reading in self.recorder.readings:
            for row in reading.rows:
                for name in (*SLOPE_OBSERVABLES, "rank_G", "rank_A"):
                    series.setdefault(row.site, {}).setdefault(name, []).append(getattr(row, name))
        return {**readout.as_dict(), "readable": readout.readable_cells, "measurable": readout.measurable_cells,
                "total": readout.total_cells, "steps": self.recorder.steps, "metric": self.metric,
                "clock": self.clock, "clock_validated": self.clock in VALIDATED_CLOCKS,
                "arc_length": self.recorder.remaining_arc_length().tolist(), "series": series}


def readable_cells_along_run(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                             total_steps: int, checkpoints: int, first_step: int = 10,
                             gauges: Any = None, clock: str = "arc-length") -> DDSCellTracker | None:
    """A :class:`DDSCellTracker` on the decoder sites, or None when ``checkpoints`` is 0."""
    if checkpoints <= 0:
        return None
    if checkpoints < 2:
        raise ValueError(f"a DDS readout needs at least 2 checkpoints, got {checkpoints}")
    if not 1 <= first_step < total_steps:
        raise ValueError(f"first_step must lie in [1, {total_steps}), got {first_step}")
    return DDSCellTracker(model, inputs, targets, lm_dds_sites(model), total_steps, checkpoints,
                          first_step=first_step, gauges=gauges, clock=clock)
