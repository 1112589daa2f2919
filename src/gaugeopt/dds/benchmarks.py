"""Known-answer benchmarks of dds.md §4, as pure functions returning JSON-serialisable dicts.

* :func:`constructed_bridge` -- a deep linear chain placed *on* a path to the singular set: every
  layer is ``diag(1, ..., 1, t, ..., t)`` with r dead entries, the teacher is
  ``diag(1, ..., 1, 0, ..., 0)`` and labels carry Gaussian noise. At the output of layer l of L the
  dead eigenvalues of G decay as ``t^(2(L-l))`` and those of A as ``t^(2l)``, so the
  ``lambda+_min(G)`` slope is ``2(L-l)`` for every r while the ``logdet+(G)`` slope is
  ``r * 2(L-l)``.
* :func:`noisy_bridge_sgd` -- the same chain trained by minibatch SGD from a canonical-aligned
  (diagonal) initialisation; t is the measured dead-weight value along the run.
* :func:`rrr_benchmark` -- the reduced-rank regression grid: DDS at the trained checkpoint of each
  cell against the closed-form lambda, and the devinterp LLC at a calibrated SGLD budget on the
  same checkpoints, with wall time and forward-backward passes for both.

Command line: ``python -m gaugeopt.dds.benchmarks rrr|bridge --out FILE`` writes the JSON results.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import (
    DeepLinear,
    DeepLinearConfig,
    ReducedRankRegression,
    ReducedRankRegressionConfig,
)
from .observables import SLOPE_OBSERVABLES
from .reading import DDSReading, dead_direction_signatures
from .rrr import rrr_grid, rrr_learning_coefficient
from .slopes import fit_slope

DTYPE = torch.float64


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian negative log-likelihood ``||y - f(x)||^2 / 2`` (unit noise variance)."""
    return 0.5 * (outputs - targets).pow(2).sum(dim=-1)


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if either side is constant."""
    def ranks(values: np.ndarray) -> np.ndarray:
        order = np.argsort(values, kind="mergesort")
        ranked = np.empty(values.size, dtype=np.float64)
        ranked[order] = np.arange(values.size, dtype=np.float64)
        for value in np.unique(values):  # average the ranks of ties
            tied = values == value
            ranked[tied] = ranked[tied].mean()
        return ranked

    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError("spearman_rho needs two 1-D sequences of equal length >= 2")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    ra, rb = ranks(a) - ranks(a).mean(), ranks(b) - ranks(b).mean()
    denominator = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else math.nan


def _dead_coordinates(width: int, dead: int) -> slice:
    if not 1 <= dead < width:
        raise ValueError(f"need 1 <= dead < width, got dead={dead}, width={width}")
    return slice(width - dead, width)


def _bridge_data(width: int, dead: int, samples: int, noise: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I); y = teacher x + noise, teacher = diag(1, ..., 1, 0, ..., 0) with r zeros."""
    x = torch.randn(samples, width, generator=generator, dtype=DTYPE)
    teacher = torch.ones(width, dtype=DTYPE)
    teacher[_dead_coordinates(width, dead)] = 0.0
    y = x * teacher + noise * torch.randn(samples, width, generator=generator, dtype=DTYPE)
    return x, y


def _layer_sites(depth: int) -> list[str]:
    return [f"layers.{i}" for i in range(depth)]  # output of layer l = i + 1


def _fit_layers(t: np.ndarray, readings: list[DDSReading], depth: int, dead: int,
                window: tuple[float, float] | None) -> list[dict[str, Any]]:
    """Per layer l < L: fits of the G- and A-side observables against log t, with predictions."""
    layers = []
    for layer in range(1, depth):
        site = f"layers.{layer - 1}:output"
        rows = [reading.row(site) for reading in readings]
        fits = {name: fit_slope(t, [getattr(row, name) for row in rows], kind=kind, window=window)
                for name, kind in SLOPE_OBSERVABLES.items() if name != "sigma2_min_X"}
        layers.append({
            "layer": layer, "site": site,
            "fits": {name: fit.as_dict() for name, fit in fits.items()},
            "predicted": {"lambda_min_G": 2 * (depth - layer),
                          "logdet_G": 2 * dead * (depth - layer),
                          "lambda_min_A": 2 * layer, "logdet_A": 2 * dead * layer},
            "rank_G": sorted({row.rank_G for row in rows}),
            "rank_A": sorted({row.rank_A for row in rows}),
        })
    return layers


def _ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Slopes at r divided by slopes at r = 1, per layer: logdet+ should give r, lambda+_min 1."""
    base = next((run for run in runs if run["dead"] == 1), None)
    if base is None:
        return []
    out = []
    for run in runs:
        for layer, base_layer in zip(run["layers"], base["layers"]):
            entry = {"dead": run["dead"], "layer": layer["layer"]}
            for name in ("logdet_G", "lambda_min_G", "logdet_A", "lambda_min_A"):
                entry[f"{name}_ratio"] = (layer["fits"][name]["slope"]
                                          / base_layer["fits"][name]["slope"])
            out.append(entry)
    return out


def constructed_bridge(*, depth: int = 4, width: int = 6, dead_counts: Sequence[int] = (1, 2, 3, 4),
                       t_values: Sequence[float] | None = None, samples: int = 256,
                       noise: float = 1.0, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """DDS slopes on the constructed deep-linear bridge (log t given exactly).

    For each r in ``dead_counts`` the chain ``W_l = diag(1, ..., 1, t, ..., t)`` is read at the
    output of every layer for each t; the same data set (``samples`` points, label noise ``noise``)
    is used throughout. Returns per-layer fits, predictions and slope ratios to r = 1.
    """
    if t_values is None:
        t_values = np.logspace(-0.4, -1.3, 12)
    t = np.asarray(t_values, dtype=np.float64)
    if (t <= 0).any() or t.size < 3:
        raise ValueError("t_values must hold at least three positive values")
    runs = []
    for dead in tqdm(dead_counts, desc="bridge r", disable=not progress):
        generator = torch.Generator().manual_seed(seed)
        x, y = _bridge_data(width, dead, samples, noise, generator)
        model = DeepLinear(DeepLinearConfig(width=width, depth=depth)).to(DTYPE)
        readings = []
        for value in t:
            diagonal = torch.ones(width, dtype=DTYPE)
            diagonal[_dead_coordinates(width, dead)] = float(value)
            with torch.no_grad():
                for layer in model.layers:
                    layer.weight.copy_(torch.diag(diagonal))
            readings.append(dead_direction_signatures(model, x, y, loss=half_squared_error,
                                                      sites=_layer_sites(depth)))
        runs.append({"dead": dead, "layers": _fit_layers(t, readings, depth, dead, window=None)})
    return {
        "benchmark": "constructed_bridge",
        "config": {"depth": depth, "width": width, "dead_counts": list(dead_counts),
                   "t_values": t.tolist(), "samples": samples, "noise": noise, "seed": seed},
        "runs": runs,
        "ratios": _ratios(runs),
    }


def _dead_weight(model: DeepLinear, dead: int) -> float:
    """Geometric mean of |W_l[d, d]| over layers l and dead coordinates d: the bridge's t."""
    width = model.config.width
    entries = torch.cat([layer.weight.detach().diagonal()[_dead_coordinates(width, dead)]
                         for layer in model.layers])
    return float(entries.abs().log().mean().exp())


def noisy_bridge_sgd(*, depth: int = 3, width: int = 6, dead_counts: Sequence[int] = (1, 2, 3, 4),
                     steps: int = 20000, lr: float = 0.1, batch_size: int = 32, noise: float = 0.3,
                     initial_dead_weight: float = 1.0, checkpoints: int = 40,
                     probe_samples: int = 512, fit_t_max: float = 0.6, seed: int = 0,
                     progress: bool = False) -> dict[str, Any]:
    """The SGD-trained noisy bridge of dds.md §4.

    ``DeepLinear`` starts canonical-aligned: every layer is ``diag(1, ..., 1, w0, ..., w0)`` with
    r dead entries ``w0 = initial_dead_weight``; minibatch SGD on fresh noisy samples of the
    teacher ``diag(1, ..., 1, 0, ..., 0)`` shrinks the dead entries. DDS is read on a fixed probe
    set at ``checkpoints`` log-spaced steps, with t the measured dead-weight value (geometric mean
    of the dead diagonal entries). Slopes are fitted over the checkpoints with ``t <= fit_t_max``
    (early on, t near 1, the dead eigenvalues are not yet separated from the live ones).
    """
    record_at = sorted(set(np.unique(np.geomspace(10, steps, checkpoints).astype(int)).tolist()))
    runs = []
    for dead in dead_counts:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        probe_x, probe_y = _bridge_data(width, dead, probe_samples, noise, generator)
        model = DeepLinear(DeepLinearConfig(width=width, depth=depth)).to(DTYPE)
        diagonal = torch.ones(width, dtype=DTYPE)
        diagonal[_dead_coordinates(width, dead)] = initial_dead_weight
        with torch.no_grad():
            for layer in model.layers:
                layer.weight.copy_(torch.diag(diagonal))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        t_values, readings, losses = [], [], []
        start = time.perf_counter()
        for step in tqdm(range(1, steps + 1), desc=f"bridge SGD r={dead}", disable=not progress):
            x, y = _bridge_data(width, dead, batch_size, noise, generator)
            optimizer.zero_grad(set_to_none=True)
            loss = half_squared_error(model(x), y).mean()
            loss.backward()
            optimizer.step()
            if step in record_at:
                t_values.append(_dead_weight(model, dead))
                readings.append(dead_direction_signatures(model, probe_x, probe_y,
                                                          loss=half_squared_error,
                                                          sites=_layer_sites(depth)))
                losses.append(float(loss.detach()))
        t = np.asarray(t_values)
        window = (float(t.min()), fit_t_max)
        runs.append({"dead": dead, "steps_recorded": record_at, "t": t.tolist(),
                     "train_loss": losses, "wall_time_s": time.perf_counter() - start,
                     "layers": _fit_layers(t, readings, depth, dead, window=window)})
    return {
        "benchmark": "noisy_bridge_sgd",
        "config": {"depth": depth, "width": width, "dead_counts": list(dead_counts), "steps": steps,
                   "lr": lr, "batch_size": batch_size, "noise": noise,
                   "initial_dead_weight": initial_dead_weight, "checkpoints": checkpoints,
                   "probe_samples": probe_samples, "fit_t_max": fit_t_max, "seed": seed},
        "runs": runs,
        "ratios": _ratios(runs),
        "paper_ratios": {"2": 2.0, "3": 3.1, "4": 4.0},
    }


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
    config = ReducedRankRegressionConfig(inputs=M, outputs=N, width=H)
    model = ReducedRankRegression(config).to(DTYPE)
    with torch.no_grad():
        model.B.weight.copy_(u[:, :H] * s[:H].sqrt())
        model.A.weight.copy_(s[:H].sqrt()[:, None] * vt[:H])
    return model, x, y


def _gaussian_nll(noise: float):
    def nll(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return half_squared_error(outputs, targets) / noise**2
    return nll


def _timed_dds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss, sites: list[str],
               repeats: int) -> tuple[DDSReading, float]:
    reading = dead_direction_signatures(model, x, y, loss=loss, sites=sites)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        reading = dead_direction_signatures(model, x, y, loss=loss, sites=sites)
    return reading, (time.perf_counter() - start) / repeats


def calibrate_sgld(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss,
                   lrs: Sequence[float], localizations: Sequence[float], num_chains: int,
                   num_draws: int, batch_size: int, seed: int,
                   progress: bool = False) -> dict[str, Any]:
    """Sweep of SGLD step size and localization in the manner of devinterp's guidance, automated.

    Every (step size, localization) pair is run. A pair is *stable* when every chain stays finite,
    the estimate is positive and the loss trace has equilibrated: the mean loss of the last quarter
    of the draws differs from the third quarter's by at most 10 % of the LLC (in n_beta units).
    Among stable pairs the chosen one is where the LLC changes least between neighbouring step
    sizes at the same localization (the plateau of the LLC-vs-step-size curve). No true lambda
    is used. If no pair is stable, the least drifting one is returned with ``calibrated: False``.
    """
    from .llc import estimate_llc

    sweep = []
    grid = [(gamma, lr) for gamma in localizations for lr in lrs]
    for gamma, lr in tqdm(grid, desc="calibrate SGLD", disable=not progress):
        estimate = estimate_llc(model, x, y, loss=loss, lr=lr, localization=gamma,
                                num_chains=num_chains, num_draws=num_draws,
                                batch_size=batch_size, seed=seed)
        trace = np.asarray(estimate.loss_trace)
        quarter = trace.shape[1] // 4
        third, last = trace[:, 2 * quarter:3 * quarter].mean(), trace[:, 3 * quarter:].mean()
        drift = estimate.n_beta * abs(last - third)
        stable = bool(np.isfinite(trace).all() and len(estimate.llc_per_chain) == num_chains
                      and estimate.llc_mean > 0 and drift <= 0.1 * estimate.llc_mean)
        sweep.append({"lr": lr, "localization": gamma, "llc_mean": estimate.llc_mean,
                      "llc_std": estimate.llc_std, "equilibration_drift": drift,
                      "stable": stable, "wall_time_s": estimate.wall_time_s,
                      "forward_backward_passes": estimate.forward_backward_passes})

    def local_change(i: int) -> float:
        """Largest |log LLC ratio| to the neighbouring step sizes at the same localization."""
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(sweep)
                      and sweep[j]["localization"] == sweep[i]["localization"]]
        return max((abs(math.log(sweep[j]["llc_mean"] / sweep[i]["llc_mean"]))
                    if sweep[j]["llc_mean"] > 0 else math.inf for j in neighbours),
                   default=math.inf)

    for i, entry in enumerate(sweep):
        entry["local_change"] = local_change(i)
    candidates = [i for i, entry in enumerate(sweep) if entry["stable"]]
    if candidates:
        chosen = min(candidates, key=local_change)
        rule = ("stable and equilibrated; smallest relative LLC change to neighbouring step sizes "
                "at the same localization")
    else:  # nothing equilibrated: take the least drifting positive estimate, and say so
        positive = ([i for i, entry in enumerate(sweep) if entry["llc_mean"] > 0]
                    or list(range(len(sweep))))
        chosen = min(positive, key=lambda i: sweep[i]["equilibration_drift"]
                     / max(sweep[i]["llc_mean"], 1e-300))
        rule = ("NOT CALIBRATED: no setting equilibrated; chose the smallest drift relative to "
                "its LLC. Lengthen the chains or widen the sweep")
    return {"sweep": sweep, "chosen_lr": sweep[chosen]["lr"],
            "chosen_localization": sweep[chosen]["localization"],
            "calibrated": bool(candidates), "rule": rule}


def rrr_benchmark(*, M: int = 10, N: int = 5, widths: Sequence[int] = (2, 3, 4, 5),
                  samples: int = 1000, noise: float = 1.0, seed: int = 0,
                  sites: Sequence[str] = ("A:output", "B:output"), dds_repeats: int = 20,
                  run_llc: bool = True, calibration_cell: tuple[int, int] = (4, 2),
                  calibration_lrs: Sequence[float] = (5e-5, 1e-4, 2e-4, 4e-4, 8e-4),
                  calibration_localizations: Sequence[float] = (1.0, 10.0, 100.0),
                  localization: float | None = None, num_chains: int = 4, num_draws: int = 1000,
                  batch_size: int = 100, calibration_draws: int = 1000,
                  progress: bool = False) -> dict[str, Any]:
    """The reduced-rank regression grid: DDS and the devinterp LLC against the closed-form lambda.

    Every cell (H, r) gets its own teacher, data set and exact least-squares checkpoint (see
    :func:`rrr_checkpoint`); DDS reads ``sites`` there with one forward and one backward of the
    Gaussian negative log-likelihood, and the LLC (n_beta = n / log n) runs on the same checkpoint
    with the SGLD step size and localization calibrated once on ``calibration_cell`` (pass
    ``localization`` to fix it and sweep the step size only). Reports Spearman rho of each
    (site, observable) with lambda across cells, LLC / lambda per cell, and the wall time and
    forward-backward passes per checkpoint of both methods.
    """
    from .llc import estimate_llc

    cells = rrr_grid(M=M, N=N, widths=tuple(widths))
    nll = _gaussian_nll(noise)
    site_list = list(sites)
    calibration = None
    if run_llc:
        H0, r0 = calibration_cell
        model, x, y = rrr_checkpoint(M, N, H0, r0, samples=samples, noise=noise, seed=seed + 1000)
        localizations = calibration_localizations if localization is None else (localization,)
        estimate_llc(model, x, y, loss=nll, lr=calibration_lrs[0], localization=localizations[0],
                     num_chains=1, num_draws=5, batch_size=batch_size)  # warm-up, not timed
        calibration = calibrate_sgld(model, x, y, loss=nll, lrs=calibration_lrs,
                                     localizations=localizations, num_chains=2,
                                     num_draws=calibration_draws, batch_size=batch_size,
                                     seed=seed, progress=progress)
    rows = []
    for index, cell in enumerate(tqdm(cells, desc="rrr cells", disable=not progress)):
        coefficient = rrr_learning_coefficient(**cell)
        model, x, y = rrr_checkpoint(cell["M"], cell["N"], cell["H"], cell["r"], samples=samples,
                                     noise=noise, seed=seed + index)
        reading, dds_seconds = _timed_dds(model, x, y, nll, site_list, dds_repeats)
        row: dict[str, Any] = {**cell, "lambda": coefficient.lambda_, "case": coefficient.case,
                               "multiplicity": coefficient.multiplicity,
                               "dds": {r.site: r.as_dict() for r in reading.rows},
                               "dds_skipped": reading.skipped,
                               "dds_wall_time_s": dds_seconds, "dds_forward_backward_passes": 1,
                               "dds_samples_processed": samples}
        if run_llc:
            estimate = estimate_llc(model, x, y, loss=nll, lr=calibration["chosen_lr"],
                                    localization=calibration["chosen_localization"],
                                    num_chains=num_chains,
                                    num_draws=num_draws, batch_size=batch_size, seed=seed + index)
            row.update({"llc": estimate.as_dict(),
                        "llc_over_lambda": estimate.llc_mean / coefficient.lambda_})
        rows.append(row)

    lambdas = [row["lambda"] for row in rows]
    correlations = []
    for site in site_list:
        for name in (*SLOPE_OBSERVABLES, "rank_G", "rank_A"):
            values = [row["dds"][site][name] if site in row["dds"] else math.nan for row in rows]
            correlations.append({"site": site, "observable": name,
                                 "spearman_rho": spearman_rho(values, lambdas)})
    summary: dict[str, Any] = {
        "dds_wall_time_s_median": float(np.median([row["dds_wall_time_s"] for row in rows])),
        "dds_forward_backward_passes": 1,
    }
    if run_llc:
        ratios = [row["llc_over_lambda"] for row in rows]
        llc_times = [row["llc"]["wall_time_s"] for row in rows]
        summary.update({
            "llc_over_lambda_mean": float(np.mean(ratios)),
            "llc_over_lambda_min": float(np.min(ratios)),
            "llc_over_lambda_max": float(np.max(ratios)),
            "llc_spearman_rho": spearman_rho([row["llc"]["llc_mean"] for row in rows], lambdas),
            "llc_wall_time_s_median": float(np.median(llc_times)),
            "llc_forward_backward_passes": rows[0]["llc"]["forward_backward_passes"],
            "llc_samples_processed": rows[0]["llc"]["samples_processed"],
            "wall_time_ratio_llc_over_dds": float(np.median(llc_times))
            / summary["dds_wall_time_s_median"],
            "pass_ratio_llc_over_dds": rows[0]["llc"]["forward_backward_passes"],
            "sample_ratio_llc_over_dds": rows[0]["llc"]["samples_processed"] / samples,
        })
    return {
        "benchmark": "rrr_grid",
        "config": {"M": M, "N": N, "widths": list(widths), "samples": samples, "noise": noise,
                   "seed": seed, "sites": site_list, "dds_repeats": dds_repeats, "run_llc": run_llc,
                   "llc": None if not run_llc else {
                       "n_beta": "n / log n", "localization": localization,
                       "calibration_localizations": list(calibration_localizations),
                       "num_chains": num_chains, "num_draws": num_draws, "num_burnin_steps": 0,
                       "batch_size": batch_size, "calibration_cell": list(calibration_cell),
                       "calibration_lrs": list(calibration_lrs),
                       "calibration_draws": calibration_draws}},
        "calibration": calibration,
        "cells": rows,
        "spearman_with_lambda": correlations,
        "summary": summary,
    }


def _environment() -> dict[str, Any]:
    return {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "command": " ".join(["python", "-m",
                                                                  "gaugeopt.dds.benchmarks",
                                                                  *sys.argv[1:]])}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gaugeopt.dds.benchmarks",
                                     description="Run a DDS known-answer benchmark and write JSON.")
    parser.add_argument("benchmark", choices=("rrr", "bridge"))
    parser.add_argument("--out", required=True, type=Path, help="results JSON file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-llc", action="store_true", help="rrr: skip the devinterp LLC")
    parser.add_argument("--num-draws", type=int, default=1000, help="rrr: SGLD draws per chain")
    parser.add_argument("--calibration-draws", type=int, default=1000,
                        help="rrr: SGLD draws per chain in the step-size sweep")
    parser.add_argument("--steps", type=int, default=20000, help="bridge: SGD steps per run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the models are tiny: one thread is fastest)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = not args.quiet
    start = time.perf_counter()
    if args.benchmark == "rrr":
        results = rrr_benchmark(seed=args.seed, run_llc=not args.no_llc, num_draws=args.num_draws,
                                calibration_draws=args.calibration_draws, progress=progress)
    else:
        results = {"constructed": constructed_bridge(seed=args.seed, progress=progress),
                   "sgd": noisy_bridge_sgd(seed=args.seed, steps=args.steps, progress=progress)}
    results["environment"] = {**_environment(), "total_wall_time_s": time.perf_counter() - start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, allow_nan=True))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
