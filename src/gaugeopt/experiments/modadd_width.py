"""modadd-width: modular-addition transformers of growing d_model, read by DDS and by the LLC.

For each width a :class:`~gaugeopt.models.ModularAdditionTransformer` is trained with AdamW on a
fixed train split; at the final checkpoint DDS reads the monitored sites on a probe batch (one
forward and one backward) and devinterp's LLC runs SGLD at a fixed budget on the training set.
*Separation* of a reading: its Spearman rho with d_model and its span across widths in orders of
magnitude (log10 max/min for eigenvalue observables, (max - min) / ln 10 for logdet+ and the LLC's
log). Paper: DDS separates d_model across 18 orders of magnitude where the LLC at its protocol
budget stays flat (does not order them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import modular_addition_split
from ..dds import SLOPE_OBSERVABLES
from ..models import ModularAdditionConfig, ModularAdditionTransformer
from .checks import OPEN_UNIT, check_config
from .common import mean
from .registry import Experiment
from .runner import RunContext
from .statistics import band_verdict, interval_verdict, mean_interval, spearman_rho
from .training import OptimizerSettings, build_optimizer, train_loop

ORDERING_RHO = 0.8
# Fixed before the runs: the DDS reading whose separation of d_model the claim tests (the smallest
# positive eigenvalue of the head's per-sample-gradient second moment).
TRACKED_READING = "decoder.head:output lambda_min_G"


@dataclass(frozen=True)
class ModAddWidthConfig:
    modulus: int = 23
    train_fraction: float = 0.5
    widths: tuple[int, ...] = (16, 32, 64)
    n_layers: int = 1
    n_heads: int = 4
    ff_ratio: int = 4
    steps: int = 400
    eval_every: int = 100
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    probe_samples: int = 256
    run_llc: bool = True
    llc_lr: float = 1e-4
    llc_localization: float = 100.0
    llc_chains: int = 4
    llc_draws: int = 200
    llc_burnin: int = 200
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        check_config(self, positive=("modulus", "widths", "n_layers", "n_heads", "ff_ratio", "steps", "eval_every",
                                     "lr", "probe_samples", "llc_lr", "llc_localization", "llc_chains", "llc_draws"),
                     non_negative=("weight_decay", "warmup_steps", "llc_burnin"), within={"train_fraction": OPEN_UNIT},
                     divisible=[("widths", "n_heads")])


def per_sample_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def spearman(x: list[float], y: list[float]) -> float | None:
    rho = spearman_rho(x, y)
    return rho if math.isfinite(rho) else None


def orders_of_magnitude(values: list[float], kind: str) -> float | None:
    """Span across widths in decades: log10(max/min) for positive values, (max-min)/ln 10 for logs."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return None
    if kind == "linear":  # already a logarithm
        return (max(finite) - min(finite)) / math.log(10)
    if min(finite) <= 0:
        return None
    return math.log10(max(finite) / min(finite))


def run_width(c: ModAddWidthConfig, seed: int, width: int, data, context: RunContext) -> dict:
    """Train one width with AdamW, read DDS at the end and (optionally) the LLC under the calibrated
    protocol (full batch, burn-in dropped, estimates at llc_lr / 2, llc_lr, 2 llc_lr)."""
    from ..dds import dead_direction_signatures, scan_step_sizes

    folder, device = context.folder, context.device
    train_x, train_y = data.train_inputs.to(device), data.train_labels.to(device)
    val_x, val_y = data.val_inputs.to(device), data.val_labels.to(device)
    probe_x, probe_y = train_x[: c.probe_samples], train_y[: c.probe_samples]
    torch.manual_seed(seed)
    model = ModularAdditionTransformer(ModularAdditionConfig(
        modulus=c.modulus, d_model=width, n_layers=c.n_layers, n_heads=c.n_heads,
        d_ff=c.ff_ratio * width)).to(device)
    settings = OptimizerSettings(lr=c.lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps)
    optimizer = build_optimizer("adamw", model, settings, c.steps)

    def evaluate() -> dict[str, float]:
        return {"train_loss": F.cross_entropy(model(train_x), train_y).item(),
                "val_acc": (model(val_x).argmax(-1) == val_y).float().mean().item()}

    label = f"d_model {width}"
    with folder.timed(f"train {label} seed {seed}"), context.bar(total=c.steps, desc=label) as bar:
        outcome = train_loop(model=model, optimizer=optimizer, steps=c.steps,
                             batch_loss=lambda step: F.cross_entropy(model(train_x), train_y),
                             evaluate=evaluate, eval_every=c.eval_every, bar=bar,
                             on_eval=lambda step, m: folder.log_point(label, seed, step=step, **m))
    model.eval()
    start = time.perf_counter()
    reading = dead_direction_signatures(model, probe_x, probe_y, loss=per_sample_cross_entropy, sites=dds_sites(c))
    entry = {"d_model": width, "seed": seed, **outcome["last"], "dds": {r.site: r.as_dict() for r in reading.rows},
             "dds_skipped": reading.skipped, "dds_wall_time_s": time.perf_counter() - start, "llc": None}
    if c.run_llc:
        with folder.timed(f"llc {label} seed {seed}"):
            scan = scan_step_sizes(model, train_x, train_y, loss=per_sample_cross_entropy,
                                   step_sizes=(c.llc_lr / 2, c.llc_lr, 2 * c.llc_lr), localization=c.llc_localization,
                                   num_chains=c.llc_chains, num_draws=c.llc_draws, num_burnin_steps=c.llc_burnin,
                                   seed=seed, device=str(device))
        entry["llc"] = scan.chosen.as_dict()
        entry["llc_step_scan"] = scan.as_dict()
    return entry


def dds_sites(c: ModAddWidthConfig) -> list[str]:
    return ["decoder.head", f"decoder.blocks.{c.n_layers - 1}.ffn.down"]


def run(config: ModAddWidthConfig, context: RunContext) -> None:
    c, folder = config, context.folder
    per_width: list[dict] = context.state.setdefault("per_width", [])
    for seed in c.seeds:
        data = modular_addition_split(c.modulus, c.train_fraction, seed=seed)
        for width in c.widths:
            if not context.start_unit(f"d_model {width}", seed):
                continue
            per_width.append(run_width(c, seed, width, data, context))
            folder.results["widths"] = per_width
            folder.flush()
    summarise(c, folder, per_width)


def summarise(c: ModAddWidthConfig, folder, per_width: list[dict]) -> None:
    widths = [float(w) for w in c.widths]
    seeds = list(dict.fromkeys(e["seed"] for e in per_width))
    by_seed = {s: sorted((e for e in per_width if e["seed"] == s), key=lambda e: e["d_model"]) for s in seeds}
    rows = []
    for site in dict.fromkeys(f"{s}:output" for s in dds_sites(c)):
        for name, kind in SLOPE_OBSERVABLES.items():
            rows.append({"reading": f"DDS {site} {name}", "kind": kind,
                         "values": {s: [e["dds"].get(site, {}).get(name) for e in by_seed[s]] for s in seeds}})
    if c.run_llc:
        rows.append({"reading": "LLC", "kind": "log",
                     "values": {s: [e["llc"]["llc_mean"] for e in by_seed[s]] for s in seeds}})
    for row in rows:
        row["rho"] = {s: spearman(v, widths) if None not in v else None for s, v in row["values"].items()}
        row["orders"] = {s: orders_of_magnitude(v, row["kind"]) for s, v in row["values"].items()}
        folder.set_metric(row["reading"], "Spearman rho with d_model (mean over seeds)", mean(row["rho"].values()))
        folder.set_metric(row["reading"], "span (orders of magnitude, mean over seeds)", mean(row["orders"].values()))
    folder.results["separation"] = rows
    first = seeds[0]
    folder.add_figure({"file": "readings_vs_width.png", "kind": "line", "xscale": "log",
                       "title": f"readings against d_model, relative to the smallest width (seed {first})",
                       "xlabel": "d_model", "ylabel": "log10(reading / reading at the smallest width)",
                       "series": [{"label": row["reading"].replace("decoder.", "").replace(":output", ""),
                                   "x": widths, "y": [_decades(v, row["values"][first][0], row["reading"])
                                                      for v in row["values"][first]]}
                                  for row in rows]})
    tracked = next(r for r in rows if r["reading"] == f"DDS {TRACKED_READING}")
    rho = mean_interval(tracked["rho"])
    orders = mean(tracked["orders"].values())
    verdict = (interval_verdict(rho, direction="above", threshold=ORDERING_RHO) if (rho.mean or 0) >= 0
               else interval_verdict(rho, direction="below", threshold=-ORDERING_RHO))
    folder.add_claim("DDS separates d_model", "across 18 orders of magnitude",
                     f"{TRACKED_READING} (fixed before the run): rho {rho.describe(2)}, span "
                     + (f"{orders:.1f} orders (mean over seeds)" if orders is not None else "undefined"),
                     verdict, f"criterion: the 95 % interval over seeds of Spearman rho with d_model lies beyond "
                              f"+-{ORDERING_RHO}; widths {list(c.widths)}; every reading's rho is in the metrics",
                     evidence={"rho": rho.as_dict(), "orders": tracked["orders"]})
    if not c.run_llc:
        return
    llc = rows[-1]
    rho = mean_interval(llc["rho"])
    folder.add_claim("the LLC at its protocol budget does not order d_model", "LLC flat",
                     f"rho {rho.describe(2)}, span {mean(llc['orders'].values()) or float('nan'):.2f} orders",
                     band_verdict(rho, low=-ORDERING_RHO, high=ORDERING_RHO),
                     f"criterion: the 95 % interval over seeds of the LLC's Spearman rho with d_model lies inside "
                     f"(-{ORDERING_RHO}, {ORDERING_RHO}); full-batch SGLD, step {c.llc_lr} (also /2 and x2 on "
                     f"record), localization {c.llc_localization}, {c.llc_chains} chains x ({c.llc_burnin} burn-in "
                     f"+ {c.llc_draws} draws)", evidence={"rho": rho.as_dict()})


def _decades(value: float, reference: float, reading: str) -> float | None:
    if value is None or reference is None:
        return None
    if "logdet" in reading:
        return (value - reference) / math.log(10)
    if value <= 0 or reference <= 0:
        return None
    return math.log10(value / reference)


PRESETS = {
    "tiny": ModAddWidthConfig(modulus=7, widths=(8, 16), n_heads=2, steps=10, eval_every=5, warmup_steps=2,
                              probe_samples=16, run_llc=False, llc_chains=2, llc_draws=10, llc_burnin=5),
    "smoke": ModAddWidthConfig(widths=(16, 32, 64, 128), llc_chains=2, llc_draws=100, llc_burnin=100),
    "full": ModAddWidthConfig(modulus=31, train_fraction=0.5, widths=(16, 32, 64, 128), steps=800, eval_every=100,
                              seeds=(0, 1, 2)),
}

EXPERIMENT = Experiment(
    name="modadd-width",
    summary="modular-addition transformers of growing d_model: DDS vs LLC separation",
    presets=PRESETS,
    run=run,
)
