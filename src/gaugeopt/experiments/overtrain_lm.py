"""overtrain-lm: a character-level LM trained far past its point of fit, AdamW vs DDCAdam.

Protocol (docs/experiments.md): a pre-norm decoder (RoPE, RMSNorm, SwiGLU, untied head) on a small
training split of a Shakespeare text, so the model memorises it; both arms share the model seed,
batches, learning-rate schedule and budget. Measured: the final validation-minus-training loss gap
(losses on fixed windows, eval mode) and its curve over training (the collapse curve), and, when the
dead-direction module is present, the readable dead-direction cells of dds.md §3 along each run.
DDS is recorded at ``dds_checkpoints`` evenly spaced steps over the second half of each run (the
over-training phase), with t the remaining arc length of the parameter path to the last one.
Paper anchor: gap 0.67 (DDCAdam) vs 5.88 (AdamW); readable cells 32/65 vs 7/65.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import char_lm_split, lm_eval_windows, load_text, sample_lm_batch
from ..models import TransformerLM, TransformerLMConfig
from .checks import OPEN_UNIT, START_FRACTION, UNIT, check_config
from .common import ARM_LABELS, mean, readable_cells_along_run
from .registry import Experiment
from .runner import RunContext
from .training import GAUGE_PROBE_POSITIONS, OptimizerSettings, seeded_arm, train_arm

GAP_ANCHOR = {"ddc-adam": 0.67, "adamw": 5.88}


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
    steps: int = 800
    eval_every: int = 50
    eval_windows: int = 64  # fixed windows for the train and validation losses
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    dds_checkpoints: int = 12  # DDS snapshots along each run (0 turns the cell readout off)
    dds_samples: int = 8  # sequences per DDS snapshot
    dds_start_fraction: float = 0.5  # DDS reads the over-training phase: the second half of the run
    arms: tuple[str, ...] = ("adamw", "ddc-adam")
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        check_config(self, positive=("train_chars", "d_model", "n_layers", "n_heads", "d_ff", "seq_len", "batch_size",
                                     "steps", "eval_every", "eval_windows", "lr", "dds_samples"),
                     non_negative=("weight_decay", "warmup_steps", "dds_checkpoints"),
                     within={"val_fraction": OPEN_UNIT, "min_lr_ratio": UNIT, "dds_start_fraction": START_FRACTION},
                     divisible=[("d_model", "n_heads")])


def run(config: OvertrainLMConfig, context: RunContext) -> None:
    c, folder, device = config, context.folder, context.device
    with folder.timed("data"):
        split = char_lm_split(load_text(c.works), c.val_fraction, train_chars=c.train_chars)
        train_eval = [t.to(device) for t in lm_eval_windows(split.train, c.seq_len, c.eval_windows)]
        val_eval = [t.to(device) for t in lm_eval_windows(split.val, c.seq_len, c.eval_windows)]
        train_tokens = split.train.to(device)
    folder.results["data"] = {"vocab_size": split.vocab.size, "train_chars": len(split.train),
                              "val_chars": len(split.val)}
    model_config = TransformerLMConfig(vocab_size=split.vocab.size, d_model=c.d_model, n_layers=c.n_layers,
                                       n_heads=c.n_heads, d_ff=c.d_ff, max_seq_len=c.seq_len)
    settings = OptimizerSettings(lr=c.lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps,
                                 min_lr_ratio=c.min_lr_ratio)
    final: dict[str, dict[str, list[float]]] = {}
    for arm in c.arms:
        for seed in c.seeds:
            model, optimizer = seeded_arm(folder, arm, seed, lambda: TransformerLM(model_config).to(device), settings,
                                          c.steps, example_inputs=train_eval[0][:2, :GAUGE_PROBE_POSITIONS])
            batches = torch.Generator().manual_seed(10_000 + seed)  # identical batches for every arm

            def batch_loss(step: int) -> torch.Tensor:
                inputs, targets = sample_lm_batch(train_tokens.cpu(), c.batch_size, c.seq_len, batches)
                logits = model(inputs.to(device))
                return F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())

            def evaluate() -> dict[str, float]:
                losses = {}
                for name, (inputs, targets) in (("train_loss", train_eval), ("val_loss", val_eval)):
                    logits = model(inputs)
                    losses[name] = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
                losses["gap"] = losses["val_loss"] - losses["train_loss"]
                return losses

            dds_inputs, dds_targets = train_eval[0][: c.dds_samples], train_eval[1][: c.dds_samples]
            cells = readable_cells_along_run(model, dds_inputs, dds_targets, c.steps, c.dds_checkpoints,
                                             c.dds_start_fraction)
            outcome = train_arm(folder, context, arm, seed, model=model, optimizer=optimizer, steps=c.steps,
                                batch_loss=batch_loss, evaluate=evaluate, eval_every=c.eval_every, final=final,
                                after_step=cells.after_step if cells else None)
            row = final[arm]
            row.setdefault("diverged", []).append(outcome["diverged_at"] is not None)
            if cells:
                readout = cells.readout()
                folder.results.setdefault("dds", {}).setdefault(arm, {})[str(seed)] = readout
                row.setdefault("readable_cells", []).append(readout["readable"])
                row.setdefault("total_cells", []).append(readout["total"])
    summarise(c, folder, final)


def summarise(c: OvertrainLMConfig, folder, final: dict[str, dict[str, list[float]]]) -> None:
    for arm, row in final.items():
        for name, values in row.items():
            folder.set_metric(arm, name, mean(values) if name != "diverged" else any(values))
    folder.add_figure({"file": "final_gap.png", "kind": "bar", "title": "final validation - training loss gap",
                       "xlabel": "optimizer", "ylabel": "gap (nats)",
                       "series": [{"label": "ours", "x": list(final), "y": [mean(final[a]["gap"]) for a in final]},
                                  {"label": "paper", "x": list(final), "y": [GAP_ANCHOR.get(a) for a in final]}]})
    add_dds_figures(folder)
    if "adamw" in final and "ddc-adam" in final:
        gap_ddc, gap_adamw = mean(final["ddc-adam"]["gap"]), mean(final["adamw"]["gap"])
        folder.add_claim(
            "final val-train gap, DDCAdam well below AdamW",
            "0.67 (DDCAdam) vs 5.88 (AdamW)",
            f"{gap_ddc:.3f} ({ARM_LABELS['ddc-adam']}) vs {gap_adamw:.3f} (AdamW)",
            bool(gap_ddc < 0.5 * gap_adamw),
            "criterion: DDCAdam's gap below half AdamW's (paper: 8.8x smaller); mean over seeds")
        if "readable_cells" in final["adamw"] and "readable_cells" in final["ddc-adam"]:
            ddc_cells, adam_cells = mean(final["ddc-adam"]["readable_cells"]), mean(final["adamw"]["readable_cells"])
            total = int(final["adamw"]["total_cells"][0])
            folder.add_claim(
                "more readable dead-direction cells with DDCAdam",
                "32/65 (DDCAdam) vs 7/65 (AdamW)",
                f"{ddc_cells:g}/{total} vs {adam_cells:g}/{total}",
                bool(ddc_cells > adam_cells),
                "criterion: more readable cells (dds.md §3) for DDCAdam; mean over seeds")


def add_dds_figures(folder) -> None:
    """The head's logdet+(G) against the remaining arc length, and every cell's fitted slope."""
    dds = folder.results.get("dds", {})
    if not dds:
        return
    first = {arm: by_seed[min(by_seed, key=int)] for arm, by_seed in dds.items()}
    folder.add_figure({
        "file": "dds_head_logdet_G.png", "kind": "line", "xscale": "log",
        "title": "LM head: logdet+(G) along the approach", "xlabel": "remaining arc length t",
        "ylabel": "logdet+ G", "series": [
            {"label": ARM_LABELS.get(arm, arm), "x": r["t"][:-1], "y": r["series"]["head:output"]["logdet_G"][:-1]}
            for arm, r in first.items() if "head:output" in r["series"]]})
    folder.add_figure({
        "file": "dds_cell_slopes.png", "kind": "scatter", "title": "fitted slope of every (site, observable) cell",
        "xlabel": "cell", "ylabel": "slope", "series": [
            {"label": f"{ARM_LABELS.get(arm, arm)} ({r['readable']}/{r['total']} read)",
             "x": list(range(len(r["cells"]))),
             "y": [c["fit"]["slope"] if c["fit"] else None for c in r["cells"]]}
            for arm, r in first.items()]})


PRESETS = {
    "tiny": OvertrainLMConfig(train_chars=2048, d_model=16, n_layers=1, n_heads=2, d_ff=32, seq_len=16,
                              batch_size=8, steps=12, eval_every=6, eval_windows=4, warmup_steps=2,
                              dds_checkpoints=4, dds_samples=2),
    "smoke": OvertrainLMConfig(),
    "full": OvertrainLMConfig(train_chars=32_768, d_model=96, n_layers=2, n_heads=4, d_ff=256,
                              seq_len=64, batch_size=32, steps=1500, eval_every=100, eval_windows=64,
                              warmup_steps=60, dds_checkpoints=16, seeds=(0,)),
}

EXPERIMENT = Experiment(
    name="overtrain-lm",
    summary="char-level LM past its point of fit: AdamW vs DDCAdam (gap, collapse curve, DDS cells)",
    presets=PRESETS,
    run=run,
)
