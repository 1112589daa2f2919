"""rrr: the reduced-rank regression grid of dds.md §4, DDS vs the devinterp LLC vs closed-form lambda.

``y = B A x`` with M = 10 inputs, N = 5 outputs, width H = 2..5 and true rank r0 = 1..H (14 cells in
``full``). Per cell a fresh random teacher and data set; the checkpoint is the exact least-squares
rank-H fit (:func:`rrr_checkpoint`). Measured per cell:

* the devinterp LLC under the calibrated protocol of :mod:`gaugeopt.dds.llc` (full-batch SGLD,
  burn-in dropped, several chains, initial loss on all n): the SGLD step size ``lr0`` is chosen once
  per seed on a separate calibration cell by :func:`~gaugeopt.dds.llc.scan_step_sizes` (the middle
  of the 4x step range where estimates agree, never looking at lambda), and every grid cell is then
  estimated at ``lr0 / 2``, ``lr0`` and ``2 lr0`` so its step-size sensitivity is on record;
  ``LLC / lambda`` uses the estimate at ``lr0``;
* DDS at the checkpoint (one forward and one backward), with wall time and passes for both.

A second, known-answer part validates the DDS readout rule on reduced-rank regression:
:func:`rrr_singular_path` walks the model along a path to the singular set of rank r0 (the H - r0
excess directions scaled by t), and the readout must read the planted cells and no control.
Paper: the calibrated LLC recovers lambda at 99 % on average; DDS rank-tracks lambda.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..dds import SLOPE_OBSERVABLES, DDSReading, dead_direction_signatures, log_spaced_steps, rate_readout, rrr_grid
from ..dds import rrr_learning_coefficient
from ..models import ReducedRankRegression, ReducedRankRegressionConfig
from .checks import check_config, field_error
from .common import RecordedTrajectory, half_squared_error, mean, record_trajectory, score_against_planted
from .registry import Experiment
from .runner import RunContext
from .statistics import (
    Verdict,
    band_verdict,
    correlation_interval,
    correlation_verdict,
    mean_interval,
    spearman_rho,
)

DTYPE = torch.float64
OUTPUT_SITE = "B:output"
HIDDEN_SITE = "A:output"
SITES = (HIDDEN_SITE, OUTPUT_SITE)
# Fixed before the runs: the DDS reading whose rank correlation with lambda the claim tests.
TRACKING_OBSERVABLE = "logdet_A"
LLC_TOLERANCE = 0.10


def rrr_checkpoint(M: int, N: int, H: int, r: int, *, samples: int, noise: float,
                   seed: int) -> tuple[ReducedRankRegression, torch.Tensor, torch.Tensor]:
    """Data from a random rank-r teacher and the exact least-squares fit of width H.

    The teacher is ``B0 A0`` with standard Gaussian factors; ``y = B0 A0 x + noise * eps``. The
    checkpoint is the global minimiser of the empirical squared error among rank-H maps (OLS
    projected onto the top-H principal directions of its fitted outputs), split into balanced
    factors ``B = U S^(1/2)``, ``A = S^(1/2) V^T``.
    """
    generator = torch.Generator().manual_seed(seed)
    teacher = (torch.randn(N, r, generator=generator, dtype=DTYPE)
               @ torch.randn(r, M, generator=generator, dtype=DTYPE))
    x = torch.randn(samples, M, generator=generator, dtype=DTYPE)
    y = x @ teacher.T + noise * torch.randn(samples, N, generator=generator, dtype=DTYPE)
    ols = torch.linalg.lstsq(x, y).solution.T  # N x M
    _, _, output_directions = torch.linalg.svd(x @ ols.T, full_matrices=False)
    top = output_directions[:H]
    fitted = top.T @ top @ ols
    u, s, vt = torch.linalg.svd(fitted, full_matrices=False)
    model = ReducedRankRegression(ReducedRankRegressionConfig(inputs=M, outputs=N, width=H)).to(DTYPE)
    with torch.no_grad():
        model.B.weight.copy_(u[:, :H] * s[:H].sqrt())
        model.A.weight.copy_(s[:H].sqrt()[:, None] * vt[:H])
    return model, x, y


def gaussian_nll(noise: float):
    """Per-sample negative log-likelihood ``||y - f(x)||^2 / (2 noise^2)`` (up to a constant)."""
    def nll(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return half_squared_error(outputs, targets) / noise**2
    return nll


def rrr_planted_cells(H: int, r: int, N: int) -> dict[str, float]:
    """``"site:observable" -> planted slope`` on :func:`rrr_singular_path` (empty when H = r).

    The H - r excess hidden units scale as t: at the hidden site both A (activations ``A x``) and G
    (``B^T`` times the residual) have H - r eigenvalues ~ t^2 (slope 2, logdet slope 2 (H - r)); at
    the output the activations gain H - r eigenvalues ~ t^4 (when H <= N). The output's G is the
    residual, label noise: a control.
    """
    excess = H - r
    if excess == 0:
        return {}
    planted = {f"{HIDDEN_SITE}:lambda_min_A": 2.0, f"{HIDDEN_SITE}:logdet_A": 2.0 * excess,
               f"{HIDDEN_SITE}:lambda_min_G": 2.0, f"{HIDDEN_SITE}:logdet_G": 2.0 * excess}
    if H <= N:
        planted.update({f"{OUTPUT_SITE}:lambda_min_A": 4.0, f"{OUTPUT_SITE}:logdet_A": 4.0 * excess})
    return planted


def rrr_singular_path(M: int, N: int, H: int, r: int, *, t_values: Sequence[float], samples: int = 1000,
                      noise: float = 1.0, seed: int = 0) -> tuple[np.ndarray, list[DDSReading]]:
    """DDS readings along a path to the rank-r singular set of a width-H reduced-rank regression.

    ``A(t) = [A0; t U]``, ``B(t) = [B0, t V]`` with the rank-r teacher ``B0 A0`` generating the
    data and random U, V: at t = 0 the model sits on the singular set (the H - r excess units
    are dead), and t is the distance along the path.
    """
    generator = torch.Generator().manual_seed(seed)
    a0 = torch.randn(r, M, generator=generator, dtype=DTYPE)
    b0 = torch.randn(N, r, generator=generator, dtype=DTYPE)
    u = torch.randn(H - r, M, generator=generator, dtype=DTYPE)
    v = torch.randn(N, H - r, generator=generator, dtype=DTYPE)
    x = torch.randn(samples, M, generator=generator, dtype=DTYPE)
    y = x @ (b0 @ a0).T + noise * torch.randn(samples, N, generator=generator, dtype=DTYPE)
    model = ReducedRankRegression(ReducedRankRegressionConfig(inputs=M, outputs=N, width=H)).to(DTYPE)
    t = np.asarray(t_values, dtype=np.float64)
    readings = []
    for value in t:
        with torch.no_grad():
            model.A.weight.copy_(torch.cat([a0, value * u]))
            model.B.weight.copy_(torch.cat([b0, value * v], dim=1))
        readings.append(dead_direction_signatures(model, x, y, loss=gaussian_nll(noise), sites=list(SITES)))
    return t, readings


def read_rrr_path(M: int, N: int, H: int, r: int, *, t_values: Sequence[float], samples: int = 1000,
                  noise: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """The readout rule on :func:`rrr_singular_path`, scored against the planted cells."""
    t, readings = rrr_singular_path(M, N, H, r, t_values=t_values, samples=samples, noise=noise, seed=seed)
    return {"H": H, "r": r, **score_against_planted(rate_readout(t, readings), rrr_planted_cells(H, r, N))}


def _orthonormal(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """A rows x columns matrix with orthonormal rows (rows <= columns), Haar-random."""
    q, _ = torch.linalg.qr(torch.randn(columns, rows, generator=generator, dtype=DTYPE))
    return q.T


def rrr_gd_trajectory(M: int, N: int, H: int, r: int, *, steps: int, lr: float, noise: float, checkpoints: int,
                      probe_samples: int = 512, seed: int = 0) -> RecordedTrajectory:
    """Gradient descent on the population loss of a width-H reduced-rank regression towards a
    rank-r teacher, read along the way: a noise-free approach to the singular set.

    The teacher ``T = U V^T`` has r unit singular values; with ``x ~ N(0, I_M)`` the population loss is
    ``||B A - T||_F^2 / 2`` (plus the noise floor), and its exact gradient is followed. The start is
    balanced, ``A = Q_A``, ``B = Q_B`` with orthonormal rows / columns (``B^T B = A A^T``, which
    gradient descent keeps up to O(lr^2)), so the H - r excess units die together as
    ``t ~ (1 + 2 lr s)^(-1/2)``: a power law in the step. The true t is the geometric mean of the
    H - r smallest singular values of A and of B (NaN when H = r: nothing is planted, a control).
    DDS is read on a fixed probe of ``probe_samples`` noisy samples (Gaussian negative
    log-likelihood) at ``checkpoints`` log-spaced steps from step 10, and the remaining arc length in
    the quotient metric of the unit scalings.
    """
    generator = torch.Generator().manual_seed(seed)
    teacher = _orthonormal(r, N, generator).T @ _orthonormal(r, M, generator)  # N x M, r unit singular values
    model = ReducedRankRegression(ReducedRankRegressionConfig(inputs=M, outputs=N, width=H)).to(DTYPE)
    with torch.no_grad():
        model.A.weight.copy_(_orthonormal(H, M, generator))
        model.B.weight.copy_(_orthonormal(H, N, generator).T)
    probe_x = torch.randn(probe_samples, M, generator=generator, dtype=DTYPE)
    probe_y = probe_x @ teacher.T + noise * torch.randn(probe_samples, N, generator=generator, dtype=DTYPE)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def train_step(step: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = 0.5 * (model.B.weight @ model.A.weight - teacher).pow(2).sum()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def excess_scale() -> float:
        if H == r:
            return float("nan")
        values = [torch.linalg.svdvals(w.detach())[r:] for w in (model.A.weight, model.B.weight)]
        return float(torch.cat(values).log().mean().exp())

    return record_trajectory(model, (probe_x, probe_y), loss=gaussian_nll(noise), sites=list(SITES), steps=steps,
                             record_at=log_spaced_steps(10, steps, checkpoints), train_step=train_step,
                             true_t=excess_scale, gauge_example=probe_x[:2])


def noise_edge(inputs: int, outputs: int, samples: int, noise_variance: float) -> float:
    """The largest eigenvalue that fitted noise alone gives the output second moment ``A``:
    ``(sqrt(M) + sqrt(N))^2 sigma^2 / n``.

    A least-squares fit of pure noise is ``Z = E^T X (X^T X)^(-1)``, an N x M matrix with entries of
    variance ``sigma^2 / n`` (for ``x ~ N(0, I)``); its squared singular values, the eigenvalues of
    ``Z Z^T`` that it adds to ``A``, fill the Marchenko-Pastur bulk whose upper edge this is.
    """
    if min(inputs, outputs, samples) < 1 or noise_variance < 0:
        raise ValueError(f"need positive sizes and a non-negative noise variance, got M={inputs}, N={outputs}, "
                         f"n={samples}, sigma^2={noise_variance}")
    return (math.sqrt(inputs) + math.sqrt(outputs)) ** 2 * noise_variance / samples


def noise_edge_active_count(model: ReducedRankRegression, x: torch.Tensor, y: torch.Tensor,
                            eigenvalues_A: torch.Tensor) -> dict[str, float]:
    """How many eigenvalues of the output's activation second moment stand above the noise edge.

    The noise variance is estimated from the residual with its degrees of freedom removed,
    ``sigma^2 = |Y - F|^2 / (n N - H (M + N - H))``, and the edge is :func:`noise_edge`. On a
    least-squares checkpoint the count is the number of directions the data support: the true rank
    r0 (a known answer), whatever the width H.
    """
    samples, (outputs, width), inputs = x.shape[0], model.B.weight.shape, model.A.weight.shape[1]
    with torch.no_grad():
        residual = float((y - model(x)).pow(2).sum())
    variance = residual / (samples * outputs - width * (inputs + outputs - width))
    edge = noise_edge(inputs, outputs, samples, variance)
    return {"active_count": int((eigenvalues_A > edge).sum()), "noise_edge": edge, "noise_variance": variance}


def _timed_dds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss, repeats: int) -> tuple[DDSReading, float]:
    reading = dead_direction_signatures(model, x, y, loss=loss, sites=list(SITES))  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        reading = dead_direction_signatures(model, x, y, loss=loss, sites=list(SITES))
    return reading, (time.perf_counter() - start) / repeats


@dataclass(frozen=True)
class RRRConfig:
    M: int = 10
    N: int = 5
    widths: tuple[int, ...] = (2, 3, 4, 5)
    samples: int = 1000
    noise: float = 1.0
    run_llc: bool = True
    num_chains: int = 4
    num_draws: int = 1000
    num_burnin_steps: int = 1000
    calibration_lrs: tuple[float, ...] = (2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4)
    calibration_cell: tuple[int, int] = (4, 2)  # (H, r) of the separate cell the step size is chosen on
    localization: float = 1.0
    dds_repeats: int = 10
    path_t: tuple[float, float, int] = (0.3, 0.003, 12)  # readout validation path: t from, to, points
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        check_config(self, positive=("M", "N", "widths", "samples", "noise", "num_chains", "num_draws",
                                     "calibration_lrs", "calibration_cell", "localization", "dds_repeats", "path_t"),
                     non_negative=("num_burnin_steps",))
        rank_limit = min(self.M, self.N)  # a width-H cell fits ranks r = 1..H, and a rank is at most min(M, N)
        if max(self.widths) > rank_limit:
            raise field_error(self, "widths", f"at most min(M, N) = {rank_limit}", self.widths)
        if len(self.calibration_cell) != 2 or not self.calibration_cell[1] <= self.calibration_cell[0] <= rank_limit:
            raise field_error(self, "calibration_cell", f"(H, r) with r <= H <= min(M, N) = {rank_limit}",
                              self.calibration_cell)


def run_seed(c: RRRConfig, seed: int, context: RunContext) -> dict[str, Any]:
    """Calibration, every grid cell (LLC at three step sizes, DDS) and the readout paths of one seed."""
    from ..dds.llc import scan_step_sizes

    folder = context.folder
    nll = gaussian_nll(c.noise)
    sampler = dict(num_chains=c.num_chains, num_draws=c.num_draws, num_burnin_steps=c.num_burnin_steps)
    out: dict[str, Any] = {"seed": seed, "calibration": None, "cells": [], "paths": []}
    lr0 = None
    if c.run_llc:
        H0, r0 = c.calibration_cell
        model, x, y = rrr_checkpoint(c.M, c.N, H0, r0, samples=c.samples, noise=c.noise, seed=10_000 + seed)
        with folder.timed(f"calibration seed {seed}"):
            scan = scan_step_sizes(model, x, y, loss=nll, step_sizes=c.calibration_lrs,
                                   localization=c.localization, seed=seed, **sampler)
        out["calibration"] = {"cell": [H0, r0], **scan.as_dict()}
        lr0 = scan.chosen_lr
    cells = rrr_grid(M=c.M, N=c.N, widths=c.widths)
    for index, cell in enumerate(context.bar(cells, desc=f"rrr cells, seed {seed}")):
        coefficient = rrr_learning_coefficient(**cell)
        model, x, y = rrr_checkpoint(c.M, c.N, cell["H"], cell["r"], samples=c.samples, noise=c.noise,
                                     seed=1000 * seed + index)
        reading, dds_seconds = _timed_dds(model, x, y, nll, c.dds_repeats)
        row: dict[str, Any] = {**cell, "lambda": coefficient.lambda_, "case": coefficient.case,
                               **noise_edge_active_count(model, x, y, reading.spectra[OUTPUT_SITE]["A"]),
                               "dds": {r.site: r.as_dict() for r in reading.rows}, "dds_skipped": reading.skipped,
                               "dds_wall_time_s": dds_seconds, "dds_forward_backward_passes": 1,
                               "dds_samples_processed": c.samples}
        if c.run_llc:
            scan = scan_step_sizes(model, x, y, loss=nll, step_sizes=(lr0 / 2, lr0, 2 * lr0),
                                   localization=c.localization, seed=1000 * seed + index, **sampler)
            row.update({"llc": scan.chosen.as_dict(), "step_scan": scan.as_dict(),
                        "llc_over_lambda": scan.chosen.llc_mean / coefficient.lambda_,
                        "llc_over_lambda_by_step": [e.llc_mean / coefficient.lambda_ for e in scan.estimates]})
        out["cells"].append(row)
        folder.results.setdefault("by_seed", {})[str(seed)] = out
        folder.flush()
    start, stop, points = c.path_t
    for H in c.widths:
        for r in (1, H):
            out["paths"].append(read_rrr_path(c.M, c.N, H, r, t_values=np.geomspace(start, stop, int(points)),
                                              samples=c.samples, noise=c.noise, seed=2000 * seed + 10 * H + r))
    return out


def run(config: RRRConfig, context: RunContext) -> None:
    c, folder = config, context.folder
    by_seed = context.state.setdefault("by_seed", {})
    for seed in c.seeds:
        if not context.start_unit("rrr", seed):
            continue
        with folder.timed(f"seed {seed}"):
            by_seed[seed] = run_seed(c, seed, context)
    summarise(c, folder, by_seed)


def summarise(c: RRRConfig, folder, by_seed: dict[int, dict[str, Any]]) -> None:
    seeds = list(by_seed)
    first = by_seed[seeds[0]]["cells"]
    labels = [f"H={row['H']}, r0={row['r']}" for row in first]
    folder.set_metric("closed form", "lambda", [row["lambda"] for row in first])
    dds_seconds = [row["dds_wall_time_s"] for s in seeds for row in by_seed[s]["cells"]]
    folder.set_metric("cost per checkpoint", "DDS wall time (s, median)", float(np.median(dds_seconds)))
    folder.set_metric("cost per checkpoint", "DDS forward-backward passes", 1)
    rho_by_seed = {}
    for s in seeds:
        cells = by_seed[s]["cells"]
        lambdas = [row["lambda"] for row in cells]
        correlations = {}
        for site in SITES:
            for name in (*SLOPE_OBSERVABLES, "rank_G", "rank_A"):
                values = [row["dds"].get(site, {}).get(name, math.nan) for row in cells]
                correlations[f"{site} {name}"] = spearman_rho(values, lambdas)
        by_seed[s]["spearman_with_lambda"] = correlations
        rho_by_seed[s] = correlations
    for key in rho_by_seed[seeds[0]]:
        folder.set_metric("DDS Spearman rho with lambda (mean over seeds)", key,
                          mean(rho_by_seed[s][key] for s in seeds))
    if c.run_llc:
        llc_ratio = {s: mean(row["llc_over_lambda"] for row in by_seed[s]["cells"]) for s in seeds}
        llc_seconds = [row["llc"]["wall_time_s"] for s in seeds for row in by_seed[s]["cells"]]
        passes = first[0]["llc"]["forward_backward_passes"]
        spread = [row["step_scan"]["spread"] for s in seeds for row in by_seed[s]["cells"]]
        folder.set_metric("cost per checkpoint", "LLC wall time (s, median)", float(np.median(llc_seconds)))
        folder.set_metric("cost per checkpoint", "LLC forward-backward passes", passes)
        folder.set_metric("cost per checkpoint", "LLC samples processed", first[0]["llc"]["samples_processed"])
        folder.results["tables"] = [llc_cell_table(by_seed)]
        folder.add_figure({"file": "llc_over_lambda.png", "kind": "bar",
                           "title": "devinterp LLC / closed-form lambda per cell (mean over seeds)",
                           "xlabel": "cell (width H, true rank r0)", "ylabel": "LLC / lambda",
                           "series": [{"label": f"step {label}", "x": labels,
                                       "y": [mean(by_seed[s]["cells"][i]["llc_over_lambda_by_step"][k] for s in seeds)
                                             for i in range(len(labels))]}
                                      for k, label in enumerate(("lr0 / 2", "lr0 (reported)", "2 lr0"))],
                           "hlines": [{"y": 1.0, "label": "lambda"},
                                      {"y": 1 - LLC_TOLERANCE, "label": f"criterion band +-{LLC_TOLERANCE:.0%}",
                                       "style": "dotted"},
                                      {"y": 1 + LLC_TOLERANCE, "label": None, "style": "dotted"}]})
        interval = mean_interval(llc_ratio)
        folder.add_claim("calibrated LLC recovers lambda", "LLC 99 % of lambda (mean over 14 cells)",
                         f"mean LLC/lambda {interval.describe(3)}; per seed "
                         + ", ".join(f"{v:.3f}" for v in llc_ratio.values()),
                         band_verdict(interval, low=1 - LLC_TOLERANCE, high=1 + LLC_TOLERANCE),
                         f"criterion: the 95 % interval over seeds of the mean over cells of LLC/lambda lies within "
                         f"{LLC_TOLERANCE:.0%} of 1; step sizes (lr0/2, lr0, 2 lr0) per cell, 4x range spread: median "
                         f"{float(np.median(spread)):.1%}, max {max(spread):.1%}",
                         evidence={"llc_over_lambda_by_seed": llc_ratio, "interval": interval.as_dict()})
        ratio = float(np.median(llc_seconds)) / float(np.median(dds_seconds))
        folder.add_claim("DDS is far cheaper per checkpoint", "1 forward-backward (DDS) vs 10^4-10^6 (LLC)",
                         f"{ratio:.0f}x wall time, {passes} vs 1 passes", bool(ratio >= 100),
                         "criterion: median LLC wall time per checkpoint >= 100x DDS's (a cost measurement, "
                         "not a statistical claim)")
    folder.add_figure({"file": "dds_vs_lambda.png", "kind": "scatter",
                       "title": f"DDS at the output ({OUTPUT_SITE}) against the closed-form lambda, seed {seeds[0]}",
                       "xlabel": "closed-form lambda (RLCT)", "ylabel": "log pseudo-determinant (nats)",
                       "series": [{"label": label, "x": [row["lambda"] for row in first],
                                   "y": [row["dds"].get(OUTPUT_SITE, {}).get(name) for row in first]}
                                  for name, label in (("logdet_A", "logdet+ A (activations; the tracked reading)"),
                                                      ("logdet_G", "logdet+ G (gradients)"))]})
    key = f"{OUTPUT_SITE} {TRACKING_OBSERVABLE}"
    rho = correlation_interval({s: rho_by_seed[s][key] for s in seeds}, points=len(first))
    folder.add_claim("a DDS observable at the output layer rank-tracks lambda",
                     "DDS rank-tracks lambda at the predicted sign",
                     f"Spearman rho of {TRACKING_OBSERVABLE} at {OUTPUT_SITE} (fixed before the run): "
                     f"{rho.describe(2)}",
                     correlation_verdict(rho, threshold=0.8),
                     "criterion: the 95 % interval over seeds (Fisher z) lies beyond |rho| = 0.8 (the papers' sign "
                     "per observable is not available; every observable's rho is in the metrics)",
                     evidence={"rho_by_seed": {s: rho_by_seed[s][key] for s in seeds}})
    if "active_count" in first[0]:
        add_active_count_claims(folder, by_seed)
    paths = [p for s in seeds for p in by_seed[s]["paths"]]
    planted = sum(p["planted"] for p in paths)
    planted_read = sum(p["planted_read"] for p in paths)
    controls_read = sum(p["controls_read"] for p in paths)
    ratios = [v for p in paths for v in p["slope_over_planted"].values()]
    folder.set_metric("readout rule on RRR paths", "planted cells read", f"{planted_read}/{planted}")
    folder.set_metric("readout rule on RRR paths", "control cells read",
                      f"{controls_read}/{sum(p['controls'] for p in paths)}")
    if ratios:
        folder.set_metric("readout rule on RRR paths", "read slope / planted slope (min, max)",
                          [min(ratios), max(ratios)])
    folder.add_claim("the readout rule reads the planted cells and no control (RRR singular paths)",
                     "our validation of dds.md §3 (no paper figure)",
                     f"{planted_read}/{planted} planted cells read, slopes {min(ratios, default=math.nan):.2f}-"
                     f"{max(ratios, default=math.nan):.2f} x planted; {controls_read} control cells read",
                     bool(planted_read == planted and controls_read == 0
                          and all(abs(v - 1) <= 0.1 for v in ratios)),
                     "criterion: every planted cell reads within 10 % of its planted slope, no control reads "
                     "(a deterministic check, paths at every width with r0 = 1 and the full-rank control r0 = H)")


def add_active_count_claims(folder, by_seed: dict[int, dict[str, Any]]) -> None:
    """The noise-edge active count at the output: validated on the known rank r0, then against lambda."""
    seeds = list(by_seed)
    exact = {s: sum(row["active_count"] == row["r"] for row in by_seed[s]["cells"]) for s in seeds}
    cells = len(by_seed[seeds[0]]["cells"])
    folder.add_claim("the noise-edge active count at the output reads the true rank r0 (known answer)",
                     "our validation (no paper figure)",
                     f"count = r0 in {', '.join(str(v) for v in exact.values())} of {cells} cells per seed",
                     bool(all(v == cells for v in exact.values())),
                     "criterion: in every cell of every seed, the number of eigenvalues of A at the output above the "
                     "noise edge (sqrt(M) + sqrt(N))^2 sigma^2 / n (sigma^2 from the residual) equals r0 (a "
                     "deterministic check)", evidence={"exact_cells": exact})
    rho = {s: spearman_rho([row["active_count"] for row in by_seed[s]["cells"]],
                           [row["lambda"] for row in by_seed[s]["cells"]]) for s in seeds}
    ceiling = spearman_rho([row["r"] for row in by_seed[seeds[0]]["cells"]],
                           [row["lambda"] for row in by_seed[seeds[0]]["cells"]])
    interval = correlation_interval(rho, points=cells)
    validated = all(v == cells for v in exact.values())
    verdict = correlation_verdict(interval, threshold=0.8) if validated else Verdict(
        None, "not measurable (instrument)", "the count did not read the true rank in every cell (the row above), "
                                             "so its correlation with lambda is not evidence about the DDS reading")
    folder.add_claim("the noise-edge active count at the output rank-tracks lambda",
                     "DDS rank-tracks lambda at the predicted sign",
                     f"Spearman rho with lambda {interval.describe(2)}; r0 itself reaches {ceiling:.2f} on this grid",
                     verdict,
                     "criterion (fixed before the run): the 95 % interval over seeds (Fisher z) lies beyond |rho| = "
                     "0.8; a count of the supported directions can track lambda only as far as r0 does",
                     evidence={"rho_by_seed": rho, "r0_rho": ceiling})


def llc_cell_table(by_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per cell and seed: lambda, LLC at the three step sizes, LLC/lambda, spread, standard error."""
    rows = []
    for s, out in by_seed.items():
        for row in out["cells"]:
            scan = row["step_scan"]
            rows.append([s, row["H"], row["r"], row["lambda"],
                         *(f"{v:.2f}" for v in scan["llc"]), f"{row['llc_over_lambda']:.3f}",
                         f"{scan['spread']:.1%}", f"{row['llc']['llc_stderr']:.2f}"])
    steps = by_seed[next(iter(by_seed))]["cells"][0]["step_scan"]["step_sizes"]
    return {"title": "LLC per cell (calibrated protocol)",
            "header": ["seed", "H", "r0", "lambda", *(f"LLC at lr {s:.3g}" for s in steps), "LLC/lambda (middle lr)",
                       "spread over 4x lr", "stderr (chains)"],
            "rows": rows,
            "note": "step sizes are lr0/2, lr0, 2 lr0 with lr0 chosen per seed on the calibration cell; "
                    "the column headers give the first seed's values"}


PRESETS = {
    "tiny": RRRConfig(M=4, N=3, widths=(1, 2), samples=200, run_llc=False, dds_repeats=2,
                      calibration_cell=(2, 1), path_t=(0.3, 0.003, 10), seeds=(0,)),
    "smoke": RRRConfig(widths=(2, 3), num_draws=300, num_burnin_steps=300, num_chains=2, seeds=(0,)),
    "full": RRRConfig(seeds=(0, 1, 2)),
}

EXPERIMENT = Experiment(
    name="rrr",
    summary="reduced-rank regression grid: DDS vs devinterp LLC vs closed-form lambda, with costs",
    presets=PRESETS,
    run=run,
)
