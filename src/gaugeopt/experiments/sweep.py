"""Per-arm learning-rate sweeps, run by a protocol written down before any of them (docs/experiments.md).

The protocol, fixed before a sweep is run:

* each arm is swept on its own, its every rate multiplied by one factor (``lr_scales``, see
  :func:`gaugeopt.experiments.training.arm_lr_scale`) from :data:`SCALES` = 1/4, 1/2, 1, 2, 4;
* one seed, :data:`SWEEP_SEED` = 100, which no evaluation preset uses, at the evaluation preset's
  own size and budget;
* the factor with the best :data:`SELECTION` reading wins (lower is better; a diverged or failed
  run ranks last); a winner at either end of the grid is reported as such (``at_edge``), and the
  sweep is then extended once by :func:`sweep_arm` with ``extend=True``;
* the winning factors are written into the preset's ``lr_scales`` in a commit of their own, before
  the evaluation seeds run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .registry import get_experiment
from .runfolder import read_results, to_json
from .runner import run_experiment

SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
SWEEP_SEED = 100


def _final_val_loss(results: dict[str, Any], arm: str) -> float:
    return results["metrics"][arm]["val_loss"]


def _steps_to_grok(results: dict[str, Any], arm: str) -> float:
    """Steps to grok, or the budget plus the final validation loss when the seed never groks."""
    steps = results.get("grok_steps", {}).get(arm, {}).get(str(SWEEP_SEED))
    if steps is not None:
        return float(steps)
    curve = results["curves"][arm][str(SWEEP_SEED)]
    return float(results["config"]["steps"]) + curve["val_loss"][-1]


# What a sweep minimises, per experiment: read from the sweep run's results.json.
SELECTION: dict[str, tuple[str, Callable[[dict[str, Any], str], float]]] = {
    "vit": ("final validation loss", _final_val_loss),
    "moe": ("final validation loss", _final_val_loss),
    "cnn": ("final validation loss", _final_val_loss),
    "grokking": ("steps to grok (never: the budget plus the final validation loss)", _steps_to_grok),
}


def sweep_arm(experiment: str, preset: str, arm: str, *, out: str | Path, scales: Sequence[float] = SCALES,
              seed: int = SWEEP_SEED, device: str = "auto", progress: bool = True, extend: bool = False,
              **overrides: Any) -> dict[str, Any]:
    """Run ``arm`` of ``experiment`` at ``preset`` once per factor in ``scales`` (one seed) and pick one.

    Each run goes to ``out/<arm>-x<factor>``; ``out/sweep-<arm>.json`` records every reading, the
    winner and whether it lies at an edge of the grid. With ``extend`` a winner at an edge is followed
    by one more factor beyond it (x2 or x1/2), once. ``overrides`` go to every run (e.g. ``steps``).
    """
    if experiment not in SELECTION:
        raise ValueError(f"no sweep protocol for {experiment!r}; sweeps exist for {sorted(SELECTION)}")
    name, metric = SELECTION[experiment]
    config = get_experiment(experiment).config(preset)
    if arm not in config.arms:
        raise ValueError(f"arm {arm!r} is not an arm of {experiment} ({list(config.arms)})")
    factors = sorted(float(f) for f in scales)
    if len(factors) < 3 or len(set(factors)) != len(factors) or factors[0] <= 0:
        raise ValueError(f"scales must be at least three distinct positive factors, got {list(scales)}")
    out = Path(out)
    readings: dict[float, float] = {}

    def run_factor(factor: float) -> None:
        path = out / f"{arm}-x{factor:g}"
        try:
            run_experiment(experiment, preset, seeds=[seed], device=device, out=path, progress=progress,
                           arms=(arm,), lr_scales=((arm, factor),), **overrides)
            value = metric(read_results(path), arm)
        except Exception:  # a failed or diverged run ranks last; its folder records why
            value = math.inf
        readings[factor] = value if value is not None and math.isfinite(value) else math.inf

    for factor in factors:
        run_factor(factor)
    best = min(readings, key=readings.get)
    if extend and best in (factors[0], factors[-1]):
        run_factor(best * (2.0 if best == factors[-1] else 0.5))
        best = min(readings, key=readings.get)
    grid = sorted(readings)
    summary = {"experiment": experiment, "preset": preset, "arm": arm, "seed": seed, "selection": name,
               "readings": {f"{f:g}": readings[f] for f in grid}, "chosen_scale": best,
               "at_edge": best in (grid[0], grid[-1]), "overrides": overrides}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sweep-{arm}.json").write_text(json.dumps(to_json(summary), indent=1))
    return summary
