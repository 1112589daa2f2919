"""cnn: a small plain CNN on scikit-learn's digits, AdamW vs DDCAdam (a smoke comparison).

Model: :class:`~gaugeopt.models.PlainCNN` (conv-ReLU-maxpool, conv-BatchNorm-ReLU, conv-ReLU-avgpool,
flatten, Linear-ReLU, Linear), whose channel scalings (docs/gauges.md, "Convolutional networks")
DDCAdam steps exactly equivariantly. Data: the 1797 bundled 8x8 digits (no download), a seeded
70/30 split. Measured: validation loss and accuracy per arm, and the paired difference of the
final validation loss. There is no paper figure for CNNs; the claim checked is only that the
gauge-equivariant step is not worse than AdamW at the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data import load_digits_split
from ..models import PlainCNN, PlainCNNConfig
from .checks import OPEN_UNIT, UNIT, check_config, field_error
from .common import mean
from .registry import Experiment
from .runner import RunContext
from .statistics import interval_verdict, paired_difference
from .training import (
    OptimizerSettings,
    classifier_closures,
    record_final_means,
    seeded_arm,
    train_arm,
)


@dataclass(frozen=True)
class CNNExperimentConfig:
    val_fraction: float = 0.3
    widths: tuple[int, ...] = (16, 32, 32)
    hidden: int = 64
    batch_size: int = 64
    steps: int = 600
    eval_every: int = 50
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    arms: tuple[str, ...] = ("adamw", "ddc-adam")
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        check_config(self, positive=("widths", "hidden", "batch_size", "steps", "eval_every", "lr"),
                     non_negative=("weight_decay", "warmup_steps"),
                     within={"val_fraction": OPEN_UNIT, "min_lr_ratio": UNIT})
        if len(self.widths) != 3:
            raise field_error(self, "widths", "three channel counts (one per conv)", self.widths)


def run(config: CNNExperimentConfig, context: RunContext) -> None:
    c, folder, device = config, context.folder, context.device
    settings = OptimizerSettings(lr=c.lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps,
                                 min_lr_ratio=c.min_lr_ratio)
    final: dict[str, dict[str, list[float]]] = context.state.setdefault("final", {})
    for seed in c.seeds:
        data = load_digits_split(c.val_fraction, seed=seed)
        train_x, train_y = data.train_images.to(device), data.train_labels.to(device)
        val_x, val_y = data.val_images.to(device), data.val_labels.to(device)
        model_config = PlainCNNConfig(in_channels=train_x.shape[1], image_size=train_x.shape[-1],
                                      widths=tuple(c.widths), hidden=c.hidden, num_classes=data.num_classes)
        for arm in c.arms:
            if not context.start_unit(arm, seed):
                continue
            model, optimizer = seeded_arm(folder, arm, seed, lambda: PlainCNN(model_config).to(device), settings,
                                          c.steps, example_inputs=train_x[:2])
            batch_loss, evaluate = classifier_closures(model, (train_x, train_y), (val_x, val_y), c.batch_size, seed)
            train_arm(folder, context, arm, seed, model=model, optimizer=optimizer, steps=c.steps,
                      batch_loss=batch_loss, evaluate=evaluate, eval_every=c.eval_every, final=final)
    record_final_means(folder, final)
    if "adamw" in final and "ddc-adam" in final:
        per_seed = {arm: dict(zip(c.seeds, final[arm]["val_loss"])) for arm in ("adamw", "ddc-adam")}
        loss = paired_difference(per_seed["ddc-adam"], per_seed["adamw"])
        folder.add_claim("DDCAdam is not worse than AdamW on a small CNN",
                         "no paper figure (the equivariance of docs/ddc.md carried to CNN channel gauges)",
                         f"val loss {mean(final['ddc-adam']['val_loss']):.3f} (DDCAdam) vs "
                         f"{mean(final['adamw']['val_loss']):.3f} (AdamW); paired difference {loss.describe(3)}",
                         interval_verdict(loss, direction="below", threshold=0.05),
                         "criterion: the 95 % interval of the per-seed difference (DDCAdam - AdamW) lies below "
                         "+0.05 nats; data set: sklearn digits", evidence={"paired_difference": loss.as_dict()})


PRESETS = {
    "tiny": CNNExperimentConfig(widths=(4, 8, 8), hidden=16, batch_size=16, steps=8, eval_every=4, warmup_steps=2),
    "smoke": CNNExperimentConfig(seeds=(0, 1, 2)),
    "full": CNNExperimentConfig(steps=2000, eval_every=100, warmup_steps=60, seeds=(0, 1, 2, 3, 4)),
}

EXPERIMENT = Experiment(
    name="cnn",
    summary="plain CNN (conv, BatchNorm, pooling) on sklearn digits: AdamW vs DDCAdam (val loss)",
    presets=PRESETS,
    run=run,
)
