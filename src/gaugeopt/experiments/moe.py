"""moe: a small mixture-of-experts language model on Shakespeare text, AdamW vs the
symmetry-compatible layerwise stack (symcompat.md); with ``model="dense"``, the same comparison on a
dense decoder (:class:`~gaugeopt.models.TransformerLM`, FFN width ``d_ff * top_k`` so a token sees
as many FFN units as in the MoE).

Measured: validation loss, and per MoE layer the router diagnostics of symcompat.md (load CV, max
load, dead-expert fraction, router logit RMS, z-loss) from ``gaugeopt.dds.router.router_diagnostics``
on the validation windows, averaged over layers. Paper claim: lower validation loss and load
imbalance than AdamW (Lau & Su: OLMoE-style 4.081 vs 4.116; dense Qwen3-style 0.6B 4.199 vs 4.208,
Gemma3-style 1B 4.055 vs 4.086).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import char_lm_split, lm_eval_windows, load_text, sample_lm_batch
from ..models import MoEConfig, MoELM, TransformerLM, TransformerLMConfig
from .checks import OPEN_UNIT, UNIT, check_config, field_error
from .common import ARM_LABELS, mean
from .registry import Experiment
from .runner import RunContext
from .statistics import interval_verdict, paired_difference
from .training import (
    GAUGE_PROBE_POSITIONS,
    OptimizerSettings,
    arm_lr_scale,
    check_lr_scales,
    record_final_means,
    seeded_arm,
    train_arm,
)

ROUTER_FIELDS = ("load_cv", "max_load", "dead_fraction", "logit_rms", "z_loss")


MODELS = ("moe", "dense")


@dataclass(frozen=True)
class MoEExperimentConfig:
    model: str = "moe"  # "moe", or "dense": the symmetry-compatible comparison on a dense decoder
    works: tuple[str, ...] = ("hamlet_gut",)
    train_chars: int | None = None  # None: the whole training split
    val_fraction: float = 0.1
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 64
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 400
    eval_every: int = 50
    eval_windows: int = 32
    adam_lr: float = 3e-3  # the AdamW arm's rate (the stack's groups carry their own, gaugeopt.optim.symcompat)
    weight_decay: float = 0.1
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    arms: tuple[str, ...] = ("adamw", "symcompat")
    lr_scales: tuple[tuple[str, float], ...] = ()  # per-arm multipliers of every rate, from a pre-registered sweep
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        check_config(self, positive=("train_chars", "d_model", "n_layers", "n_heads", "n_experts", "top_k", "d_ff",
                                     "seq_len", "batch_size", "steps", "eval_every", "eval_windows", "adam_lr"),
                     non_negative=("weight_decay", "warmup_steps"),
                     within={"val_fraction": OPEN_UNIT, "min_lr_ratio": UNIT},
                     choices={"model": MODELS}, divisible=[("d_model", "n_heads")])
        if self.top_k > self.n_experts:
            raise field_error(self, "top_k", f"at most n_experts={self.n_experts}", self.top_k)
        check_lr_scales(self)


def router_summary(model: MoELM, tokens: torch.Tensor) -> dict[str, float]:
    """Router diagnostics averaged over the MoE layers."""
    from ..dds.router import router_diagnostics

    rows = router_diagnostics(model, tokens)
    return {name: float(mean(float(r[name]) for r in rows)) for name in ROUTER_FIELDS if name in rows[0]}


def run(config: MoEExperimentConfig, context: RunContext) -> None:
    c, folder, device = config, context.folder, context.device
    split = char_lm_split(load_text(c.works), c.val_fraction, train_chars=c.train_chars)
    train_eval = [t.to(device) for t in lm_eval_windows(split.train, c.seq_len, c.eval_windows)]
    val_eval = [t.to(device) for t in lm_eval_windows(split.val, c.seq_len, c.eval_windows)]
    dense = c.model == "dense"
    if dense:
        lm_config = TransformerLMConfig(vocab_size=split.vocab.size, d_model=c.d_model, n_layers=c.n_layers,
                                        n_heads=c.n_heads, d_ff=c.d_ff * c.top_k, max_seq_len=c.seq_len)
        make_model = lambda: TransformerLM(lm_config).to(device)  # noqa: E731
    else:
        model_config = MoEConfig(vocab_size=split.vocab.size, d_model=c.d_model, n_layers=c.n_layers,
                                 n_heads=c.n_heads, n_experts=c.n_experts, top_k=c.top_k, d_ff=c.d_ff,
                                 max_seq_len=c.seq_len)
        make_model = lambda: MoELM(model_config).to(device)  # noqa: E731
    settings = OptimizerSettings(lr=c.adam_lr, weight_decay=c.weight_decay,
                                 warmup_steps=c.warmup_steps, min_lr_ratio=c.min_lr_ratio)
    final: dict[str, dict[str, list[float]]] = context.state.setdefault("final", {})
    for arm in c.arms:
        for seed in c.seeds:
            if not context.start_unit(arm, seed):
                continue
            model, optimizer = seeded_arm(folder, arm, seed, make_model, settings, c.steps,
                                          example_inputs=train_eval[0][:2, :GAUGE_PROBE_POSITIONS],
                                          lr_scale=arm_lr_scale(c, arm))
            batches = torch.Generator().manual_seed(10_000 + seed)

            def batch_loss(step: int) -> torch.Tensor:
                inputs, targets = sample_lm_batch(split.train, c.batch_size, c.seq_len, batches)
                if dense:
                    return F.cross_entropy(model(inputs.to(device)).flatten(0, 1), targets.to(device).flatten())
                logits, aux = model(inputs.to(device), return_aux=True)
                return F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten()) + aux

            def evaluate() -> dict[str, float]:
                metrics = {}
                for name, (inputs, targets) in (("train_loss", train_eval), ("val_loss", val_eval)):
                    metrics[name] = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).item()
                if not dense:
                    metrics.update(router_summary(model, val_eval[0]))
                return metrics

            train_arm(folder, context, arm, seed, model=model, optimizer=optimizer, steps=c.steps,
                      batch_loss=batch_loss, evaluate=evaluate, eval_every=c.eval_every, final=final)
    record_final_means(folder, final)
    if "adamw" in final and "symcompat" in final:
        per_seed = {arm: {name: dict(zip(c.seeds, values)) for name, values in final[arm].items()}
                    for arm in ("adamw", "symcompat")}
        for name, claim, anchor, what in (
                ("val_loss", f"lower validation loss than AdamW ({'dense decoder' if dense else 'MoE'})",
                 "4.055 vs 4.086 (Gemma3-style 1B), 4.199 vs 4.208 (Qwen3-style)" if dense
                 else "4.081 vs 4.116 (OLMoE-style)", "validation loss"),
                ("load_cv", "lower load imbalance than AdamW", "lower load CV", "load CV (mean over layers)")):
            if name not in per_seed["adamw"] or name not in per_seed["symcompat"]:
                continue
            difference = paired_difference(per_seed["symcompat"][name], per_seed["adamw"][name])
            folder.add_claim(claim, anchor,
                             f"{what} {mean(final['symcompat'][name]):.3f} ({ARM_LABELS['symcompat']}) vs "
                             f"{mean(final['adamw'][name]):.3f}; paired difference {difference.describe(3)}",
                             interval_verdict(difference, direction="below"),
                             f"criterion: the 95 % interval of the per-seed difference "
                             f"({ARM_LABELS['symcompat']} - AdamW) lies below 0",
                             evidence={"paired_difference": difference.as_dict()})


PRESETS = {
    "tiny": MoEExperimentConfig(train_chars=4096, d_model=16, n_layers=1, n_heads=2, n_experts=4, d_ff=16,
                                seq_len=16, batch_size=4, steps=6, eval_every=3, eval_windows=4,
                                warmup_steps=2),
    "smoke": MoEExperimentConfig(),
    # The dense-decoder comparison (Lau & Su's dense runs) at the size of the 'cpu' preset.
    "dense-cpu": MoEExperimentConfig(model="dense", works=("hamlet_gut", "macbeth_gut", "othello_gut", "lear_gut"),
                                     batch_size=32, steps=2000, eval_every=100, eval_windows=64, warmup_steps=100,
                                     seeds=(0, 1, 2, 3, 4), lr_scales=(("adamw", 2.0), ("symcompat", 1.0))),
    # On this CPU in about 40 minutes: the smoke model on four plays, longer, 5 seeds.
    "cpu": MoEExperimentConfig(works=("hamlet_gut", "macbeth_gut", "othello_gut", "lear_gut"), batch_size=32,
                               steps=2000, eval_every=100, eval_windows=64, warmup_steps=100, seeds=(0, 1, 2, 3, 4),
                               lr_scales=(("adamw", 2.0), ("symcompat", 1.0))),
    "full": MoEExperimentConfig(works=("hamlet_gut", "macbeth_gut", "othello_gut", "lear_gut"), d_model=128,
                                n_layers=4, d_ff=128, seq_len=128, batch_size=32, steps=3000, eval_every=100,
                                eval_windows=64, warmup_steps=100, seeds=(0, 1, 2)),
}

EXPERIMENT = Experiment(
    name="moe",
    summary="small MoE LM: AdamW vs the symmetry-compatible stack (val loss, router balance)",
    presets=PRESETS,
    run=run,
)
