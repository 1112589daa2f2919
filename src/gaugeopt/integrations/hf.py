"""Hugging Face ``transformers.Trainer``: the dead-direction monitor as a ``TrainerCallback``.

:class:`DeadDirectionCallback` runs a :class:`~gaugeopt.monitor.DeadDirectionMonitor` inside the Trainer's
loop and logs its readings with ``Trainer.log``: they reach every reporter of ``report_to`` (TensorBoard,
W&B, MLflow, ...) and ``trainer.state.log_history``, at the Trainer's ``global_step``. The reporters name
them as they name the loss (TensorBoard: ``train/dds/<site>/<observable>``, ``train/gauge_drift/<family>``).

Timing: the monitor reads right after the optimizer step (``on_optimizer_step``), while the gradients the
step used are still there (the Trainer zeroes them before ``on_step_end``), and the scalars are logged at
``on_step_end``, once ``global_step`` counts that step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import transformers

from ..dds import DEFAULT_REL_TOL
from ..dds.capture import PerSampleLoss
from ..gauges import GaugeSet
from ..monitor import DEFAULT_OBSERVABLES, DeadDirectionMonitor

__all__ = ["DeadDirectionCallback"]


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
