"""vit: a vision transformer trained from scratch, AdamW vs DDCAdam.

Data: scikit-learn's digits (8x8 images, 1797 of them; ``smoke``) or generated MNIST-1D (signals of
length 40 taken as 1 x 40 images with 1 x ``patch_size`` patches; ``full``).

Measured: validation loss and accuracy, and the fraction of feed-forward units that the optimizer
*compressed*: unit i of a SwiGLU block is the pair (row i of ``up``, column i of ``down``), whose
gauge-invariant size is the product of the two norms ``|up_i| * |down_:,i|``; a unit is compressed
when that product is below ``1e-3`` of the block's median. Paper anchor: val loss 1.71 (DDCAdam) vs
2.12 (AdamW), and DDCAdam compresses spare FFN units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import ImageSplit, load_digits_split, load_mnist1d_split
from ..models import ViT, ViTConfig
from .checks import OPEN_UNIT, UNIT, check_config
from .common import ARM_LABELS, mean
from .registry import Experiment
from .runner import RunContext
from .statistics import interval_verdict, paired_difference
from .training import (
    OptimizerSettings,
    arm_lr_scale,
    check_lr_scales,
    classifier_closures,
    record_final_means,
    seeded_arm,
    train_arm,
)

COMPRESSION_THRESHOLD = 1e-3


@dataclass(frozen=True)
class ViTExperimentConfig:
    dataset: str = "digits"  # "digits" or "mnist1d"
    num_samples: int = 5000  # mnist1d only: how many signals to generate
    val_fraction: float = 0.3
    patch_size: int = 2  # square patches; single-row inputs (mnist1d) take 1 x patch_size
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 8
    d_ff: int = 256  # deliberately wide: spare units the optimizer may compress
    batch_size: int = 64
    steps: int = 600
    eval_every: int = 50
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    arms: tuple[str, ...] = ("adamw", "ddc-adam")
    lr_scales: tuple[tuple[str, float], ...] = ()  # per-arm multipliers of lr, from a pre-registered sweep
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        check_config(self, positive=("num_samples", "patch_size", "d_model", "n_layers", "n_heads", "d_ff",
                                     "batch_size", "steps", "eval_every", "lr"),
                     non_negative=("weight_decay", "warmup_steps"),
                     within={"val_fraction": OPEN_UNIT, "min_lr_ratio": UNIT},
                     choices={"dataset": DATASETS}, divisible=[("d_model", "n_heads")])
        check_lr_scales(self)


def ffn_unit_sizes(model: ViT) -> list[torch.Tensor]:
    """Per block, the gauge-invariant size ``|up_i| * |down_:,i|`` of every feed-forward unit."""
    sizes = []
    for block in model.blocks:
        up, down = block.ffn.up.weight, block.ffn.down.weight
        in_norm = up.norm(dim=1)
        if block.ffn.up.bias is not None:
            in_norm = torch.sqrt(in_norm**2 + block.ffn.up.bias**2)
        sizes.append(in_norm * down.norm(dim=0))
    return sizes


def compressed_fraction(model: ViT, threshold: float = COMPRESSION_THRESHOLD) -> float:
    """Share of feed-forward units whose size is below ``threshold`` times their block's median."""
    flags = [s < threshold * s.median() for s in ffn_unit_sizes(model)]
    return torch.cat(flags).float().mean().item()


DATASETS = ("digits", "mnist1d")


def load_split(config: ViTExperimentConfig, seed: int) -> ImageSplit:
    if config.dataset == "digits":
        return load_digits_split(config.val_fraction, seed=seed)
    if config.dataset == "mnist1d":
        return load_mnist1d_split(config.num_samples, config.val_fraction, seed=seed)
    raise ValueError(f"dataset must be one of {DATASETS}, got {config.dataset!r}")


def run(config: ViTExperimentConfig, context: RunContext) -> None:
    c, folder, device = config, context.folder, context.device
    settings = OptimizerSettings(lr=c.lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps,
                                 min_lr_ratio=c.min_lr_ratio)
    final: dict[str, dict[str, list[float]]] = context.state.setdefault("final", {})
    for seed in c.seeds:
        data = load_split(c, seed)
        train_x, train_y = data.train_images.to(device), data.train_labels.to(device)
        val_x, val_y = data.val_images.to(device), data.val_labels.to(device)
        height, width = train_x.shape[-2:]
        model_config = ViTConfig(image_size=(height, width), patch_size=(min(height, c.patch_size), c.patch_size),
                                 num_classes=data.num_classes, d_model=c.d_model, n_layers=c.n_layers,
                                 n_heads=c.n_heads, d_ff=c.d_ff)
        for arm in c.arms:
            if not context.start_unit(arm, seed):
                continue
            model, optimizer = seeded_arm(folder, arm, seed, lambda: ViT(model_config).to(device), settings, c.steps,
                                          example_inputs=train_x[:2], lr_scale=arm_lr_scale(c, arm))
            batch_loss, evaluate_classifier = classifier_closures(model, (train_x, train_y), (val_x, val_y),
                                                                  c.batch_size, seed)

            def evaluate() -> dict[str, float]:
                return {**evaluate_classifier(), "compressed_units": compressed_fraction(model)}

            train_arm(folder, context, arm, seed, model=model, optimizer=optimizer, steps=c.steps,
                      batch_loss=batch_loss, evaluate=evaluate, eval_every=c.eval_every, final=final)
            if seed == c.seeds[0]:
                with torch.no_grad():
                    sizes = torch.cat(ffn_unit_sizes(model)).sort().values
                folder.results.setdefault("unit_sizes", {})[arm] = sizes.tolist()
    record_final_means(folder, final)
    units = folder.results.get("unit_sizes", {})
    folder.add_figure({"file": "ffn_unit_sizes.png", "kind": "line",
                       "title": f"feed-forward unit sizes, sorted (seed {c.seeds[0]})",
                       "xlabel": "unit (sorted by size)", "ylabel": "|up_i| |down_:,i| (gauge-invariant size)",
                       "yscale": "log",
                       "series": [{"label": ARM_LABELS.get(a, a), "x": list(range(len(v))), "y": v}
                                  for a, v in units.items()],
                       "hlines": [{"y": COMPRESSION_THRESHOLD * sorted(v)[len(v) // 2],
                                   "label": f"compressed below 1e-3 x median ({ARM_LABELS.get(a, a)})",
                                   "style": "dotted"} for a, v in units.items()]})
    if "adamw" in final and "ddc-adam" in final:
        per_seed = {arm: {name: dict(zip(c.seeds, values)) for name, values in final[arm].items()}
                    for arm in ("adamw", "ddc-adam")}
        loss = paired_difference(per_seed["ddc-adam"]["val_loss"], per_seed["adamw"]["val_loss"])
        folder.add_claim("DDCAdam reaches a lower validation loss", "1.71 (DDCAdam) vs 2.12 (AdamW)",
                         f"{mean(final['ddc-adam']['val_loss']):.3f} vs {mean(final['adamw']['val_loss']):.3f}; "
                         f"paired difference {loss.describe(3)}",
                         interval_verdict(loss, direction="below"),
                         f"criterion: the 95 % interval of the per-seed difference (DDCAdam - AdamW) lies below 0; "
                         f"data set: {c.dataset}", evidence={"paired_difference": loss.as_dict()})
        units_diff = paired_difference(per_seed["ddc-adam"]["compressed_units"], per_seed["adamw"]["compressed_units"])
        folder.add_claim("DDCAdam compresses spare FFN units",
                         "DDC compresses spare FFN units (no figure given)",
                         f"{mean(final['ddc-adam']['compressed_units']):.1%} vs "
                         f"{mean(final['adamw']['compressed_units']):.1%} of units below 1e-3 x median; paired "
                         f"difference {units_diff.describe(3)}",
                         interval_verdict(units_diff, direction="above"),
                         "criterion: the 95 % interval of the per-seed difference in compressed fraction "
                         "(DDCAdam - AdamW) lies above 0", evidence={"paired_difference": units_diff.as_dict()})


PRESETS = {
    "tiny": ViTExperimentConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, batch_size=16, steps=8,
                                eval_every=4, warmup_steps=2),
    "smoke": ViTExperimentConfig(),
    # The paper's regime (validation losses 1.71 and 2.12: a model far past its point of fit): little data,
    # long training. 1600 training signals, 6000 steps of 128 (480 epochs).
    "regime": ViTExperimentConfig(dataset="mnist1d", num_samples=2000, val_fraction=0.2, patch_size=4, d_model=64,
                                  n_layers=3, n_heads=4, d_ff=256, batch_size=128, steps=6000, eval_every=200,
                                  warmup_steps=60, seeds=(0, 1, 2, 3, 4)),
    "full": ViTExperimentConfig(dataset="mnist1d", num_samples=10_000, val_fraction=0.2, patch_size=4, d_model=64,
                                n_layers=3, n_heads=4, d_ff=256, batch_size=128, steps=2000, eval_every=100,
                                warmup_steps=60, seeds=(0, 1, 2), lr_scales=(("adamw", 1.0), ("ddc-adam", 1.0))),
}

EXPERIMENT = Experiment(
    name="vit",
    summary="ViT from scratch on sklearn digits / MNIST-1D: AdamW vs DDCAdam (val loss, compressed FFN units)",
    presets=PRESETS,
    run=run,
)
