"""Small helpers shared by the experiment modules."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

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
    """Records DDS readings at ``checkpoints`` evenly spaced steps from ``start_step`` to the end of
    a run and reads its cells with the readout rule of :mod:`gaugeopt.dds.slopes`.

    ``t`` at a recording is the remaining arc length to the last recording along chords between
    recordings, each measured in the quotient metric (the Euclidean norm of its horizontal part,
    :class:`gaugeopt.dds.HorizontalProjection` at the later end of the chord) when ``gauges`` are
    given, the same for every arm. Probe-artefact cells (:func:`lm_probe_artefacts`) are excluded.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, sites: Sequence[str],
                 total_steps: int, checkpoints: int, start_step: int = 0, gauges: Any = None):
        from ..dds import HorizontalProjection, TrajectoryRecorder

        if not 0 <= start_step < total_steps:
            raise ValueError(f"start_step must lie in [0, {total_steps}), got {start_step}")
        projection = HorizontalProjection(gauges, model) if gauges is not None else None
        self.metric = "quotient (horizontal part, Euclidean)" if gauges is not None else "Euclidean"
        self.recorder = TrajectoryRecorder(model, inputs, targets, loss=per_token_cross_entropy, sites=sites,
                                           project_horizontal=projection)
        self.exclude = lm_probe_artefacts(sites)
        span = total_steps - start_step
        self.record_at = {start_step + round(i * span / (checkpoints - 1)) for i in range(checkpoints)}
        if start_step == 0:
            self.recorder.record(0)

    def after_step(self, step: int) -> None:
        if step in self.record_at:
            self.recorder.record(step)

    def readout(self) -> dict[str, Any]:
        readout = self.recorder.readout(exclude=self.exclude)
        series: dict[str, dict[str, list[float]]] = {}
        for reading in self.recorder.readings:
            for row in reading.rows:
                for name in ("logdet_G", "lambda_min_G"):
                    series.setdefault(row.site, {}).setdefault(name, []).append(getattr(row, name))
        return {**readout.as_dict(), "readable": readout.readable_cells, "measurable": readout.measurable_cells,
                "total": readout.total_cells, "steps": self.recorder.steps, "metric": self.metric,
                "series": series}


def readable_cells_along_run(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                             total_steps: int, checkpoints: int, start_fraction: float = 0.0,
                             gauges: Any = None) -> DDSCellTracker | None:
    """A :class:`DDSCellTracker` on the decoder sites from ``start_fraction`` of the run, or None
    when ``checkpoints`` is 0."""
    if checkpoints <= 0:
        return None
    if checkpoints < 2:
        raise ValueError(f"a DDS readout needs at least 2 checkpoints, got {checkpoints}")
    if not 0.0 <= start_fraction < 1.0:
        raise ValueError(f"start_fraction must lie in [0, 1), got {start_fraction}")
    return DDSCellTracker(model, inputs, targets, lm_dds_sites(model), total_steps, checkpoints,
                          start_step=int(start_fraction * total_steps), gauges=gauges)
