"""bridge: the deep-linear bridge of dds.md §4, constructed and SGD-trained (noisy), r = 1..4.

The chain ``f(x) = W_L ... W_1 x`` (D x D) learns the teacher ``diag(1, ..., 1, 0, ..., 0)`` with r
zeros. At the output of layer l the r dead eigenvalues of G decay as ``t^(2(L-l))`` and those of A
as ``t^(2l)`` (t the dead weight), so the ``lambda+_min(G)`` slope is ``2(L-l)`` for every r
("rank-blind") while the ``logdet+(G)`` slope is ``r * 2(L-l)``: the ratio to r = 1 counts the
dead directions. Paper (noisy SGD bridge): ratios 2.0, 3.1, 4.0.

* :func:`constructed_bridge` places the chain *on* the path, every layer ``diag(1, .., 1, t, .., t)``.
* :func:`bridge_sgd_trajectory` trains it by minibatch SGD on fresh noisy samples from a
  canonical-aligned (diagonal) start; t is the measured dead weight (geometric mean of the dead
  diagonal entries). :func:`noisy_bridge_sgd` runs it for each r, fits slopes, and applies the
  readout rule of :mod:`gaugeopt.dds.slopes`: the planted cells (A at every layer, G at layers
  1..L-1) should read and the control cells (G at the output, where the residual is label noise,
  and every cell of an r = 0 run with nothing planted) should not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..dds import SLOPE_OBSERVABLES, DDSReading, dead_direction_signatures, fit_slope, log_spaced_steps, rate_readout
from ..models import DeepLinear, DeepLinearConfig
from .checks import AT_LEAST_TWO, check_config, field_error
from .common import RecordedTrajectory, half_squared_error, mean, record_trajectory, score_against_planted
from .registry import Experiment
from .runner import RunContext
from .statistics import Verdict, band_verdict, interval_verdict, mean_interval

DTYPE = torch.float64
PAPER_RATIOS = {2: 2.0, 3: 3.1, 4: 4.0}
TOLERANCE = 0.10


def _dead_coordinates(width: int, dead: int) -> slice:
    if not 0 <= dead < width:
        raise ValueError(f"need 0 <= dead < width, got dead={dead}, width={width}")
    return slice(width - dead, width)


def bridge_data(width: int, dead: int, samples: int, noise: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I); y = teacher x + noise, teacher = diag(1, ..., 1, 0, ..., 0) with r zeros."""
    x = torch.randn(samples, width, generator=generator, dtype=DTYPE)
    teacher = torch.ones(width, dtype=DTYPE)
    teacher[_dead_coordinates(width, dead)] = 0.0
    y = x * teacher + noise * torch.randn(samples, width, generator=generator, dtype=DTYPE)
    return x, y


def layer_sites(depth: int) -> list[str]:
    """The output of every layer; ``layers.{l-1}:output`` is the output of layer l."""
    return [f"layers.{i}:output" for i in range(depth)]


def planted_cells(depth: int, dead: int) -> dict[str, float]:
    """``"site:observable" -> planted slope`` of the cells a dead direction makes decay.

    A side at layer l: ``2 l`` per direction; G side at layer l < L: ``2 (L - l)``. The G side at
    the output is the label-noise residual and decays at no rate: it is a control.
    """
    if dead == 0:
        return {}
    planted = {}
    for layer in range(1, depth + 1):
        site = f"layers.{layer - 1}:output"
        planted[f"{site}:lambda_min_A"], planted[f"{site}:logdet_A"] = 2 * layer, 2 * dead * layer
        if layer < depth:
            planted[f"{site}:lambda_min_G"] = 2 * (depth - layer)
            planted[f"{site}:logdet_G"] = 2 * dead * (depth - layer)
    return planted


def _fit_layers(t: np.ndarray, readings: list[DDSReading], depth: int, dead: int,
                window: tuple[float, float] | None) -> list[dict[str, Any]]:
    """Per layer l < L: fits of the G- and A-side observables against log t, with predictions."""
    layers = []
    for layer in range(1, depth):
        site = f"layers.{layer - 1}:output"
        rows = [reading.row(site) for reading in readings]
        fits = {name: fit_slope(t, [getattr(row, name) for row in rows], kind=kind, window=window)
                for name, kind in SLOPE_OBSERVABLES.items()}
        layers.append({
            "layer": layer, "site": site,
            "fits": {name: fit.as_dict() for name, fit in fits.items()},
            "predicted": {"lambda_min_G": 2 * (depth - layer), "logdet_G": 2 * dead * (depth - layer),
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
        if run["dead"] == 0:
            continue
        for layer, base_layer in zip(run["layers"], base["layers"]):
            entry = {"dead": run["dead"], "layer": layer["layer"]}
            for name in ("logdet_G", "lambda_min_G", "logdet_A", "lambda_min_A"):
                entry[f"{name}_ratio"] = layer["fits"][name]["slope"] / base_layer["fits"][name]["slope"]
            out.append(entry)
    return out


def _set_diagonal(model: DeepLinear, dead: int, value: float) -> None:
    diagonal = torch.ones(model.config.width, dtype=DTYPE)
    diagonal[_dead_coordinates(model.config.width, dead)] = value
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.copy_(torch.diag(diagonal))


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
        x, y = bridge_data(width, dead, samples, noise, generator)
        model = DeepLinear(DeepLinearConfig(width=width, depth=depth)).to(DTYPE)
        readings = []
        for value in t:
            _set_diagonal(model, dead, float(value))
            readings.append(dead_direction_signatures(model, x, y, loss=half_squared_error,
                                                      sites=layer_sites(depth)))
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


def bridge_sgd_trajectory(*, depth: int, width: int, dead: int, steps: int, lr: float, batch_size: int,
                          noise: float, initial_dead_weight: float = 1.0, checkpoints: int = 40,
                          probe_samples: int = 512, seed: int = 0, progress: bool = False) -> RecordedTrajectory:
    """Train the bridge with r = ``dead`` dead directions by minibatch SGD and read DDS along the way.

    The chain starts canonical-aligned, every layer ``diag(1, ..., 1, w0, ..., w0)`` with
    ``w0 = initial_dead_weight``; each step draws a fresh noisy batch of the teacher. DDS is read on
    a fixed probe set at ``checkpoints`` log-spaced steps from step 10 to the end; the true t is the
    dead weight (NaN for ``dead = 0``, the control with nothing planted), and the remaining arc
    length is measured in the quotient metric of the chain's neuron scalings.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe_x, probe_y = bridge_data(width, dead, probe_samples, noise, generator)
    model = DeepLinear(DeepLinearConfig(width=width, depth=depth)).to(DTYPE)
    _set_diagonal(model, dead, initial_dead_weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    bar = tqdm(total=steps, desc=f"bridge SGD r={dead}", disable=not progress)

    def train_step(step: int) -> float:
        x, y = bridge_data(width, dead, batch_size, noise, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = half_squared_error(model(x), y).mean()
        loss.backward()
        optimizer.step()
        bar.update(1)
        return float(loss.detach())

    with bar:
        return record_trajectory(model, (probe_x, probe_y), loss=half_squared_error, sites=layer_sites(depth),
                                 steps=steps, record_at=log_spaced_steps(10, steps, checkpoints),
                                 train_step=train_step, gauge_example=probe_x[:2],
                                 true_t=lambda: _dead_weight(model, dead) if dead else float("nan"))


def read_planted_cells(t: np.ndarray, readings: list[DDSReading], *, depth: int, dead: int,
                       window: tuple[float, float] | None) -> dict[str, Any]:
    """The readout rule on a bridge trajectory, scored against what was planted
    (:func:`~gaugeopt.experiments.common.score_against_planted`)."""
    return score_against_planted(rate_readout(t, readings, window=window), planted_cells(depth, dead))


def noisy_bridge_sgd(*, depth: int = 3, width: int = 6, dead_counts: Sequence[int] = (1, 2, 3, 4),
                     steps: int = 20000, lr: float = 0.1, batch_size: int = 32, noise: float = 0.3,
                     initial_dead_weight: float = 1.0, checkpoints: int = 40,
                     probe_samples: int = 512, fit_t_max: float = 0.6, control: bool = True, seed: int = 0,
                     progress: bool = False) -> dict[str, Any]:
    """The SGD-trained noisy bridge of dds.md §4, its slope ratios and the readout rule's score.

    Slopes are fitted over the checkpoints with ``t <= fit_t_max`` (early on, t near 1, the dead
    eigenvalues are not yet separated from the live ones). With ``control``, an r = 0 run (nothing
    planted) is read against the t of the r = 1 run at the same steps.
    """
    runs, reference_t = [], None
    options = dict(depth=depth, width=width, steps=steps, lr=lr, batch_size=batch_size, noise=noise,
                   initial_dead_weight=initial_dead_weight, checkpoints=checkpoints,
                   probe_samples=probe_samples, seed=seed, progress=progress)
    for dead in [*dead_counts, *([0] if control else [])]:
        run = bridge_sgd_trajectory(dead=dead, **options)
        t = run.t if dead else reference_t
        if t is None:
            raise ValueError("the r = 0 control needs an r >= 1 run to borrow its t from")
        reference_t = run.t if dead == 1 or reference_t is None else reference_t
        window = (float(np.nanmin(t)), fit_t_max)
        entry = {"dead": dead, "steps_recorded": run.steps, "t": t.tolist(), "train_loss": run.train_loss,
                 "wall_time_s": run.wall_time_s,
                 "readout": read_planted_cells(t, run.readings, depth=depth, dead=dead, window=window)}
        if dead:
            entry["layers"] = _fit_layers(t, run.readings, depth, dead, window=window)
        runs.append(entry)
    planted_runs = [run for run in runs if run["dead"]]
    return {
        "benchmark": "noisy_bridge_sgd",
        "config": {"depth": depth, "width": width, "dead_counts": list(dead_counts), "steps": steps,
                   "lr": lr, "batch_size": batch_size, "noise": noise,
                   "initial_dead_weight": initial_dead_weight, "checkpoints": checkpoints,
                   "probe_samples": probe_samples, "fit_t_max": fit_t_max, "control": control, "seed": seed},
        "runs": runs,
        "ratios": _ratios(planted_runs),
        "paper_ratios": {"2": 2.0, "3": 3.1, "4": 4.0},
    }


@dataclass(frozen=True)
class BridgeConfig:
    depth: int = 3
    width: int = 6
    dead_counts: tuple[int, ...] = (1, 2, 3, 4)
    steps: int = 4000  # SGD steps per r
    lr: float = 0.1
    batch_size: int = 32
    noise: float = 0.3
    checkpoints: int = 30
    probe_samples: int = 512
    fit_t_max: float = 0.6
    constructed_depth: int = 4
    constructed_samples: int = 256
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        check_config(self, positive=("depth", "width", "dead_counts", "steps", "lr", "batch_size",
                                     "probe_samples", "fit_t_max", "constructed_depth", "constructed_samples"),
                     non_negative=("noise",), within={"checkpoints": AT_LEAST_TWO})
        if max(self.dead_counts) >= self.width:
            raise field_error(self, "dead_counts", f"below width={self.width}", self.dead_counts)


def mean_ratios(ratios: list[dict], name: str) -> dict[int, float | None]:
    """Per r, the mean over layers of ``<name>_ratio`` (slope at r over slope at r = 1)."""
    counts = sorted({entry["dead"] for entry in ratios})
    return {r: mean(e[f"{name}_ratio"] for e in ratios if e["dead"] == r) for r in counts}


def run(config: BridgeConfig, context: RunContext) -> None:
    c, folder = config, context.folder
    by_seed = context.state.setdefault("by_seed", {})
    for seed in c.seeds:
        if not context.start_unit("bridge", seed):
            continue
        with folder.timed(f"constructed seed {seed}"):
            constructed = constructed_bridge(depth=c.constructed_depth, width=c.width, dead_counts=c.dead_counts,
                                             samples=c.constructed_samples, seed=seed, progress=context.progress)
        with folder.timed(f"sgd seed {seed}"):
            sgd = noisy_bridge_sgd(depth=c.depth, width=c.width, dead_counts=c.dead_counts, steps=c.steps,
                                   lr=c.lr, batch_size=c.batch_size, noise=c.noise, checkpoints=c.checkpoints,
                                   probe_samples=c.probe_samples, fit_t_max=c.fit_t_max, seed=seed,
                                   progress=context.progress)
        by_seed[seed] = {"constructed": constructed, "sgd": sgd}
        folder.results["benchmark"] = {str(s): v for s, v in by_seed.items()}
        folder.flush()
    higher = [r for r in c.dead_counts if r > 1]
    per_seed = {kind: {name: {seed: mean_ratios(by_seed[seed][kind]["ratios"], name) for seed in c.seeds}
                       for name in ("logdet_G", "lambda_min_G")} for kind in ("constructed", "sgd")}
    for kind, names in per_seed.items():
        for name, seeds in names.items():
            for r in higher:
                folder.set_metric(f"{kind} {name}", f"ratio r={r}", mean(d.get(r) for d in seeds.values()))
    table = {f"{kind} {name}": {r: mean(d.get(r) for d in seeds.values()) for r in higher}
             for kind, names in per_seed.items() for name, seeds in names.items()}
    folder.add_figure({"file": "slope_ratios.png", "kind": "bar",
                       "title": "slope at r dead directions / slope at r = 1 (mean over layers and seeds)",
                       "xlabel": "dead directions r", "ylabel": "slope ratio",
                       "series": [{"label": "predicted for logdet+ (= r)", "x": [str(r) for r in higher],
                                   "y": higher},
                                  {"label": "paper, SGD bridge", "x": [str(r) for r in higher],
                                   "y": [PAPER_RATIOS.get(r) for r in higher]},
                                  *({"label": label.replace("_", " ").replace("lambda min", "lambda+_min")
                                              .replace("logdet", "logdet+"),
                                     "x": [str(r) for r in higher], "y": [v[r] for r in higher]}
                                    for label, v in table.items())],
                       "hlines": [{"y": 1.0, "label": "rank-blind (= 1)"}]})
    first = by_seed[c.seeds[0]]["sgd"]
    folder.add_figure({"file": "sgd_dead_weight.png", "kind": "line", "xscale": "log", "yscale": "log",
                       "title": f"SGD bridge: dead weight t along training (seed {c.seeds[0]})",
                       "xlabel": "SGD step", "ylabel": "dead weight t (geometric mean)",
                       "series": [{"label": f"r = {run['dead']}", "x": run["steps_recorded"][: len(run["t"])],
                                   "y": run["t"]} for run in first["runs"] if run["dead"]],
                       "hlines": [{"y": c.fit_t_max, "label": f"fit window t <= {c.fit_t_max}"}]})
    for kind, anchor in (("sgd", "2.0, 3.1, 4.0 (noisy SGD bridge)"), ("constructed", "2, 3, 4 predicted")):
        for name, claim, target_of in (
                ("logdet_G", f"logdet+(G) slope ratios count the dead directions ({kind} bridge)", lambda r: r),
                ("lambda_min_G", f"lambda+_min(G) slope is rank-blind ({kind} bridge)", lambda r: 1)):
            intervals = {r: mean_interval({s: d.get(r) for s, d in per_seed[kind][name].items()}) for r in higher}
            verdicts = [band_verdict(intervals[r], low=(1 - TOLERANCE) * target_of(r),
                                     high=(1 + TOLERANCE) * target_of(r)) for r in higher]
            decided = [v.reproduced for v in verdicts]
            reproduced = None if None in decided else all(decided)
            label = {True: "reproduced", False: "not reproduced", None: "not decided"}[reproduced]
            folder.add_claim(claim, anchor if name == "logdet_G" else "ratio 1 at every r",
                             "; ".join(f"r={r}: {intervals[r].describe(2)}" for r in higher),
                             Verdict(reproduced, label, verdicts[0].reason if reproduced is None else
                                     f"per r: {', '.join(v.label for v in verdicts)}"),
                             f"criterion: the 95 % interval over seeds of each ratio (mean over layers) lies within "
                             f"{TOLERANCE:.0%} of {'r' if name == 'logdet_G' else '1'}",
                             evidence={str(r): intervals[r].as_dict() for r in higher})
    readouts = {seed: [run["readout"] for run in by_seed[seed]["sgd"]["runs"]] for seed in c.seeds}
    planted_fraction = {seed: sum(r["planted_read"] for r in runs) / max(1, sum(r["planted"] for r in runs))
                        for seed, runs in readouts.items()}
    controls_read = {seed: sum(r["controls_read"] for r in runs) for seed, runs in readouts.items()}
    controls = sum(r["controls"] for r in readouts[c.seeds[0]])
    for seed in c.seeds:
        folder.set_metric("readout rule", f"planted cells read, seed {seed}", planted_fraction[seed])
        folder.set_metric("readout rule", f"control cells read, seed {seed}", controls_read[seed])
    interval = mean_interval(planted_fraction)
    verdict = interval_verdict(interval, direction="above", threshold=0.9)
    if verdict.reproduced and any(controls_read.values()):
        verdict = Verdict(False, "not reproduced", "a control cell read")
    folder.add_claim("the readout rule reads the planted cells and no control (SGD bridge)",
                     "our validation of dds.md §3 (no paper figure)",
                     f"planted cells read: {interval.describe(2)}; control cells read per seed: "
                     f"{list(controls_read.values())} of {controls}",
                     verdict, "criterion: the 95 % interval of the fraction of planted cells read lies above 0.9 "
                              "and no control cell reads in any seed", evidence={"planted_fraction": interval.as_dict(),
                                                                         "controls_read": controls_read})


PRESETS = {
    "tiny": BridgeConfig(depth=2, width=4, dead_counts=(1, 2), steps=200, checkpoints=10, probe_samples=64,
                         constructed_depth=2, constructed_samples=64, seeds=(0,)),
    "smoke": BridgeConfig(seeds=(0,)),
    "full": BridgeConfig(steps=6000, checkpoints=40, seeds=(0, 1, 2, 3, 4)),
}

EXPERIMENT = Experiment(
    name="bridge",
    summary="deep-linear bridge, r = 1..4: logdet+ slope ratios count dead directions, lambda_min is rank-blind",
    presets=PRESETS,
    run=run,
)
