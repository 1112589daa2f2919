"""Slopes of observables against the distance to the singular set; the rate readout (dds.md §3).

Along an approach theta(t) -> singular set, a dead direction of KL order k makes an observable
decay as ``O ~ t^p``; the least-squares slope of ``log O`` against ``log t`` estimates ``p`` and
``k_hat = 1 + p / 2``. Observables that are already logarithms (``logdet+``) are fitted as ``O``
itself against ``log t``; their slope adds up the rates of all the eigenvalues that decay.

On a training trajectory the true ``t`` is unknown and a *clock* stands in for it (:data:`CLOCKS`):

* ``"arc-length"``: the *remaining quotient arc length*, the length of the path still to be
  travelled to the last checkpoint, measured in the optimizer's metric after removing the vertical
  (gauge-orbit) part of each step. A metric is any callable ``metric(delta) -> float`` on a
  flattened parameter change (default: the Euclidean norm); ``project_horizontal(delta) -> delta``
  removes the vertical components (default: identity, i.e. no gauge quotient).
* ``"inverse-step"``: ``t = s_last / s``, a clock free of any distance. Where the approach is a
  power law in training time, ``t_true ~ s^(-alpha)``, an observable ``t_true^p`` reads slope
  ``alpha p``: the rates come out in a common unknown unit, and their ratios (the count
  ``logdet+ / lambda+_min``) are unchanged.

A clock is trusted for a training run only once it has read trajectories with a known answer
(:data:`VALIDATED_CLOCKS`); ``gaugeopt run readout-clock`` is that validation.

The readout rule, fixed before any run and validated on trajectories with a known answer
(``tests/test_dds_readout_known_answers.py``): a (site, observable) cell

1. is *measurable* when, over the smaller-t half of its window (the points below the median log t),
   the fitted observable falls by at least ``MIN_DECAY_DECADES`` = 0.5 decades. Otherwise it has
   levelled off: the endpoint is not singular along it, and no rate can be read;
2. *reads* when it is measurable and its full-window fit has R^2 >= 0.9 on at least 8 points, a
   positive slope, and slopes on the two halves of the window within 25 % of the full-window slope.

Along a trajectory each (site, side) follows the *same* k eigenvalues at every checkpoint, k the
largest positive rank (``rel_tol``) seen in the window: ``lambda_min`` is the k-th largest
eigenvalue and ``logdet`` the sum of the logs of the k largest. A rank that flickers across the
threshold (63/64) then no longer switches ``lambda_min`` between two different eigenvalues.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .capture import PerSampleLoss
from .observables import DEFAULT_REL_TOL, SLOPE_OBSERVABLES
from .reading import DDSReading, dead_direction_signatures

Metric = Callable[[torch.Tensor], float]
Projection = Callable[[torch.Tensor], torch.Tensor]

MIN_POINTS = 8
MIN_R2 = 0.9
MAX_HALF_DISAGREEMENT = 0.25
MIN_DECAY_DECADES = 0.5

CLOCKS = {
    "arc-length": "remaining arc length to the last checkpoint (quotient metric where gauges are given)",
    "inverse-step": "t = last step / step (no distance: rates in a common unknown unit)",
}
# Clocks whose readout has passed the known-answer validation (``gaugeopt run readout-clock``,
# docs/dds.md), with the run that passed it. A training run's cell counts are reported only on these.
VALIDATED_CLOCKS: dict[str, str] = {}


@dataclass(frozen=True)
class SlopeFit:
    """Least-squares fit ``y = intercept + slope * log t`` over ``points`` points in ``window``."""

    slope: float
    stderr: float
    r2: float
    intercept: float
    window: tuple[float, float]  # (smallest t, largest t) actually used
    points: int

    @property
    def k_hat(self) -> float:
        """Estimated KL order ``1 + slope / 2`` of the decaying direction."""
        return 1.0 + self.slope / 2.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "window": list(self.window), "k_hat": self.k_hat}


def _fit_points(t: np.ndarray, values: np.ndarray, kind: str,
                window: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """``(log t, y)`` for the finite points inside the window."""
    if kind not in ("log", "linear"):
        raise ValueError(f"kind must be 'log' or 'linear', got {kind!r}")
    t = np.asarray(t, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if t.shape != values.shape or t.ndim != 1:
        raise ValueError("t and values must be 1-D of equal length, got "
                         f"{t.shape} and {values.shape}")
    keep = t > 0
    if window is not None:
        low, high = window
        if not 0 < low < high:
            raise ValueError(f"window must be (t_low, t_high) with 0 < t_low < t_high, "
                             f"got {window}")
        keep &= (t >= low) & (t <= high)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(values) if kind == "log" else values
    keep &= np.isfinite(y)
    return np.log(t[keep]), y[keep]


def _least_squares(log_t: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """slope, stderr, R^2, intercept of y against log t (needs two distinct abscissae)."""
    n = log_t.size
    x_mean, y_mean = log_t.mean(), y.mean()
    sxx = float(((log_t - x_mean) ** 2).sum())
    if n < 2 or sxx == 0.0:
        raise ValueError(f"a slope needs at least two distinct values of t, got {n} point(s)")
    slope = float(((log_t - x_mean) * (y - y_mean)).sum()) / sxx
    intercept = float(y_mean - slope * x_mean)
    residual = float(((y - intercept - slope * log_t) ** 2).sum())
    total = float(((y - y_mean) ** 2).sum())
    r2 = 1.0 - residual / total if total > 0 else 1.0
    stderr = math.sqrt(residual / (n - 2) / sxx) if n > 2 else math.nan
    return slope, stderr, r2, intercept


def fit_slope(t: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray, *,
              kind: str = "log", window: tuple[float, float] | None = None) -> SlopeFit:
    """Fit ``log O`` (``kind="log"``) or ``O`` (``kind="linear"``) against ``log t``.

    Points with ``t <= 0``, outside ``window = (t_low, t_high)`` or with a non-finite ordinate
    (e.g. ``log`` of a non-positive value) are left out.
    """
    log_t, y = _fit_points(np.asarray(t), np.asarray(values), kind, window)
    slope, stderr, r2, intercept = _least_squares(log_t, y)
    return SlopeFit(slope=slope, stderr=stderr, r2=r2, intercept=intercept,
                    window=(float(np.exp(log_t.min())), float(np.exp(log_t.max()))),
                    points=int(log_t.size))


@dataclass(frozen=True)
class CellReading:
    """The verdict of one (site, observable) cell: measurable, and if so whether it reads."""

    site: str
    observable: str
    fit: SlopeFit | None
    half_slopes: tuple[float, float] | None  # (small-t half, large-t half)
    reads: bool
    reason: str  # "reads" or why not
    measurable: bool = True
    decay_decades: float | None = None  # fitted fall over the smaller-t half, in decades
    rank: int | None = None  # eigenvalues followed along the window (window rank)

    def as_dict(self) -> dict[str, Any]:
        return {"site": self.site, "observable": self.observable,
                "fit": None if self.fit is None else self.fit.as_dict(),
                "half_slopes": None if self.half_slopes is None else list(self.half_slopes),
                "reads": self.reads, "measurable": self.measurable, "reason": self.reason,
                "decay_decades": self.decay_decades, "rank": self.rank}


def read_cell(t: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray, *,
              site: str = "", observable: str = "", kind: str = "log",
              window: tuple[float, float] | None = None, min_points: int = MIN_POINTS,
              min_r2: float = MIN_R2, max_half_disagreement: float = MAX_HALF_DISAGREEMENT,
              min_decay_decades: float = MIN_DECAY_DECADES, rank: int | None = None) -> CellReading:
    """Apply the readout rule (module docstring) to one series."""
    log_t, y = _fit_points(np.asarray(t), np.asarray(values), kind, window)

    def verdict(fit, halves, reason, measurable=True, decay=None):
        return CellReading(site, observable, fit, halves, reason == "reads", reason, measurable, decay, rank)

    if log_t.size < max(min_points, 4):
        return verdict(None, None, f"{log_t.size} usable points < {max(min_points, 4)}", measurable=False)
    slope, stderr, r2, intercept = _least_squares(log_t, y)
    fit = SlopeFit(slope, stderr, r2, intercept,
                   (float(np.exp(log_t.min())), float(np.exp(log_t.max()))), int(log_t.size))
    order = np.argsort(log_t)
    half = log_t.size // 2
    low, high = order[:half], order[log_t.size - half:]
    try:
        halves = (_least_squares(log_t[low], y[low])[0], _least_squares(log_t[high], y[high])[0])
    except ValueError:
        return verdict(fit, None, "a half of the window has a single distinct t", measurable=False)
    decay = halves[0] * float(np.ptp(log_t[low])) / math.log(10)  # fitted fall over the small-t half
    if decay < min_decay_decades:
        return verdict(fit, halves, f"not measurable: falls by {decay:.2f} decades over the smaller-t half of "
                                    f"the window (needs {min_decay_decades}); the endpoint is not singular "
                                    f"along it", measurable=False, decay=decay)
    if r2 < min_r2:
        return verdict(fit, halves, f"R^2 {r2:.3f} < {min_r2}", decay=decay)
    if slope <= 0:
        return verdict(fit, halves, f"slope {slope:.3g} is not positive", decay=decay)
    if abs(halves[0] - halves[1]) > max_half_disagreement * abs(slope):
        return verdict(fit, halves, f"half-window slopes {halves[0]:.3g} and {halves[1]:.3g} "
                                    f"differ by more than {max_half_disagreement:.0%} of "
                                    f"{slope:.3g}", decay=decay)
    return verdict(fit, halves, "reads", decay=decay)


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` as one detached float64 vector (in ``parameters()`` order)."""
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in model.parameters()])


def euclidean_metric(delta: torch.Tensor) -> float:
    """The default metric: the Euclidean norm of a flattened parameter change."""
    return float(torch.linalg.vector_norm(delta))


def segment_length(delta: torch.Tensor, metric: Metric | None = None,
                   project_horizontal: Projection | None = None) -> float:
    """Length of one step ``delta`` in ``metric`` after removing its vertical part."""
    horizontal = project_horizontal(delta) if project_horizontal is not None else delta
    length = float((metric or euclidean_metric)(horizontal))
    if not math.isfinite(length) or length < 0:
        raise ValueError(f"metric returned {length}; a length must be finite and non-negative")
    return length


def remaining_arc_length(segment_lengths: Sequence[float]) -> np.ndarray:
    """``t_i = sum_{j >= i} segment_lengths[j]`` for checkpoints 0..K, with ``t_K = 0``.

    ``segment_lengths[j]`` is the length travelled between checkpoints j and j + 1.
    """
    lengths = np.asarray(segment_lengths, dtype=np.float64)
    if lengths.ndim != 1 or (lengths < 0).any() or not np.isfinite(lengths).all():
        raise ValueError("segment lengths must be a 1-D sequence of finite non-negative numbers")
    return np.concatenate([np.cumsum(lengths[::-1])[::-1], [0.0]])


def inverse_step_clock(steps: Sequence[int] | np.ndarray) -> np.ndarray:
    """``t_i = steps[-1] / steps[i]`` for increasing positive recording steps: the last one is t = 1."""
    steps = np.asarray(steps, dtype=np.float64)
    if steps.ndim != 1 or steps.size < 2 or (steps <= 0).any() or (np.diff(steps) <= 0).any():
        raise ValueError(f"the inverse-step clock needs increasing positive steps, got {steps.tolist()}")
    return steps[-1] / steps


def log_spaced_steps(first: int, last: int, count: int) -> list[int]:
    """At most ``count`` distinct integer steps from ``first`` to ``last``, evenly spaced in log step
    (rounded down, so duplicates early on merge)."""
    if not 1 <= first < last or count < 2:
        raise ValueError(f"need 1 <= first < last and count >= 2, got first={first}, last={last}, count={count}")
    return sorted({int(s) for s in np.geomspace(first, last, count)})


def remaining_arc_length_of_checkpoints(checkpoints: Sequence[torch.Tensor], *,
                                        metric: Metric | None = None,
                                        project_horizontal: Projection | None = None) -> np.ndarray:
    """Remaining quotient arc length at each of a list of flattened parameter vectors.

    Consecutive checkpoints are joined by straight chords; record more often for a finer path.
    """
    if len(checkpoints) < 2:
        raise ValueError("need at least two checkpoints to measure an arc length")
    lengths = [segment_length(b.to(torch.float64) - a.to(torch.float64), metric, project_horizontal)
               for a, b in zip(checkpoints[:-1], checkpoints[1:])]
    return remaining_arc_length(lengths)


@dataclass(frozen=True)
class RateReadout:
    """All (site, observable) cells of a trajectory, the cells left out, and the verdict."""

    t: tuple[float, ...]
    cells: tuple[CellReading, ...]
    excluded: tuple[dict[str, str], ...] = ()  # {"site", "observable", "reason"}

    @property
    def readable_cells(self) -> int:
        return sum(cell.reads for cell in self.cells)

    @property
    def measurable_cells(self) -> int:
        return sum(cell.measurable for cell in self.cells)

    @property
    def total_cells(self) -> int:
        return len(self.cells)

    @property
    def measurable(self) -> bool:
        return self.measurable_cells > 0

    def summary(self) -> str:
        """``"k of m measurable cells read (of n)"``, or why the trajectory is not measurable."""
        if self.measurable:
            return (f"{self.readable_cells} of {self.measurable_cells} measurable cells read "
                    f"({self.total_cells} cells)")
        decays = [(c.decay_decades, c) for c in self.cells if c.decay_decades is not None]
        if not decays:
            return f"not measurable: no cell of {self.total_cells} has enough usable points"
        largest, cell = max(decays, key=lambda pair: pair[0])
        return (f"not measurable: none of {self.total_cells} cells falls by {MIN_DECAY_DECADES} decades over the "
                f"smaller-t half of the window (largest {largest:.2f}, {cell.site} {cell.observable}); the "
                f"endpoint is not singular")

    def as_dict(self) -> dict[str, Any]:
        return {"t": list(self.t), "readable_cells": self.readable_cells,
                "measurable_cells": self.measurable_cells, "total_cells": self.total_cells,
                "summary": self.summary(), "cells": [c.as_dict() for c in self.cells],
                "excluded": list(self.excluded)}


def window_rank_series(spectra: Sequence[torch.Tensor | None], rel_tol: float,
                       kind: str) -> tuple[list[float], int]:
    """The k-th largest eigenvalue (``kind="lambda_min"``) or the sum of logs of the k largest
    (``"logdet"``) at every checkpoint, k the largest positive rank (``rel_tol``) among them.

    A checkpoint without a spectrum, or whose k-th eigenvalue is not positive, gives NaN.
    """
    from .observables import positive_part

    present = [s for s in spectra if s is not None]
    if not present:
        return [math.nan] * len(spectra), 0
    rank = max(positive_part(s, rel_tol).rank for s in present)
    values = []
    for spectrum in spectra:
        if spectrum is None or rank == 0 or spectrum.numel() < rank or float(spectrum[-rank]) <= 0:
            values.append(math.nan)
            continue
        top = spectrum[-rank:]
        values.append(float(top[0]) if kind == "lambda_min" else float(torch.log(top).sum()))
    return values, rank


def rate_readout(t: Sequence[float] | np.ndarray, readings: Sequence[DDSReading], *,
                 observables: Sequence[str] = tuple(SLOPE_OBSERVABLES),
                 window: tuple[float, float] | None = None, exclude: Mapping[str, str] | None = None,
                 rel_tol: float = DEFAULT_REL_TOL, **rule: Any) -> RateReadout:
    """Apply the readout rule to every (site, observable) series of ``readings`` against ``t``.

    ``t[i]`` is the distance of checkpoint i to the singular set (e.g. from
    :func:`remaining_arc_length`). Readings that carry spectra are followed at the window rank
    (module docstring); otherwise the rows' positive-spectrum values are used. ``exclude`` maps
    ``"site:observable"`` (or a whole ``"site"``) to the reason it is left out (duplicates, probe
    artefacts); excluded cells are listed but not counted. ``rule`` overrides ``min_points``,
    ``min_r2``, ``max_half_disagreement`` or ``min_decay_decades``. A site missing from a reading
    contributes no point at that checkpoint.
    """
    t = np.asarray(t, dtype=np.float64)
    if len(readings) != t.size:
        raise ValueError(f"{len(readings)} readings but {t.size} values of t")
    unknown = set(observables) - set(SLOPE_OBSERVABLES)
    if unknown:
        raise ValueError(f"unknown observables {sorted(unknown)}; "
                         f"choose from {list(SLOPE_OBSERVABLES)}")
    exclude = dict(exclude or {})
    in_window = t > 0
    if window is not None:
        in_window &= (t >= window[0]) & (t <= window[1])
    rows_by_site = [{row.site: row for row in reading.rows} for reading in readings]
    sites = list(dict.fromkeys(site for table in rows_by_site for site in table))
    cells, excluded = [], []
    for site in sites:
        by_checkpoint = [table.get(site) for table in rows_by_site]
        for name in observables:
            reason = exclude.get(f"{site}:{name}", exclude.get(site))
            if reason is not None:
                excluded.append({"site": site, "observable": name, "reason": reason})
                continue
            statistic, side = name.rsplit("_", 1)
            spectra = [reading.spectra.get(site, {}).get(side) if keep else None
                       for reading, keep in zip(readings, in_window)]
            rank = None
            if any(s is not None for s in spectra):
                values, rank = window_rank_series(spectra, rel_tol, statistic)
            else:
                values = [getattr(row, name) if row is not None else math.nan for row in by_checkpoint]
            cells.append(read_cell(t, values, site=site, observable=name, kind=SLOPE_OBSERVABLES[name],
                                   window=window, rank=rank, **rule))
    return RateReadout(t=tuple(float(x) for x in t), cells=tuple(cells), excluded=tuple(excluded))


class TrajectoryRecorder:
    """Records DDS readings along training and turns them into a rate readout.

    Call :meth:`record` every k optimizer steps (the probe batch is fixed at construction), and
    optionally :meth:`update_path` after every step so the arc length follows the actual path
    rather than chords between recordings. The optimizer's metric and the horizontal projection
    are evaluated when each segment is measured, so they may read the optimizer's current state.

    Example::

        recorder = TrajectoryRecorder(model, x_probe, y_probe, loss=per_sample_mse,
                                      sites=["layers.0", "layers.1"])
        for step in range(steps):
            train_step()
            if step % 50 == 0:
                recorder.record(step)
        readout = recorder.readout()
        print(readout.readable_cells, "of", readout.total_cells)
    """

    def __init__(self, model: nn.Module, probe_inputs: Any, probe_targets: Any, *,
                 loss: PerSampleLoss, sites: Sequence[str], metric: Metric | None = None,
                 project_horizontal: Projection | None = None,
                 rel_tol: float = DEFAULT_REL_TOL) -> None:
        self.model = model
        self.probe_inputs = probe_inputs
        self.probe_targets = probe_targets
        self.loss = loss
        self.sites = list(sites)
        self.metric = metric
        self.project_horizontal = project_horizontal
        self.rel_tol = rel_tol
        self.steps: list[int] = []
        self.readings: list[DDSReading] = []
        self.segment_lengths: list[float] = []  # between consecutive recordings
        self._pending_length = 0.0
        self._last_parameters: torch.Tensor | None = None

    def update_path(self) -> float:
        """Add the length travelled since the last call (or recording) to the current segment."""
        current = flatten_parameters(self.model)
        if self._last_parameters is not None:
            self._pending_length += segment_length(current - self._last_parameters,
                                                   self.metric, self.project_horizontal)
        self._last_parameters = current
        return self._pending_length

    def record(self, step: int) -> DDSReading:
        """Read DDS on the probe batch now and close the current path segment."""
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"steps must increase: got {step} after {self.steps[-1]}")
        reading = dead_direction_signatures(self.model, self.probe_inputs, self.probe_targets,
                                            loss=self.loss, sites=self.sites, rel_tol=self.rel_tol)
        self.update_path()
        if self.readings:
            self.segment_lengths.append(self._pending_length)
        self._pending_length = 0.0  # the path starts at the first recording
        self.steps.append(int(step))
        self.readings.append(reading)
        return reading

    def remaining_arc_length(self) -> np.ndarray:
        """t at each recording: the path length still to travel to the last recording."""
        if len(self.readings) < 2:
            raise ValueError("need at least two recordings")
        return remaining_arc_length(self.segment_lengths)

    def clock(self, name: str = "arc-length") -> np.ndarray:
        """t at each recording on the named clock (:data:`CLOCKS`)."""
        if name == "arc-length":
            return self.remaining_arc_length()
        if name == "inverse-step":
            return inverse_step_clock(self.steps)
        raise ValueError(f"unknown clock {name!r}; choose from {list(CLOCKS)}")

    def readout(self, *, clock: str = "arc-length", window: tuple[float, float] | None = None,
                observables: Sequence[str] = tuple(SLOPE_OBSERVABLES), **rule: Any) -> RateReadout:
        """Rate readout over the recordings against ``clock`` (on the arc-length clock the last
        recording, t = 0, is the reference point)."""
        return rate_readout(self.clock(clock), self.readings, observables=observables,
                            window=window, rel_tol=self.rel_tol, **rule)
