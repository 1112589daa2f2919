"""overtrain-lm: a character-level LM trained far past its point of fit, AdamW vs DDCAdam.

Protocol (docs/experiments.md): a pre-norm decoder (RoPE, RMSNorm, SwiGLU, untied head) on a small
training split of a Shakespeare text, so the model memorises it; every arm shares the model seed,
batches, learning-rate schedule (linear warm-up, then a constant rate) and budget, at each weight
decay in ``weight_decays``. Arms:

* ``adamw``: ``torch.optim.AdamW``; its decoupled weight decay pulls the RMSNorm gains toward 0;
* ``adamw-gains-undecayed``: AdamW with no decay on the norm gains (run only where weight decay is
  on): DDCAdam holds the gains fixed and decays the merged consumer weights ``C diag(g)``, the same
  as decaying the consumers with the gains alone, so this arm differs from DDCAdam by the gauge only;
* ``ddc-adam``: DDCAdam.

Measured along training (every ``eval_every`` steps, fixed windows, eval mode): training and
validation loss and their gap, the mean norm gain, the RMS of the LM head's logits (centred over
the vocabulary: the logit-shift gauge leaves them unchanged), and the orbit drift of the norm
gains (``log|g|``) and of the FFN neurons (``log(|in| / |out|)``) since the start. At the end: the
gap, the best validation loss and how far the final one sits above it (over-training), and the
dead-direction readout of dds.md §3 over the second half of each run (t = remaining arc length in
the quotient metric). Claims are paired by seed (mean difference and 95 % interval; a verdict needs
3 seeds). Paper anchor: gap 0.67 (DDCAdam) vs 5.88 (AdamW); readable cells 32/65 vs 7/65.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data import char_lm_split, lm_eval_windows, load_text, sample_lm_batch
from ..gauges import NeuronScaling, NormScaling, find_gauges
from ..models import TransformerLM, TransformerLMConfig
from .checks import OPEN_UNIT, START_FRACTION, UNIT, check_config
from .common import ARM_LABELS, mean, readable_cells_along_run
from .registry import Experiment
from .runner import RunContext
from .statistics import Verdict, interval_verdict, paired_difference
from .training import GAUGE_PROBE_POSITIONS, OptimizerSettings, seeded_arm, train_arm

GAP_ANCHOR = {"ddc-adam": 0.67, "adamw": 5.88}
OVERTRAINING_NATS = 0.1  # a run over-trains when its final validation loss is this far above its best
GAIN_STATEMENT = (
    "How each arm treats the RMSNorm gains under weight decay: torch.optim.AdamW decays every "
    "parameter, so with weight decay > 0 it pulls the gains toward 0 (and moves the head's mean row, "
    "a pure gauge direction); DDCAdam neither steps nor decays the gains and decays the merged consumer "
    "weights C diag(g) instead, which is decaying the consumers with the gains held. The arm 'AdamW, "
    "gains undecayed' gives AdamW DDCAdam's treatment (no decay on the gains), so at weight decay > 0 "
    "it and DDCAdam differ by the gauge only; at weight decay 0 AdamW and DDCAdam already do. "
    "(DDCAdam's treatment as documented in docs/ddc.md for the optimizer core of this commit.)")


@dataclass(frozen=True)
class OvertrainLMConfig:
    works: tuple[str, ...] = ("hamlet_gut",)
    train_chars: int = 16_384  # a small training split: the model passes its point of fit
    val_fraction: float = 0.1
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 176
    seq_len: int = 64
    batch_size: int = 32
    steps: int = 600
    eval_every: int = 50
    eval_windows: int = 64  # fixed windows for the train and validation losses
    lr: float = 3e-3
    weight_decays: tuple[float, ...] = (0.0,)
    warmup_steps: int = 30
    min_lr_ratio: float = 1.0  # 1: constant rate after warm-up
    dds_checkpoints: int = 16  # DDS snapshots along each run (0 turns the cell readout off)
    dds_samples: int = 8  # sequences per DDS snapshot
    dds_start_fraction: float = 0.5  # DDS reads the over-training phase: the second half of the run
    quotient_metric: bool = True  # t in the quotient metric (gauge-orbit part of each chord removed)
    arms: tuple[str, ...] = ("adamw", "adamw-gains-undecayed", "ddc-adam")
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        check_config(self, positive=("train_chars", "d_model", "n_layers", "n_heads", "d_ff", "seq_len", "batch_size",
                                     "steps", "eval_every", "eval_windows", "lr", "dds_samples"),
                     non_negative=("weight_decays", "warmup_steps", "dds_checkpoints"),
                     within={"val_fraction": OPEN_UNIT, "min_lr_ratio": UNIT, "dds_start_fraction": START_FRACTION},
                     divisible=[("d_model", "n_heads")])


def arm_key(arm: str, weight_decay: float) -> str:
    return f"{arm} wd={weight_decay:g}"


def arm_label(key: str) -> str:
    arm, wd = key.rsplit(" ", 1)
    return f"{ARM_LABELS.get(arm, arm)}, {wd.replace('=', ' ')}"


def centered_logit_rms(logits: torch.Tensor) -> float:
    """RMS of the logits after removing each position's mean over the vocabulary (shift-invariant)."""
    return float((logits - logits.mean(-1, keepdim=True)).pow(2).mean().sqrt())


def orbit_drift_summary(gauges: Any, start: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, float]:
    """RMS drift since ``start`` of the norm gains' ``log|g|`` and of the FFN neurons' balance."""
    from ..dds import orbit_drift

    drift = orbit_drift(start, gauges.orbit_coordinates(model))
    out = {}
    for kind, key in ((NormScaling, "gain_log_drift_rms"), (NeuronScaling, "neuron_balance_drift_rms")):
        families = [f.name for f in gauges if isinstance(f, kind)]
        squares = sum(drift[n]["rms_change"] ** 2 * drift[n]["coordinates"] for n in families)
        count = sum(drift[n]["coordinates"] for n in families)
        out[key] = (squares / count) ** 0.5 if count else float("nan")
    return out


def run(config: OvertrainLMConfig, context: RunContext) -> None:
    c, folder, device = config, context.folder, context.device
    with folder.timed("data"):
        split = char_lm_split(load_text(c.works), c.val_fraction, train_chars=c.train_chars)
        train_eval = [t.to(device) for t in lm_eval_windows(split.train, c.seq_len, c.eval_windows)]
        val_eval = [t.to(device) for t in lm_eval_windows(split.val, c.seq_len, c.eval_windows)]
        train_tokens = split.train.to(device)
    folder.results["data"] = {"vocab_size": split.vocab.size, "train_chars": len(split.train),
                              "val_chars": len(split.val)}
    folder.results["notes"] = [GAIN_STATEMENT]
    model_config = TransformerLMConfig(vocab_size=split.vocab.size, d_model=c.d_model, n_layers=c.n_layers,
                                       n_heads=c.n_heads, d_ff=c.d_ff, max_seq_len=c.seq_len)
    example = train_eval[0][:2, :GAUGE_PROBE_POSITIONS]
    final: dict[str, dict[str, dict[int, Any]]] = context.state.setdefault("final", {})
    for weight_decay in c.weight_decays:
        settings = OptimizerSettings(lr=c.lr, weight_decay=weight_decay, warmup_steps=c.warmup_steps,
                                     min_lr_ratio=c.min_lr_ratio)
        arms = [a for a in c.arms if not (a == "adamw-gains-undecayed" and weight_decay == 0)]
        for arm in arms:
            key = arm_key(arm, weight_decay)
            for seed in c.seeds:
                if not context.start_unit(key, seed):
                    continue
                model, optimizer = seeded_arm(folder, arm, seed, lambda: TransformerLM(model_config).to(device),
                                              settings, c.steps, example_inputs=example, label=key)
                gauges = find_gauges(model, example, output="logits")
                orbit_start = gauges.orbit_coordinates(model)
                batches = torch.Generator().manual_seed(10_000 + seed)  # identical batches for every arm
                norm_gains = [p for n, p in model.named_parameters() if n in {f.gain for f in gauges
                                                                             if isinstance(f, NormScaling)}]

                def batch_loss(step: int) -> torch.Tensor:
                    inputs, targets = sample_lm_batch(train_tokens.cpu(), c.batch_size, c.seq_len, batches)
                    logits = model(inputs.to(device))
                    return F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())

                def evaluate() -> dict[str, float]:
                    metrics = {}
                    for name, (inputs, targets) in (("train_loss", train_eval), ("val_loss", val_eval)):
                        logits = model(inputs)
                        metrics[name] = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
                    metrics["gap"] = metrics["val_loss"] - metrics["train_loss"]
                    metrics["gain_mean"] = float(torch.cat([g.detach().abs().reshape(-1) for g in norm_gains]).mean())
                    metrics["head_logit_rms"] = centered_logit_rms(logits)
                    metrics.update(orbit_drift_summary(gauges, orbit_start, model))
                    return metrics

                dds_inputs, dds_targets = train_eval[0][: c.dds_samples], train_eval[1][: c.dds_samples]
                cells = readable_cells_along_run(model, dds_inputs, dds_targets, c.steps, c.dds_checkpoints,
                                                 c.dds_start_fraction, gauges=gauges if c.quotient_metric else None)
                outcome = train_arm(folder, context, key, seed, model=model, optimizer=optimizer, steps=c.steps,
                                    batch_loss=batch_loss, evaluate=evaluate, eval_every=c.eval_every,
                                    after_step=cells.after_step if cells else None)
                curve = folder.results["curves"][key][str(seed)]
                best = min(range(len(curve["val_loss"])), key=lambda i: curve["val_loss"][i])
                row = {**outcome["last"], "best_val_loss": curve["val_loss"][best],
                       "best_val_step": curve["step"][best],
                       "overtraining": outcome["last"]["val_loss"] - curve["val_loss"][best],
                       "diverged": outcome["diverged_at"] is not None}
                if cells:
                    readout = cells.readout()
                    folder.results.setdefault("dds", {}).setdefault(key, {})[str(seed)] = readout
                    row.update(readable_cells=readout["readable"], measurable_cells=readout["measurable"],
                               total_cells=readout["total"], dds_summary=readout["summary"])
                for name, value in row.items():
                    final.setdefault(key, {}).setdefault(name, {})[seed] = value
                folder.results["final"] = final
                folder.flush()
    summarise(c, folder, final)


def summarise(c: OvertrainLMConfig, folder, final: dict[str, dict[str, dict[int, Any]]]) -> None:
    for key, row in final.items():
        for name, by_seed in row.items():
            values = list(by_seed.values())
            if name == "dds_summary":
                continue
            folder.set_metric(key, name, any(values) if name == "diverged" else mean(values))
    folder.add_figure({"file": "final_gap.png", "kind": "bar",
                       "title": "final validation - training loss gap (mean over seeds)",
                       "xlabel": "optimizer, weight decay", "ylabel": "gap (nats)",
                       "series": [{"label": "ours", "x": [arm_label(k) for k in final],
                                   "y": [mean(final[k]["gap"].values()) for k in final]},
                                  {"label": "paper", "x": [arm_label(k) for k in final],
                                   "y": [GAP_ANCHOR.get(k.rsplit(" ", 1)[0]) for k in final]}]})
    add_dds_figures(folder)
    pairs = [(arm_key("ddc-adam", wd), base) for wd in c.weight_decays
             for base in (arm_key("adamw", wd), arm_key("adamw-gains-undecayed", wd))
             if arm_key("ddc-adam", wd) in final and base in final]
    folder.add_figure({"file": "gap_paired_differences.png", "kind": "bar",
                       "title": "final gap, DDCAdam minus baseline, per seed (the paper: well below 0)",
                       "xlabel": "seed", "ylabel": "gap difference (nats)",
                       "series": [{"label": f"{arm_label(ddc)} - {arm_label(base)}",
                                   "x": [f"seed {s}" for s in c.seeds],
                                   "y": [final[ddc]["gap"].get(s, float("nan")) - final[base]["gap"].get(s, float("nan"))
                                         for s in c.seeds]} for ddc, base in pairs],
                       "hlines": [{"y": 0.0, "label": "no difference (a verdict needs the 95 % interval below)"}]})
    for weight_decay in c.weight_decays:
        ddc, adamw = arm_key("ddc-adam", weight_decay), arm_key("adamw", weight_decay)
        baselines = [adamw] + ([arm_key("adamw-gains-undecayed", weight_decay)] if weight_decay > 0 else [])
        if ddc not in final:
            continue
        for base in (b for b in baselines if b in final):
            difference = paired_difference(final[ddc]["gap"], final[base]["gap"])
            folder.add_claim(
                f"final val-train gap: DDCAdam below {arm_label(base)}",
                "0.67 (DDCAdam) vs 5.88 (AdamW)",
                f"{mean(final[ddc]['gap'].values()):.3f} vs {mean(final[base]['gap'].values()):.3f}; paired "
                f"difference {difference.describe(3)}",
                interval_verdict(difference, direction="below"),
                f"criterion: the 95 % interval of the per-seed difference (DDCAdam - baseline) lies below 0; "
                f"{c.steps} steps, constant rate after warm-up",
                evidence={"paired_difference": difference.as_dict()})
        if "readable_cells" in final[ddc] and adamw in final and "readable_cells" in final[adamw]:
            summaries = {k: list(final[k]["dds_summary"].values()) for k in (ddc, adamw)}
            if not all(final[k]["measurable_cells"][s] for k in (ddc, adamw) for s in final[k]["measurable_cells"]):
                reason = "; ".join(f"{arm_label(k)}, seed {s}: {text}" for k in (ddc, adamw)
                                   for s, text in final[k]["dds_summary"].items()
                                   if text.startswith("not measurable"))
                verdict = Verdict(None, "not measurable", reason)
                ours = " | ".join(f"{arm_label(k)}: {summaries[k][0]}" for k in (ddc, adamw))
            else:
                difference = paired_difference(final[ddc]["readable_cells"], final[adamw]["readable_cells"])
                verdict = interval_verdict(difference, direction="above")
                ours = (f"{mean(final[ddc]['readable_cells'].values()):g} vs "
                        f"{mean(final[adamw]['readable_cells'].values()):g} readable of "
                        f"{final[ddc]['total_cells'][c.seeds[0]]} cells; paired difference {difference.describe(2)}")
            folder.add_claim(f"more readable dead-direction cells with DDCAdam (weight decay {weight_decay:g})",
                             "32/65 (DDCAdam) vs 7/65 (AdamW)", ours, verdict,
                             "rule of dds.md §3 as in gaugeopt.dds.slopes (measurability first); duplicates "
                             "(sigma2_min_X) and probe artefacts are not cells")
    folder.results["reading"] = reading(c, final, folder.results["claims"])
    folder.flush()


def reading(c: OvertrainLMConfig, final: dict[str, dict[str, dict[int, Any]]], claims: list[dict]) -> list[str]:
    """Two sentences on what the run shows, from its own numbers (AdamW vs DDCAdam at the first weight
    decay both ran at)."""
    weight_decay = next((wd for wd in c.weight_decays if arm_key("adamw", wd) in final
                         and arm_key("ddc-adam", wd) in final), None)
    if weight_decay is None:
        return []
    a, d = final[arm_key("adamw", weight_decay)], final[arm_key("ddc-adam", weight_decay)]

    def m(row: dict, name: str) -> float:
        return mean(row[name].values()) if name in row else float("nan")

    gap_claim = next((cl for cl in claims if cl["claim"].startswith("final val-train gap")
                      and cl["claim"].endswith(f"AdamW, wd {weight_decay:g}")), None)
    verdict = (gap_claim.get("verdict") or ("reproduced" if gap_claim["reproduced"] else "not reproduced")) \
        if gap_claim else "not evaluated"
    rise = {name: m(row, "overtraining") for name, row in (("AdamW", a), ("DDCAdam", d))}
    over = [name for name, value in rise.items() if value > OVERTRAINING_NATS]
    status = {2: "both arms over-train", 1: f"only {over[0]} over-trains" if over else "",
              0: "neither arm over-trains"}[len(over)]
    first = (f"At weight decay {weight_decay:g} {status} (final validation loss more than {OVERTRAINING_NATS} "
             f"nats above its best): validation loss is lowest near step "
             f"{m(a, 'best_val_step'):.0f} (AdamW) and {m(d, 'best_val_step'):.0f} (DDCAdam) and ends "
             f"{m(a, 'overtraining'):.2f} and {m(d, 'overtraining'):.2f} nats above that; the final gap is "
             f"{m(a, 'gap'):.2f} (AdamW) vs {m(d, 'gap'):.2f} (DDCAdam), so the paper's smaller gap is "
             f"'{verdict}' here.")
    second = (f"AdamW drifts along the gauge orbits (RMS drift of log|gain| {m(a, 'gain_log_drift_rms'):.2f}, of "
              f"neuron balance {m(a, 'neuron_balance_drift_rms'):.2f}) where DDCAdam does not "
              f"({m(d, 'gain_log_drift_rms'):.2g}, {m(d, 'neuron_balance_drift_rms'):.2g}); whether that drift "
              f"drives over-training at this scale is what the gap verdict tests, and the dead-direction "
              f"readout says: " + (next(iter(d["dds_summary"].values())) if "dds_summary" in d else "not run") + ".")
    return [first, second]


def add_dds_figures(folder) -> None:
    """The head's lambda+_min(G) against the remaining arc length, and every cell's fitted slope."""
    dds = folder.results.get("dds", {})
    if not dds:
        return
    first = {key: by_seed[min(by_seed, key=int)] for key, by_seed in dds.items()}
    folder.add_figure({
        "file": "dds_head_lambda_min_G.png", "kind": "line", "xscale": "log", "yscale": "log",
        "title": "LM head: smallest positive eigenvalue of G along the approach (first seed)",
        "xlabel": "remaining arc length t (quotient metric)", "ylabel": "lambda+_min(G) at the head",
        "series": [{"label": arm_label(key), "x": r["t"][:-1], "y": r["series"]["head:output"]["lambda_min_G"][:-1]}
                   for key, r in first.items() if "head:output" in r["series"]]})
    names = [f"{c['site'].replace(':output', '').replace('blocks.', 'block ').replace('.attn.', ' ').replace('.ffn.', ' ffn ')}"
             f" {c['observable'].replace('lambda_min', 'lambda+min').replace('logdet', 'logdet+')}"
             for c in next(iter(first.values()))["cells"]]
    folder.add_figure({
        "file": "dds_cell_slopes.png", "kind": "bar", "title": "fitted slope of every cell (first seed)",
        "xlabel": "cell (site, observable)", "ylabel": "slope of log O against log t",
        "series": [{"label": f"{arm_label(key)}: " + (f"{r['readable']} of {r['measurable']} measurable cells read"
                                                      if r["measurable"] else "not measurable"), "x": names,
                    "y": [c["fit"]["slope"] if c["fit"] else None for c in r["cells"]]}
                   for key, r in first.items()]})


PRESETS = {
    "tiny": OvertrainLMConfig(train_chars=2048, d_model=16, n_layers=1, n_heads=2, d_ff=32, seq_len=16,
                              batch_size=8, steps=12, eval_every=6, eval_windows=4, warmup_steps=2,
                              dds_checkpoints=4, dds_samples=2, weight_decays=(0.0, 0.1), seeds=(0,)),
    "smoke": OvertrainLMConfig(),
    "full": OvertrainLMConfig(train_chars=32_768, d_model=96, n_layers=2, n_heads=4, d_ff=256,
                              seq_len=64, batch_size=32, steps=3000, eval_every=100, eval_windows=64,
                              warmup_steps=60, weight_decays=(0.0, 0.1), dds_checkpoints=24, seeds=(0, 1, 2)),
}

EXPERIMENT = Experiment(
    name="overtrain-lm",
    summary="char-level LM past its point of fit: AdamW vs DDCAdam (gap, collapse curve, DDS cells)",
    presets=PRESETS,
    run=run,
)
