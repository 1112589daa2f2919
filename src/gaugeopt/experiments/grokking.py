"""grokking: modular addition a + b mod p with a deep pre-norm transformer, Muon vs DDCMuon.

A seed *groks* when its validation accuracy reaches ``grok_accuracy`` (0.95) within the step budget
(``steps``); training of a seed stops at that point. Reported: seeds that grok per arm, compared by
McNemar's exact test on the seeds where the arms disagree (one-sided, the paper's direction; a
verdict needs at least 5 seeds, since 4 cannot reach p <= 0.05), and the survival curve of
steps-to-grok per arm with the seeds that never grok censored at the budget.
Paper anchor: 10/11 seeds grok with DDCMuon vs 0/11 with Muon at depth 24.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import modular_addition_split
from ..models import ModularAdditionConfig, ModularAdditionTransformer
from .checks import OPEN_UNIT, UNIT, check_config
from .common import ARM_LABELS, mean
from .registry import Experiment
from .runner import RunContext
from .statistics import exact_test_verdict, mcnemar_exact, survival_curve
from .training import OptimizerSettings, arm_lr_scale, check_lr_scales, seeded_arm, train_arm


@dataclass(frozen=True)
class GrokkingConfig:
    modulus: int = 97
    train_fraction: float = 0.4
    depth: int = 4
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 256
    batch_size: int = 512
    steps: int = 600
    eval_every: int = 50
    muon_lr: float = 0.02
    adam_lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    min_lr_ratio: float = 1.0  # constant rate after warm-up
    grok_accuracy: float = 0.95
    arms: tuple[str, ...] = ("muon", "ddc-muon")
    lr_scales: tuple[tuple[str, float], ...] = ()  # per-arm multipliers of both rates, from a pre-registered sweep
    seeds: tuple[int, ...] = (0, 1)

    def __post_init__(self) -> None:
        check_config(self, positive=("modulus", "depth", "d_model", "n_heads", "d_ff", "batch_size", "steps",
                                     "eval_every", "muon_lr", "adam_lr"),
                     non_negative=("weight_decay", "warmup_steps"),
                     within={"train_fraction": OPEN_UNIT, "min_lr_ratio": UNIT, "grok_accuracy": UNIT},
                     divisible=[("d_model", "n_heads")])
        check_lr_scales(self)


def run(config: GrokkingConfig, context: RunContext) -> None:
    c, folder, device = config, context.folder, context.device
    model_config = ModularAdditionConfig(modulus=c.modulus, d_model=c.d_model, n_layers=c.depth,
                                         n_heads=c.n_heads, d_ff=c.d_ff)
    settings = OptimizerSettings(lr=c.adam_lr, muon_lr=c.muon_lr, weight_decay=c.weight_decay,
                                 warmup_steps=c.warmup_steps, min_lr_ratio=c.min_lr_ratio)
    grok_steps: dict[str, dict[int, int | None]] = context.state.setdefault("grok_steps", {arm: {} for arm in c.arms})
    for seed in c.seeds:
        data = modular_addition_split(c.modulus, c.train_fraction, seed=seed)
        train_x, train_y = data.train_inputs.to(device), data.train_labels.to(device)
        val_x, val_y = data.val_inputs.to(device), data.val_labels.to(device)
        for arm in c.arms:
            if not context.start_unit(arm, seed):
                continue
            model, optimizer = seeded_arm(folder, arm, seed, lambda: ModularAdditionTransformer(model_config).to(device),
                                          settings, c.steps, example_inputs=train_x[:2],
                                          lr_scale=arm_lr_scale(c, arm))
            batches = torch.Generator().manual_seed(10_000 + seed)
            batch = min(c.batch_size, len(train_y))

            def batch_loss(step: int) -> torch.Tensor:
                index = torch.randperm(len(train_y), generator=batches)[:batch].to(device)
                return F.cross_entropy(model(train_x[index]), train_y[index])

            def evaluate() -> dict[str, float]:
                train_logits, val_logits = model(train_x), model(val_x)
                return {"train_loss": F.cross_entropy(train_logits, train_y).item(),
                        "val_loss": F.cross_entropy(val_logits, val_y).item(),
                        "train_acc": (train_logits.argmax(-1) == train_y).float().mean().item(),
                        "val_acc": (val_logits.argmax(-1) == val_y).float().mean().item()}

            outcome = train_arm(folder, context, arm, seed, model=model, optimizer=optimizer, steps=c.steps,
                                batch_loss=batch_loss, evaluate=evaluate, eval_every=c.eval_every,
                                stop_when=lambda m: m["val_acc"] >= c.grok_accuracy)
            grokked = outcome["last"]["val_acc"] >= c.grok_accuracy
            grok_steps[arm][seed] = outcome["steps_done"] if grokked else None
            folder.results["grok_steps"] = {a: {str(s): v for s, v in d.items()} for a, d in grok_steps.items()}
            folder.flush()
    for arm, by_seed in grok_steps.items():
        done = [s for s in by_seed.values() if s is not None]
        folder.set_metric(arm, "seeds_grokked", f"{len(done)}/{len(by_seed)}")
        folder.set_metric(arm, "mean_steps_to_grok", mean(done))
    folder.results["curve_lines"] = {"val_acc": [{"y": c.grok_accuracy, "label": f"grokked (val acc {c.grok_accuracy})"}]}
    folder.add_figure({"file": "seeds_grokked.png", "kind": "bar", "title": f"seeds that grok (depth {c.depth})",
                       "xlabel": "optimizer", "ylabel": f"seeds reaching val acc {c.grok_accuracy}",
                       "series": [{"label": "grokked", "x": [ARM_LABELS.get(a, a) for a in grok_steps],
                                   "y": [sum(v is not None for v in d.values()) for d in grok_steps.values()]}],
                       "hlines": [{"y": len(c.seeds), "label": f"all {len(c.seeds)} seeds", "style": "dotted"}]})
    folder.results["tables"] = [{
        "title": "steps to grok per seed",
        "header": ["seed", *(ARM_LABELS.get(a, a) for a in grok_steps)],
        "rows": [[seed, *(grok_steps[a].get(seed) if grok_steps[a].get(seed) is not None else f"never ({c.steps})"
                          for a in grok_steps)] for seed in c.seeds],
        "note": f"steps until validation accuracy >= {c.grok_accuracy} (evaluated every {c.eval_every} steps)"}]
    curves = {arm: survival_curve(by_seed, budget=c.steps) for arm, by_seed in grok_steps.items()}
    folder.results["survival"] = {arm: curve.as_dict() for arm, curve in curves.items()}
    folder.add_figure({"file": "survival_steps_to_grok.png", "kind": "line",
                       "title": f"seeds not yet grokked (depth {c.depth}; budget {c.steps} steps)",
                       "xlabel": "training step", "ylabel": "fraction of seeds not yet grokked",
                       "series": [{"label": f"{ARM_LABELS.get(arm, arm)} ({curve.events}/{curve.runs} grok)",
                                   "x": curve.stairs()[0], "y": curve.stairs()[1]} for arm, curve in curves.items()]})
    if "muon" in grok_steps and "ddc-muon" in grok_steps:
        grokked = {arm: {s: v is not None for s, v in grok_steps[arm].items()} for arm in ("muon", "ddc-muon")}
        test = mcnemar_exact(grokked["ddc-muon"], grokked["muon"])
        medians = {arm: curves[arm].median for arm in ("ddc-muon", "muon")}
        folder.add_claim(f"more seeds grok with DDCMuon (depth {c.depth}, budget {c.steps} steps)",
                         "10/11 (DDCMuon) vs 0/11 (Muon) at depth 24",
                         f"{test.describe()}; median steps to grok "
                         + ", ".join(f"{ARM_LABELS[a]} {m if m is not None else f'never within {c.steps}'}"
                                     for a, m in medians.items()),
                         exact_test_verdict(test),
                         f"criterion: McNemar's exact test, one-sided p <= 0.05 on the seeds where the arms disagree "
                         f"(DDCMuon groks, Muon does not, or the reverse); a seed groks when validation "
                         f"accuracy reaches {c.grok_accuracy} within {c.steps} steps (evaluated every {c.eval_every})"
                         + ("" if c.depth == 24 else f"; paper depth 24, ours {c.depth}"),
                         evidence={"mcnemar": test.as_dict(), "steps_to_grok": grok_steps,
                                   "survival": folder.results["survival"]})


PRESETS = {
    "tiny": GrokkingConfig(modulus=11, train_fraction=0.5, depth=1, d_model=16, n_heads=2, d_ff=32,
                           batch_size=32, steps=6, eval_every=3, warmup_steps=2, seeds=(0,)),
    "smoke": GrokkingConfig(),
    # Depth 24 on this CPU in about an hour: 5 seeds (fewer cannot decide an exact test), d_model 64.
    "cpu": GrokkingConfig(depth=24, d_model=64, d_ff=256, steps=800, eval_every=50, seeds=(0, 1, 2, 3, 4),
                          lr_scales=(("muon", 4.0), ("ddc-muon", 4.0))),
    "full": GrokkingConfig(depth=24, d_model=128, d_ff=512, steps=3000, eval_every=100, seeds=tuple(range(11))),
}

EXPERIMENT = Experiment(
    name="grokking",
    summary="modular addition with a deep pre-norm transformer: Muon vs DDCMuon (seeds that grok)",
    presets=PRESETS,
    run=run,
)
