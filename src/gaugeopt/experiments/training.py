"""Shared training machinery: optimizer arms, one learning-rate schedule, one loop.

Optimizer arms (``build_optimizer``):

- ``adamw``: ``torch.optim.AdamW`` on every parameter (its weight decay pulls norm gains toward 0).
- ``adamw-gains-undecayed``: ``torch.optim.AdamW`` with weight decay 0 on every norm gain (and norm
  bias) that :func:`gaugeopt.find_gauges` finds: decaying the other matrices with the gains left
  alone is how DDCAdam's decay acts on the merged consumer weights ``C diag(g)`` (docs/ddc.md), so
  this arm and ``ddc-adam`` differ in the gauge only.
- ``ddc-adam``: :class:`gaugeopt.DDCAdam` with the gauges :func:`gaugeopt.find_gauges` finds.
- ``muon``: the standard Muon baseline, :class:`gaugeopt.MuonWithAdamW` (``torch.optim.Muon`` on the
  hidden 2-D matrices, ``torch.optim.AdamW`` on embeddings, the LM head and vectors): the same
  matrices DDCMuon orthogonalises, so the two arms differ only in the gauge frames.
- ``ddc-muon``: :class:`gaugeopt.DDCMuon`, one optimizer for the whole model.
- ``symcompat``: :class:`gaugeopt.SymmetryCompatible` on :func:`gaugeopt.symmetry_param_groups`.

Every arm gets the same schedule: linear warm-up then cosine decay to ``min_lr_ratio`` of the peak
(``min_lr_ratio = 1``: a constant rate after warm-up), applied as a multiplier to each group's
initial learning rate. ``OptimizerSettings.lr_scale`` multiplies every rate of an arm (Adam's, the
orthogonalised step's, each symmetry-compatible group's own): the one knob a per-arm learning-rate
sweep turns (``gaugeopt.experiments.sweep``), set per arm by an experiment's ``lr_scales`` field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..gauges import NormScaling, find_gauges
from ..optim import DDCAdam, DDCMuon, SymmetryCompatible, symmetry_param_groups
from ..optim.baselines import MuonWithAdamW
from .common import mean

OPTIMIZER_ARMS = ("adamw", "adamw-gains-undecayed", "ddc-adam", "muon", "ddc-muon", "symcompat")

# Token positions in the example that ``find_gauges`` traces for a sequence model. Its cost grows
# quickly with the sequence length, and three positions already pin down RoPE's commutant (position
# 1 rotates every plane by a distinct angle, leaving one 2x2 rotation per plane).
GAUGE_PROBE_POSITIONS = 3


@dataclass(frozen=True)
class OptimizerSettings:
    """Hyperparameters shared by the arms; ``lr`` is Adam's, ``muon_lr`` the orthogonalised step's."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    muon_lr: float = 0.02
    momentum: float = 0.95
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    lr_scale: float = 1.0  # multiplies every learning rate of the arm (a per-arm sweep's knob)


def arm_lr_scale(config: Any, arm: str) -> float:
    """The multiplier ``config.lr_scales`` (pairs ``(arm, scale)``) gives ``arm``; 1 when none does."""
    return dict(getattr(config, "lr_scales", ()) or ()).get(arm, 1.0)


def check_lr_scales(config: Any) -> None:
    """``config.lr_scales`` must pair distinct arms of ``config.arms`` with positive multipliers."""
    from .checks import field_error

    scales = getattr(config, "lr_scales", ())
    pairs_ok = all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in scales)
    arms = [p[0] for p in scales] if pairs_ok else []
    if (not pairs_ok or len(set(arms)) != len(arms) or any(a not in config.arms for a in arms)
            or not all(isinstance(p[1], (int, float)) and not isinstance(p[1], bool) and p[1] > 0 for p in scales)):
        raise field_error(config, "lr_scales", f"(arm, positive multiplier) pairs for distinct arms among "
                                               f"{list(config.arms)}", scales)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak rate: ``(step+1)/warmup`` during warm-up, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class OptimizerBundle:
    """One or more optimizers stepping together under one schedule."""

    optimizers: list[torch.optim.Optimizer]
    total_steps: int
    settings: OptimizerSettings
    _base_lrs: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._base_lrs = [[g["lr"] for g in opt.param_groups] for opt in self.optimizers]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self, step: int) -> None:
        """Set every group's rate for ``step`` from the schedule, then step every optimizer."""
        factor = warmup_cosine(step, self.total_steps, self.settings.warmup_steps, self.settings.min_lr_ratio)
        for opt, base in zip(self.optimizers, self._base_lrs):
            for group, lr in zip(opt.param_groups, base):
                group["lr"] = lr * factor
            opt.step()


def build_optimizer(arm: str, model: nn.Module, settings: OptimizerSettings, total_steps: int,
                    example_inputs: Any = None) -> OptimizerBundle:
    """The optimizer(s) of ``arm`` for ``model``; gauge-aware arms need ``example_inputs``."""
    s = settings
    if arm == "adamw":
        opts: list[torch.optim.Optimizer] = [
            torch.optim.AdamW(model.parameters(), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)]
    elif arm in ("adamw-gains-undecayed", "muon", "ddc-adam", "ddc-muon"):
        if example_inputs is None:
            raise ValueError(f"arm {arm!r} needs example_inputs to find the model's gauges")
        gauges = find_gauges(model, example_inputs, output="logits")
        if arm == "adamw-gains-undecayed":
            held = norm_gain_names(gauges)
            named = list(model.named_parameters())
            groups = [{"params": [p for n, p in named if n not in held], "weight_decay": s.weight_decay},
                      {"params": [p for n, p in named if n in held], "weight_decay": 0.0}]
            opts = [torch.optim.AdamW([g for g in groups if g["params"]], lr=s.lr, betas=s.betas)]
        elif arm == "muon":  # the gauges only name the LM head, so Muon gets DDCMuon's matrices
            opts = list(MuonWithAdamW(model, gauges, lr=s.muon_lr, momentum=s.momentum, nesterov=True,
                                      weight_decay=s.weight_decay, adjust_lr="original", adam_lr=s.lr,
                                      adam_betas=s.betas).optimizers)
        elif arm == "ddc-adam":
            opts = [DDCAdam(model.parameters(), gauges, lr=s.lr, betas=s.betas,
                            weight_decay=s.weight_decay)]
        else:
            opts = [DDCMuon(model.parameters(), gauges, lr=s.muon_lr, momentum=s.momentum, nesterov=True,
                            weight_decay=s.weight_decay, adjust_lr="original", adam_lr=s.lr, adam_betas=s.betas)]
    elif arm == "symcompat":
        opts = [SymmetryCompatible(symmetry_param_groups(model), lr=s.muon_lr, weight_decay=s.weight_decay)]
    else:
        raise ValueError(f"unknown optimizer arm {arm!r}; choose from {OPTIMIZER_ARMS}")
    if s.lr_scale <= 0:
        raise ValueError(f"lr_scale must be positive, got {s.lr_scale}")
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["lr"] * s.lr_scale
    return OptimizerBundle(opts, total_steps, s)


def norm_gain_names(gauges: Any) -> set[str]:
    """Names of the norm gains (and norm biases) of the norm-scaling gauges in ``gauges``."""
    return {name for family in gauges if isinstance(family, NormScaling)
            for name in (family.gain, family.bias) if name}


def seeded_arm(folder: Any, arm: str, seed: int, make_model: Callable[[], nn.Module], settings: OptimizerSettings,
               total_steps: int, example_inputs: Any = None, label: str | None = None,
               lr_scale: float | None = None) -> tuple[nn.Module, OptimizerBundle]:
    """The model and optimizer of one (arm, seed) run. The model is built right after seeding torch
    with ``seed``, so every arm starts from the same weights; the optimizer is built under the run
    folder's ``setup`` timer, named by ``label`` (default the arm; gauge discovery, for the gauge-aware
    arms, is part of it). ``lr_scale`` replaces the settings' multiplier of every rate (see
    :func:`arm_lr_scale`)."""
    torch.manual_seed(seed)
    model = make_model()
    if lr_scale is not None:
        settings = replace(settings, lr_scale=lr_scale)
    with folder.timed(f"setup {label or arm} seed {seed}"):
        optimizer = build_optimizer(arm, model, settings, total_steps, example_inputs=example_inputs)
    return model, optimizer


def train_loop(
    *,
    model: nn.Module,
    optimizer: OptimizerBundle,
    steps: int,
    batch_loss: Callable[[int], torch.Tensor],
    evaluate: Callable[[], dict[str, float]],
    eval_every: int,
    on_eval: Callable[[int, dict[str, float]], None],
    bar: Any,
    stop_when: Callable[[dict[str, float]], bool] | None = None,
    after_step: Callable[[int], None] | None = None,
    stop_below: float | None = None,
) -> dict[str, Any]:
    """Train for ``steps`` steps; evaluate at step 0, every ``eval_every`` steps and at the end.

    ``batch_loss(step)`` returns the training loss of that step's batch (model in train mode).
    ``evaluate()`` runs under ``torch.no_grad`` in eval mode. ``stop_when(metrics)`` ends training
    early (e.g. when a model has grokked). ``stop_below`` ends training *before* the step whose batch
    loss is at or below it (with full-batch training: as soon as the training loss reaches it), and
    ``reached_at`` says at which step. A non-finite training loss stops the run and is reported as
    ``diverged_at``. Returns ``{"last": metrics, "steps_done": n, "diverged_at": step|None,
    "reached_at": step|None}``.
    """

    def run_eval(step: int) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            metrics = evaluate()
        model.train()
        on_eval(step, metrics)
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if isinstance(v, float)}, refresh=False)
        return metrics

    model.train()
    last = run_eval(0)
    diverged_at = reached_at = None
    done = 0
    for step in range(steps):
        optimizer.zero_grad()
        loss = batch_loss(step)
        if not torch.isfinite(loss):
            diverged_at = step
            break
        if stop_below is not None and loss.item() <= stop_below:
            reached_at = step
            if done % eval_every != 0:
                last = run_eval(done)
            break
        loss.backward()
        optimizer.step(step)
        done = step + 1
        bar.update(1)
        if after_step is not None:
            after_step(done)
        if done % eval_every == 0 or done == steps:
            last = run_eval(done)
            if stop_when is not None and stop_when(last):
                break
    return {"last": last, "steps_done": done, "diverged_at": diverged_at, "reached_at": reached_at}


def train_arm(folder: Any, context: Any, arm: str, seed: int, *, steps: int,
              final: dict[str, dict[str, list]] | None = None, **loop_options: Any) -> dict[str, Any]:
    """One (arm, seed) training run of an experiment: :func:`train_loop` under the run folder's timer
    and a progress bar, every evaluation logged as a curve point of ``arm``/``seed``. When ``final``
    is given, the last evaluation's metrics are appended to ``final[arm][metric]``."""
    with folder.timed(f"train {arm} seed {seed}"), context.bar(total=steps, desc=f"{arm} s{seed}") as bar:
        outcome = train_loop(steps=steps, bar=bar,
                             on_eval=lambda step, m: folder.log_point(arm, seed, step=step, **m), **loop_options)
    if final is not None:
        row = final.setdefault(arm, {})
        for name, value in outcome["last"].items():
            row.setdefault(name, []).append(value)
    return outcome



def record_final_means(folder: Any, final: dict[str, dict[str, list]]) -> None:
    """Each arm's metrics: the mean over seeds (:func:`~gaugeopt.experiments.common.mean`) of the last
    evaluations :func:`train_arm` collected in ``final``."""
    for arm, row in final.items():
        for name, values in row.items():
            folder.set_metric(arm, name, mean(values))


def classifier_closures(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                        val: tuple[torch.Tensor, torch.Tensor], batch_size: int, seed: int
                        ) -> tuple[Callable[[int], torch.Tensor], Callable[[], dict[str, float]]]:
    """``batch_loss`` and ``evaluate`` for :func:`train_loop` on a classifier whose data fit in
    memory: cross-entropy of a random batch (indices from a generator seeded ``10_000 + seed``), and
    the full train loss, validation loss and validation accuracy."""
    (train_x, train_y), (val_x, val_y) = train, val
    batches = torch.Generator().manual_seed(10_000 + seed)

    def batch_loss(step: int) -> torch.Tensor:
        index = torch.randint(0, len(train_y), (batch_size,), generator=batches).to(train_x.device)
        return F.cross_entropy(model(train_x[index]), train_y[index])

    def evaluate() -> dict[str, float]:
        train_loss = F.cross_entropy(model(train_x), train_y).item()
        logits = model(val_x)
        return {"train_loss": train_loss, "val_loss": F.cross_entropy(logits, val_y).item(),
                "val_acc": (logits.argmax(-1) == val_y).float().mean().item()}

    return batch_loss, evaluate
