"""readout-clock: which clock lets the readout rule read a *training* trajectory, checked on known answers.

On a training run the distance t to the singular set is unknown, so the rate readout of dds.md §3
reads its cells against a clock (:data:`gaugeopt.dds.CLOCKS`). Before any language-model cell is
counted, each clock is run here on trajectories whose answer is known, recorded exactly as
``overtrain-lm`` records (DDS on a fixed probe at checkpoints log-spaced over the whole run, chords
between them measured in the quotient metric of the gauges ``find_gauges`` discovers):

* the **SGD bridge** (:func:`~gaugeopt.experiments.bridge.bridge_sgd_trajectory`): a noisy
  minibatch-SGD approach with r = 1..4 dead directions and an r = 0 control;
* **reduced-rank regression** (:func:`~gaugeopt.experiments.rrr.rrr_gd_trajectory`): a noise-free
  gradient-descent approach, H - 1 excess units dying at every width H, with full-rank controls.

The ``"true-t"`` clock (the known distance, fitted where ``t <= true_t_max`` as the bridge protocol
does) is the reference; the other clocks read the whole run. A clock is *validated* on a family when,
fixed before the run: the 95 % interval over seeds of the fraction of planted cells it reads lies
above ``min_planted_fraction``; no control cell reads in any seed; and the read slopes are the
planted ones in one common unit (slope / planted within ``max_disproportion`` of its median on every
trajectory: a clock free of distance may rescale every rate, not distort their ratios).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dds import CLOCKS, rate_readout
from .bridge import bridge_sgd_trajectory, planted_cells
from .checks import UNIT, check_config, field_error
from .common import mean, score_against_planted
from .registry import Experiment
from .runner import RunContext
from .rrr import rrr_gd_trajectory, rrr_planted_cells
from .statistics import Verdict, interval_verdict, mean_interval

REFERENCE_CLOCK = "true-t"
FAMILIES = {"bridge": "SGD bridge", "rrr": "reduced-rank regression, gradient descent"}


@dataclass(frozen=True)
class ReadoutClockConfig:
    clocks: tuple[str, ...] = (REFERENCE_CLOCK, "arc-length", "inverse-step")
    checkpoints: int = 40  # log-spaced from step 10 to the end of each run
    probe_samples: int = 512
    true_t_max: float = 0.6  # the reference clock fits where the known t is at most this
    bridge_depth: int = 3
    bridge_width: int = 6
    bridge_dead_counts: tuple[int, ...] = (1, 2, 3, 4)
    bridge_steps: int = 6000
    bridge_lr: float = 0.1
    bridge_batch_size: int = 32
    bridge_noise: float = 0.3
    rrr_inputs: int = 10
    rrr_outputs: int = 5
    rrr_widths: tuple[int, ...] = (2, 3, 4, 5)
    rrr_steps: int = 6000
    rrr_lr: float = 0.05
    rrr_noise: float = 1.0
    min_planted_fraction: float = 0.9
    max_disproportion: float = 0.25
    seeds: tuple[int, ...] = (1, 2, 3)

    def __post_init__(self) -> None:
        check_config(self, positive=("checkpoints", "probe_samples", "true_t_max", "bridge_depth", "bridge_width",
                                     "bridge_dead_counts", "bridge_steps", "bridge_lr", "bridge_batch_size",
                                     "rrr_inputs", "rrr_outputs", "rrr_widths", "rrr_steps", "rrr_lr", "rrr_noise",
                                     "max_disproportion"),
                     non_negative=("bridge_noise",), within={"min_planted_fraction": UNIT},
                     choices={"clocks": (REFERENCE_CLOCK, *CLOCKS)})
        if 1 not in self.bridge_dead_counts:
            raise field_error(self, "bridge_dead_counts", "to include 1 (the control borrows its t)",
                              self.bridge_dead_counts)


def bridge_trajectories(c: ReadoutClockConfig, seed: int) -> list[dict[str, Any]]:
    """The SGD bridge at every r in ``bridge_dead_counts`` and the r = 0 control, with what each planted."""
    runs = []
    for dead in (*c.bridge_dead_counts, 0):
        trajectory = bridge_sgd_trajectory(depth=c.bridge_depth, width=c.bridge_width, dead=dead, steps=c.bridge_steps,
                                           lr=c.bridge_lr, batch_size=c.bridge_batch_size, noise=c.bridge_noise,
                                           checkpoints=c.checkpoints, probe_samples=c.probe_samples, seed=seed)
        runs.append({"name": f"r = {dead}", "trajectory": trajectory, "planted": planted_cells(c.bridge_depth, dead),
                     "reference": "r = 1" if dead == 0 else None})
    return runs


def rrr_trajectories(c: ReadoutClockConfig, seed: int) -> list[dict[str, Any]]:
    """Reduced-rank regression at every width H with r = 1 (H - 1 excess units) and the full-rank control."""
    runs = []
    for H in c.rrr_widths:
        for r in dict.fromkeys((1, H)):
            trajectory = rrr_gd_trajectory(c.rrr_inputs, c.rrr_outputs, H, r, steps=c.rrr_steps, lr=c.rrr_lr,
                                           noise=c.rrr_noise, checkpoints=c.checkpoints,
                                           probe_samples=c.probe_samples, seed=1000 * seed + 10 * H + r)
            runs.append({"name": f"H = {H}, r = {r}", "trajectory": trajectory,
                         "planted": rrr_planted_cells(H, r, c.rrr_outputs),
                         "reference": f"H = {H}, r = 1" if r == H and H > 1 else None})
    return runs


def read_with_clock(c: ReadoutClockConfig, runs: list[dict[str, Any]], clock: str) -> list[dict[str, Any]]:
    """The readout rule on every trajectory against ``clock``, scored against what it planted.

    On the reference clock a control with nothing planted reads against the t of its planted partner
    (same steps), and the fit window is ``t <= true_t_max``; any other clock reads the whole run.
    """
    by_name = {run["name"]: run for run in runs}
    scores = []
    for run in runs:
        source = by_name[run["reference"]] if clock == REFERENCE_CLOCK and run["reference"] else run
        t = source["trajectory"].clock(clock)
        window = (float(np.nanmin(t)), c.true_t_max) if clock == REFERENCE_CLOCK else None
        score = score_against_planted(rate_readout(t, run["trajectory"].readings, window=window), run["planted"])
        cells = [{**{k: cell[k] for k in ("site", "observable", "reads", "reason", "planted_slope")},
                  "slope": cell["fit"]["slope"] if cell["fit"] else None} for cell in score["cells"]]
        scores.append({"trajectory": run["name"], **{k: v for k, v in score.items() if k != "cells"}, "cells": cells})
    return scores


def run(config: ReadoutClockConfig, context: RunContext) -> None:
    c, folder = config, context.folder
    results: dict[str, dict[str, dict[str, list]]] = context.state.setdefault(
        "readouts", {family: {clock: {} for clock in c.clocks} for family in FAMILIES})
    for seed in context.bar(c.seeds, desc="readout-clock seeds"):
        for family, make in (("bridge", bridge_trajectories), ("rrr", rrr_trajectories)):
            if not context.start_unit(family, seed):
                continue
            with folder.timed(f"{family} seed {seed}"):
                runs = make(c, seed)
            for clock in c.clocks:
                results[family][clock][str(seed)] = read_with_clock(c, runs, clock)
            folder.results["readouts"] = results
            folder.flush()
    summarise(c, folder, results)


def summarise(c: ReadoutClockConfig, folder, results: dict[str, dict[str, dict[str, list]]]) -> None:
    validated = []
    rows = []
    for family, label in FAMILIES.items():
        for clock in c.clocks:
            by_seed = results[family][clock]
            fraction = {s: sum(t["planted_read"] for t in ts) / max(1, sum(t["planted"] for t in ts))
                        for s, ts in by_seed.items()}
            controls = {s: sum(t["controls_read"] for t in ts) for s, ts in by_seed.items()}
            control_total = sum(t["controls"] for t in next(iter(by_seed.values())))
            disproportion = {s: max((t["proportionality"] for t in ts if t["proportionality"] is not None),
                                    default=None) for s, ts in by_seed.items()}
            ratios = [v for ts in by_seed.values() for t in ts for v in t["slope_over_planted"].values()]
            interval = mean_interval(fraction)
            verdict = interval_verdict(interval, direction="above", threshold=c.min_planted_fraction)
            problems = []
            if any(controls.values()):
                problems.append("a control cell read")
            worst = max((d for d in disproportion.values() if d is not None), default=None)
            if worst is not None and worst > c.max_disproportion:
                problems.append(f"read slopes are not proportional to the planted ones (up to {worst:.0%} off)")
            if verdict.reproduced and problems:
                verdict = Verdict(False, "not validated", "; ".join(problems))
            elif verdict.reproduced:
                verdict = Verdict(True, "validated", verdict.reason + "; no control read; read slopes proportional "
                                                                      "to the planted ones")
            elif verdict.reproduced is False:
                verdict = Verdict(False, "not validated", "; ".join([verdict.reason, *problems]))
            if verdict.reproduced and clock != REFERENCE_CLOCK:
                validated.append(f"{clock} ({label})")
            slopes = (f"; read slope / planted {min(ratios):.2f}-{max(ratios):.2f}" if ratios else "")
            ours = (f"planted cells read: {interval.describe(2)}; control cells read per seed: "
                    f"{list(controls.values())} of {control_total}{slopes}")
            folder.add_claim(f"the readout reads the planted cells and no control ({label}, {clock} clock)",
                             "our validation of dds.md §3 on a training trajectory (no paper figure)", ours, verdict,
                             f"criterion: the 95 % interval over seeds of the fraction of planted cells read lies "
                             f"above {c.min_planted_fraction:g}, no control reads in any seed, and every read slope / "
                             f"planted slope lies within {c.max_disproportion:.0%} of its trajectory's median; "
                             f"{c.checkpoints} checkpoints log-spaced from step 10 to the end; "
                             + (f"fit where t <= {c.true_t_max:g}" if clock == REFERENCE_CLOCK else "the whole run"),
                             evidence={"planted_fraction": interval.as_dict(), "controls_read": controls,
                                       "disproportion": disproportion})
            folder.set_metric(f"{family}, {clock}", "planted cells read (mean fraction)", interval.mean)
            folder.set_metric(f"{family}, {clock}", "control cells read (total)", sum(controls.values()))
            rows.append([label, clock, f"{interval.mean:.2f}", sum(controls.values()),
                         f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-", verdict.label])
    folder.results["validated_clocks"] = validated
    folder.results["tables"] = [{"title": "the readout rule per clock", "rows": rows,
                                 "header": ["trajectories", "clock", "planted cells read (mean)",
                                            "control cells read (all seeds)", "read slope / planted", "verdict"],
                                 "note": "a clock counts for training runs only where it is validated on both "
                                         "families"}]
    folder.add_figure({"file": "planted_read_by_clock.png", "kind": "bar",
                       "title": "fraction of planted cells the readout reads, per clock (mean over seeds)",
                       "xlabel": "clock", "ylabel": "planted cells read",
                       "series": [{"label": label, "x": list(c.clocks),
                                   "y": [mean(sum(t["planted_read"] for t in ts) / max(1, sum(t["planted"] for t in ts))
                                              for ts in results[family][clock].values()) for clock in c.clocks]}
                                  for family, label in FAMILIES.items()],
                       "hlines": [{"y": c.min_planted_fraction, "label": "criterion"}]})


PRESETS = {
    "tiny": ReadoutClockConfig(checkpoints=10, probe_samples=64, bridge_width=4, bridge_dead_counts=(1,),
                               bridge_steps=200, rrr_widths=(2,), rrr_steps=200, seeds=(1,)),
    "smoke": ReadoutClockConfig(bridge_dead_counts=(1, 2), bridge_steps=3000, rrr_widths=(2, 4), rrr_steps=3000,
                                seeds=(1,)),
    "full": ReadoutClockConfig(seeds=(1, 2, 3, 4, 5)),
}

EXPERIMENT = Experiment(
    name="readout-clock",
    summary="the DDS readout on known-answer training trajectories (SGD bridge, RRR) against each clock",
    presets=PRESETS,
    run=run,
)
