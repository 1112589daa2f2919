"""bridge: the deep-linear bridge of dds.md §4, constructed and SGD-trained (noisy), r = 1..4.

Wraps :func:`gaugeopt.dds.benchmarks.constructed_bridge` and
:func:`gaugeopt.dds.benchmarks.noisy_bridge_sgd` into a run folder. Prediction: the logdet+(G) slope
at r dead directions is r times the r = 1 slope (ratios 2, 3, 4), while the lambda+_min(G) slope
does not depend on r (ratio 1, "rank-blind"). Paper (noisy SGD bridge): ratios 2.0, 3.1, 4.0.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import check_config
from .common import mean
from .registry import Experiment
from .runner import RunContext

PAPER_RATIOS = {2: 2.0, 3: 3.1, 4: 4.0}
TOLERANCE = 0.10


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
    constructed_depth: int = 4
    constructed_samples: int = 256
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        check_config(self, positive=("depth", "width", "dead_counts", "steps", "lr", "batch_size", "checkpoints",
                                     "probe_samples", "constructed_depth", "constructed_samples"),
                     non_negative=("noise",))


def mean_ratios(ratios: list[dict], name: str) -> dict[int, float | None]:
    """Per r, the mean over layers of ``<name>_ratio`` (slope at r over slope at r = 1)."""
    counts = sorted({entry["dead"] for entry in ratios})
    return {r: mean(e[f"{name}_ratio"] for e in ratios if e["dead"] == r) for r in counts}


def run(config: BridgeConfig, context: RunContext) -> None:
    from ..dds.benchmarks import constructed_bridge, noisy_bridge_sgd

    c, folder = config, context.folder
    by_seed = {}
    for seed in c.seeds:
        with folder.timed(f"constructed seed {seed}"):
            constructed = constructed_bridge(depth=c.constructed_depth, width=c.width, dead_counts=c.dead_counts,
                                             samples=c.constructed_samples, seed=seed, progress=context.progress)
        with folder.timed(f"sgd seed {seed}"):
            sgd = noisy_bridge_sgd(depth=c.depth, width=c.width, dead_counts=c.dead_counts, steps=c.steps,
                                   lr=c.lr, batch_size=c.batch_size, noise=c.noise, checkpoints=c.checkpoints,
                                   probe_samples=c.probe_samples, seed=seed, progress=context.progress)
        by_seed[seed] = {"constructed": constructed, "sgd": sgd}
        folder.results["benchmark"] = {str(s): v for s, v in by_seed.items()}
        folder.flush()
    table: dict[str, dict[int, float | None]] = {}
    for kind in ("constructed", "sgd"):
        for name in ("logdet_G", "lambda_min_G"):
            per_seed = [mean_ratios(by_seed[s][kind]["ratios"], name) for s in c.seeds]
            table[f"{kind} {name}"] = {r: mean(d.get(r) for d in per_seed) for r in c.dead_counts}
    for label, ratios in table.items():
        for r, value in ratios.items():
            folder.set_metric(label, f"ratio r={r}", value)
    higher = [r for r in c.dead_counts if r > 1]
    folder.add_figure({"file": "slope_ratios.png", "kind": "bar", "title": "slope ratio to r = 1 (mean over layers)",
                       "xlabel": "dead directions r", "ylabel": "ratio",
                       "series": [{"label": "predicted logdet+", "x": [str(r) for r in higher], "y": higher},
                                  {"label": "paper (SGD)", "x": [str(r) for r in higher],
                                   "y": [PAPER_RATIOS.get(r) for r in higher]},
                                  *({"label": label, "x": [str(r) for r in higher], "y": [v[r] for r in higher]}
                                    for label, v in table.items())]})
    first = by_seed[c.seeds[0]]["sgd"]
    folder.add_figure({"file": "sgd_dead_weight.png", "kind": "line", "xscale": "log", "yscale": "log",
                       "title": "SGD bridge: dead weight t along training", "xlabel": "step", "ylabel": "t",
                       "series": [{"label": f"r = {run['dead']}", "x": run["steps_recorded"][: len(run["t"])],
                                   "y": run["t"]} for run in first["runs"]]})
    for kind, anchor in (("sgd", "2.0, 3.1, 4.0 (noisy SGD bridge)"), ("constructed", "2, 3, 4 predicted")):
        ours = table[f"{kind} logdet_G"]
        ok = all(ours[r] is not None and abs(ours[r] - r) <= TOLERANCE * r for r in higher)
        folder.add_claim(f"logdet+(G) slope ratios count the dead directions ({kind} bridge)", anchor,
                         ", ".join(f"{ours[r]:.2f}" if ours[r] is not None else "—" for r in higher),
                         ok, f"criterion: each ratio within {TOLERANCE:.0%} of r = {higher}")
        blind = table[f"{kind} lambda_min_G"]
        folder.add_claim(f"lambda+_min(G) slope is rank-blind ({kind} bridge)", "ratio 1 at every r",
                         ", ".join(f"{blind[r]:.2f}" if blind[r] is not None else "—" for r in higher),
                         all(blind[r] is not None and abs(blind[r] - 1) <= TOLERANCE for r in higher),
                         f"criterion: each ratio within {TOLERANCE:.0%} of 1")


PRESETS = {
    "tiny": BridgeConfig(depth=2, width=4, dead_counts=(1, 2), steps=200, checkpoints=10, probe_samples=64,
                         constructed_depth=2, constructed_samples=64),
    "smoke": BridgeConfig(),
    "full": BridgeConfig(steps=6000, checkpoints=40, seeds=(0, 1)),
}

EXPERIMENT = Experiment(
    name="bridge",
    summary="deep-linear bridge, r = 1..4: logdet+ slope ratios count dead directions, lambda_min is rank-blind",
    presets=PRESETS,
    run=run,
)
