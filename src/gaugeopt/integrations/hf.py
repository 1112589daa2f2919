"""Hugging Face ``transformers.Trainer``: a gaugeopt optimizer in one argument, and the dead-direction
monitor as a ``TrainerCallback``.

**The optimizer.** ::

    gauges = gaugeopt.find_gauges(model, {"input_ids": ids[:1], "use_cache": False}, output="logits")
    trainer = Trainer(model=model, args=TrainingArguments(..., max_grad_norm=0.0), train_dataset=data,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(DDCAdam, gauges, lr=3e-3,
                                                                        weight_decay=0.1, max_grad_norm=1.0))

:func:`optimizer_cls_and_kwargs` returns what ``Trainer(optimizer_cls_and_kwargs=...)`` takes: a
factory (transformers calls it with the model it trains when it creates its optimizer, as it does for
its own Muon and Dion) and its keyword arguments. The Trainer keeps everything else: its learning-rate
schedule (``lr_scheduler_type``, warm-up) acts on the optimizer's groups, and accelerate wraps it.
The factory

* binds the GaugeSet to the model the Trainer optimizes (``gauges.bind``: the same parameter names and
  shapes; a GaugeSet found on a float64 copy, or a ``model_init`` run, works);
* gives every trainable parameter of at least two dimensions the optimizer's ``weight_decay`` and the
  others (biases, norm gains) none, the usual split (as the Trainer's own AdamW does for biases and
  norms; DDCMuon splits each group further into its Muon and Adam parts);
* with ``max_grad_norm``, clips the gradients by their gauge-invariant norm
  (:func:`gaugeopt.clip_grad_norm_`) in a step pre-hook of the optimizer, so that under a gradient
  scaler it sees unscaled gradients and a skipped step clips nothing. The Trainer's own clipping
  (``TrainingArguments.max_grad_norm``, 1.0 by default) measures the raw gradients, which is not
  gauge invariant and breaks the optimizers' equivariance: set it to 0.

The optimizer is built before accelerate prepares the model; under FSDP2 accelerate then replaces its
parameters with sharded ones, and the optimizer resolves them by name at its first step
(:meth:`gaugeopt.optim.base.FramedOptimizer.rebind`), keeping every frame.

**The monitor.** :class:`DeadDirectionCallback` runs a :class:`~gaugeopt.monitor.DeadDirectionMonitor`
inside the Trainer's loop and logs its readings with ``Trainer.log``: they reach every reporter of ``report_to`` (TensorBoard,
W&B, MLflow, ...) and ``trainer.state.log_history``, at the Trainer's ``global_step``. The reporters name
them as they name the loss (TensorBoard: ``train/dds/<site>/<observable>``, ``train/gauge_drift/<family>``).

Timing: the monitor reads right after the optimizer step (``on_optimizer_step``), while the gradients the
step used are still there (the Trainer zeroes them before ``on_step_end``), and the scalars are logged at
``on_step_end``, once ``global_step`` counts that step.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import transformers
from torch import nn

from ..dds import DEFAULT_REL_TOL
from ..dds.capture import PerSampleLoss
from ..gauges.gaugeset import GaugeSet
from ..monitor import DEFAULT_OBSERVABLES, DeadDirectionMonitor
from ..optim.clipping import clip_grad_norm_
from ..optim.ddc_adam import DDCAdam
from ..optim.ddc_muon import DDCMuon
from ..optim.symcompat import SymmetryCompatible, symmetry_param_groups

__all__ = ["optimizer_cls_and_kwargs", "GaugeOptimizerFactory", "DeadDirectionCallback"]

_GAUGED = (DDCAdam, DDCMuon)


def optimizer_cls_and_kwargs(optimizer: type[torch.optim.Optimizer], gauges: GaugeSet | None, *,
                             max_grad_norm: float | None = None, **settings: Any) -> tuple[type, dict[str, Any]]:
    """``(factory, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)`` (module docstring).

    Args:
        optimizer: :class:`~gaugeopt.DDCAdam`, :class:`~gaugeopt.DDCMuon` or
            :class:`~gaugeopt.SymmetryCompatible` (whose groups come from
            :func:`~gaugeopt.symmetry_param_groups` of the model; ``gauges`` must then be ``None``).
        gauges: the model's GaugeSet (``gaugeopt.find_gauges``), bound to the model the Trainer
            trains when it builds the optimizer.
        max_grad_norm: clip the gradients' gauge-invariant norm to this before every step (``None``:
            no clipping). Switch the Trainer's own clipping off (``max_grad_norm=0.0`` in its
            ``TrainingArguments``).
        settings: the optimizer's keyword arguments (``lr``, ``weight_decay``, ``adam_lr``, ...); the
            Trainer's ``learning_rate`` and ``weight_decay`` arguments are not read.

    Bad arguments (an unknown setting, a GaugeSet where none is taken) raise here, when the Trainer
    is set up, not when training starts.
    """
    if not (isinstance(optimizer, type) and issubclass(optimizer, (*_GAUGED, SymmetryCompatible))):
        raise TypeError(f"optimizer must be DDCAdam, DDCMuon or SymmetryCompatible, got {optimizer!r}")
    if gauges is not None and not isinstance(gauges, GaugeSet):
        raise TypeError(f"gauges must be a GaugeSet (from gaugeopt.find_gauges) or None, got {type(gauges).__name__}")
    if issubclass(optimizer, SymmetryCompatible) and gauges is not None:
        raise ValueError("SymmetryCompatible takes no GaugeSet (symmetry_param_groups configures it): pass gauges=None")
    if max_grad_norm is not None and not float(max_grad_norm) >= 0:
        raise ValueError(f"max_grad_norm must be a number >= 0 or None, got {max_grad_norm!r}")
    reserved = {"params", "gauges"} & set(settings)
    if reserved:
        raise TypeError(f"{sorted(reserved)} are set by the factory from the Trainer's model")
    placeholders = {"gauges": None} if issubclass(optimizer, _GAUGED) else {}
    inspect.signature(optimizer).bind(None, **placeholders, **settings)  # a TypeError naming an unknown setting
    return GaugeOptimizerFactory, {"optimizer": optimizer, "gauges": gauges, "max_grad_norm": max_grad_norm,
                                   **settings}


class GaugeOptimizerFactory:
    """What ``Trainer`` calls to build the optimizer: ``GaugeOptimizerFactory()(model, **kwargs)`` with
    the keyword arguments of :func:`optimizer_cls_and_kwargs`."""

    def __call__(self, model: nn.Module, *, optimizer: type[torch.optim.Optimizer], gauges: GaugeSet | None,
                 max_grad_norm: float | None, **settings: Any) -> torch.optim.Optimizer:
        if issubclass(optimizer, SymmetryCompatible):
            built = optimizer(symmetry_param_groups(model, verbose=False), **settings)
        else:
            if gauges is not None and gauges.model is not model:
                gauges = gauges.bind(model)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [{"params": [(n, p) for n, p in named if p.ndim >= 2]},
                      {"params": [(n, p) for n, p in named if p.ndim < 2], "weight_decay": 0.0}]
            built = optimizer([g for g in groups if g["params"]], gauges, **settings)
        if max_grad_norm is not None:
            built.register_step_pre_hook(_GaugeInvariantClipping(float(max_grad_norm), gauges))
        return built


class _GaugeInvariantClipping:
    """A step pre-hook: :func:`gaugeopt.clip_grad_norm_` on the optimizer's parameters, by ``gauges``."""

    def __init__(self, max_norm: float, gauges: GaugeSet | None):
        self.max_norm, self.gauges = max_norm, gauges

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        clip_grad_norm_(params, self.max_norm, self.gauges)



class DeadDirectionCallback(transformers.TrainerCallback):
    """Log dead-direction readings, gauge drift, the gauge-invariant gradient norm and the optimizer's
    frozen units every ``every`` optimizer steps of a ``transformers.Trainer``.

    Example::

        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, schedule))
        trainer.add_callback(DeadDirectionCallback(trainer, gauges, probe=(input_ids, labels),
                                                   loss=per_token_loss, every=100))
        trainer.train()

    Args:
        trainer: the Trainer whose ``log`` carries the readings to its reporters.
        gauges, probe, loss, every, sites, observables, rel_tol: as for
            :class:`~gaugeopt.monitor.DeadDirectionMonitor`. The model is the Trainer's (its outputs, e.g. a
            ``CausalLMOutput``, are what ``loss(outputs, targets)`` receives); the optimizer too.

    The monitor is built when training begins (the model is then on its device) and kept in
    :attr:`monitor`, whose ``table()`` and ``plot()`` stay available after training.
    """

    def __init__(self, trainer: transformers.Trainer, gauges: GaugeSet | None, *, probe: tuple[Any, Any],
                 loss: PerSampleLoss, every: int = 100, sites: Sequence[str] | None = None,
                 observables: Sequence[str] = DEFAULT_OBSERVABLES, rel_tol: float = DEFAULT_REL_TOL) -> None:
        if not isinstance(trainer, transformers.Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        self.trainer = trainer
        self.settings = dict(gauges=gauges, probe=probe, loss=loss, every=every, sites=sites,
                             observables=observables, rel_tol=rel_tol)
        self.monitor: DeadDirectionMonitor | None = None
        self._pending: dict[str, float] | None = None

    def _hold(self, scalars: dict[str, float], step: int) -> None:
        self._pending = scalars

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        settings = dict(self.settings)
        self.monitor = DeadDirectionMonitor(model, settings.pop("gauges"), optimizer=optimizer, logger=self._hold,
                                            **settings)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.monitor.step(state.global_step + 1)  # global_step counts this step from on_step_end on

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending is not None:
            scalars, self._pending = self._pending, None
            self.trainer.log(scalars)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
