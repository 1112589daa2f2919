"""Lightning: the dead-direction monitor as a ``lightning.pytorch.Callback``.

:class:`DeadDirectionCallback` runs a :class:`~gaugeopt.monitor.DeadDirectionMonitor` inside
``Trainer.fit`` and hands each reading to every logger of the Trainer (``trainer.loggers``: the
LightningModule's ``self.logger`` among them) with ``log_metrics(scalars, step=trainer.global_step)``,
as Lightning's own ``LearningRateMonitor`` does, so readings are not held back by ``log_every_n_steps``.
It reads at the end of each training batch after an optimizer step: the step's gradients are still
there (automatic optimization zeroes them at the start of the next step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn

from ..dds import DEFAULT_REL_TOL
from ..dds.capture import PerSampleLoss
from ..gauges import GaugeSet
from ..monitor import DEFAULT_OBSERVABLES, DeadDirectionMonitor

__all__ = ["DeadDirectionCallback"]


class DeadDirectionCallback(pl.Callback):
    """Log dead-direction readings, gauge drift, the gauge-invariant gradient norm and the optimizer's
    frozen units every ``every`` optimizer steps of a Lightning ``Trainer``.

    Example::

        callback = DeadDirectionCallback(gauges, probe=(inputs, targets), loss=per_token_loss, every=100)
        lightning.pytorch.Trainer(max_steps=10_000, callbacks=[callback]).fit(module, data)

    Args:
        gauges, probe, loss, every, sites, observables, rel_tol: as for
            :class:`~gaugeopt.monitor.DeadDirectionMonitor`.
        model: the module the probe runs through; default the one the gauges were found on
            (``gauges.model``: the network inside the LightningModule, or the LightningModule itself),
            without gauges the LightningModule.

    The optimizer whose frozen units are read is the Trainer's, when it has exactly one. The monitor is
    built when training starts and kept in :attr:`monitor` (``table()``, ``plot()``).
    """

    def __init__(self, gauges: GaugeSet | None, *, probe: tuple[Any, Any], loss: PerSampleLoss, every: int = 100,
                 sites: Sequence[str] | None = None, observables: Sequence[str] = DEFAULT_OBSERVABLES,
                 rel_tol: float = DEFAULT_REL_TOL, model: nn.Module | None = None) -> None:
        super().__init__()
        self.settings = dict(gauges=gauges, probe=probe, loss=loss, every=every, sites=sites,
                             observables=observables, rel_tol=rel_tol)
        self.model = model
        self.monitor: DeadDirectionMonitor | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gauges = self.settings["gauges"]
        model = self.model if self.model is not None else gauges.model if gauges is not None else pl_module
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None

        def to_loggers(scalars: dict[str, float], step: int) -> None:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)

        self.monitor = DeadDirectionMonitor(model, optimizer=optimizer, logger=to_loggers, **self.settings)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.monitor.step(trainer.global_step)  # a batch that did not step repeats the count: no second reading

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()
