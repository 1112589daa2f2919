"""A live dead-direction monitor: DDS readings, gauge-orbit drift and gauge-invariant gradients while training.

Every ``every`` optimizer steps :class:`DeadDirectionMonitor` takes one *reading* of the model and hands
it to TensorBoard, to any callable logger, and to an in-memory table. A reading is:

* ``dds/<site>/<observable>``: the dead-direction observables of :mod:`gaugeopt.dds` at each site, from
  one forward and one backward pass on a fixed probe batch (:func:`gaugeopt.dds.dead_direction_signatures`):
  ``lambda_min`` (smallest positive eigenvalue), ``logdet`` (log pseudo-determinant) and ``rank`` (of the
  positive spectrum) of ``G = D^T D / N`` (per-sample gradients at the site) and ``A = X^T X / N``
  (activations). The default sites are the outputs of every ``nn.Linear`` whose weight a gauge family acts
  on; a site is named as in :mod:`gaugeopt.dds` without the default ``:output`` side;
* ``gauge_drift/<family>``: how far the family's orbit coordinates moved since the monitor was built,
  ``sqrt(mean_i (c_i(now) - c_i(start))^2)`` (:func:`gaugeopt.dds.orbit_drift`; ``log|g|`` of a norm's gains,
  ``log(|in_i| / |w~_in|)`` of a neuron unit, ``|w~_in|`` the section point of its size
  (:func:`gaugeopt.gauges.unit_section`), the mean row of a logit-shifted head). A gauge-equivariant
  optimizer leaves it at rounding, AdamW drifts along the orbits. Rotation families have no orbit
  coordinate and are not logged;
* ``grad_norm/gauge_invariant``: the 2-norm of the gradients the optimizer just stepped on, measured in the
  optimizers' frames (:func:`gaugeopt.optim.gauge_invariant_grad_norm`), so a gauge transformation of the
  model leaves it unchanged (torch's global norm is not). Not logged when no parameter holds a gradient;
* ``frozen_units/total`` and ``frozen_units/<family>``: the dead norm channels and neuron units the
  optimizer froze at its last step (``optimizer.frozen`` of DDCAdam and DDCMuon), when given one.

The rate readout of :mod:`gaugeopt.dds` (readable cells) is not reported live: its rule is validated
against known distances to the singular set, not yet on a clock that a running training has (the remaining
arc length needs the end of the run). :attr:`DeadDirectionMonitor.readings` and ``steps`` keep every
reading's rows, which is what :func:`gaugeopt.dds.rate_readout` takes once a clock is chosen.

Distributed training: every rank calls :meth:`DeadDirectionMonitor.step`, and rank 0 logs. Under DDP the
replicas are equal, so rank 0 reads its own replica (the module inside the wrapper) and the other ranks
do nothing. Under FSDP2 (``DTensor`` parameters) the probe's forward and backward, the gradient norm and
the gathering of the gauge families' parameters are collectives: every rank takes part, so no rank waits
on another, and rank 0 computes the spectra and orbit coordinates and logs them.
"""

from __future__ import annotations

import math
import time
from dataclasses import fields
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .dds import (
    DEFAULT_REL_TOL,
    SLOPE_OBSERVABLES,
    DDSReading,
    SiteObservables,
    capture_sites,
    dead_direction_signatures,
    orbit_drift,
)
from .dds.capture import PerSampleLoss, SiteSpec, resolve_sites
from .gauges import GaugeSet, uncompiled
from .optim import gauge_invariant_grad_norm
from .optim.distributed import full_tensor, is_sharded

__all__ = ["DeadDirectionMonitor", "ScalarLogger", "DEFAULT_OBSERVABLES", "gauge_carrying_sites"]

ScalarLogger = Callable[[dict[str, float], int], Any]
"""``logger(scalars, step)``: ``scalars`` maps each tag (``"dds/head/logdet_G"``) to its value."""

#: The observables logged per site: the four cells of the rate readout and the two ranks.
DEFAULT_OBSERVABLES: tuple[str, ...] = (*SLOPE_OBSERVABLES, "rank_G", "rank_A")
_ROW_VALUES = tuple(field.name for field in fields(SiteObservables) if field.name != "site")  # the numbers of a row

GRAD_NORM_TAG = "grad_norm/gauge_invariant"
FROZEN_TOTAL_TAG = "frozen_units/total"


def gauge_carrying_sites(model: nn.Module, gauges: GaugeSet | None) -> list[str]:
    """The outputs of the ``nn.Linear`` layers of ``model`` whose weight a family of ``gauges`` acts on
    (every ``nn.Linear`` when ``gauges`` is None), in module order."""
    touched = gauges.parameters_touched() if gauges is not None else None
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (touched is None or f"{name}.weight" in touched)]


def site_tag(site: str) -> str:
    """The tag name of a site: ``"module"`` for its output, ``"module:input"`` for its input."""
    spec = SiteSpec.parse(site)
    return spec.module if spec.side == "output" else str(spec)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper and a ``torch.compile`` wrapper: the one whose parameter names the
    gauges use, and whose layers the probe's hooks attach to."""
    model = uncompiled(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = uncompiled(model.module)
    return model


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


def _frozen_units(optimizer: Any) -> Mapping[str, Sequence[int]] | None:
    """``optimizer.frozen`` (DDCAdam, DDCMuon), looking through wrappers that keep the optimizer in an
    ``optimizer`` attribute (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``)."""
    seen = 0
    while optimizer is not None and seen < 4:
        frozen = getattr(optimizer, "frozen", None)
        if isinstance(frozen, Mapping):
            return frozen
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


class _GatheredParameters:
    """Whole copies of sharded parameters, read by :meth:`GaugeSet.orbit_coordinates` as a model is
    (it asks only for ``named_parameters()``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        return iter(self._tensors.items())


class DeadDirectionMonitor:
    """Log DDS readings, orbit drift, the gauge-invariant gradient norm and frozen units every ``every``
    steps (module docstring).

    Example::

        monitor = DeadDirectionMonitor(model, gauges, probe=(inputs, targets),
                                       loss=per_sample_loss, every=100, log_dir="runs/x")
        for batch in loader:
            ...; optimizer.step(); monitor.step()
        monitor.close()

    Args:
        model: the model being trained (a DDP or ``torch.compile`` wrapper is looked through).
        gauges: its :class:`~gaugeopt.gauges.GaugeSet` from ``gaugeopt.find_gauges``, or ``None`` (then no
            drift is logged, the gradient norm is torch's plain one and every ``nn.Linear`` is a site).
        probe: ``(inputs, targets)``, a fixed batch: the model is called as ``model(inputs)`` (or
            ``model(*inputs)`` for a tuple) and ``loss(outputs, targets)``. Tensors are moved to the
            model's device once, here.
        loss: per-sample (or per-token) losses, e.g. ``F.cross_entropy(..., reduction="none")``; a loss
            reduced to a scalar is refused (it would scale every per-sample gradient by 1/N).
        every: read at every positive step number divisible by ``every``.
        log_dir: write TensorBoard event files there (``pip install gaugeopt[tensorboard]``).
        logger: also (or instead) call ``logger(scalars, step)`` at each reading.
        sites: the DDS sites (``"module"``, ``"module:input"``); default :func:`gauge_carrying_sites`.
        observables: the fields of a DDS row logged per site (default :data:`DEFAULT_OBSERVABLES`).
        optimizer: read its ``frozen`` units (DDCAdam, DDCMuon; ignored when it has none).
        rel_tol: eigenvalues at or below ``rel_tol * lambda_max`` count as zero.

    The probe is read in eval mode (the modes of all modules are restored afterwards), so a reading is
    deterministic and leaves no trace in the model: no parameter gradient, no running statistic.
    """

    def __init__(self, model: nn.Module, gauges: GaugeSet | None, *, probe: tuple[Any, Any], loss: PerSampleLoss,
                 every: int = 100, log_dir: str | Path | None = None, logger: ScalarLogger | None = None,
                 sites: Sequence[str] | None = None, observables: Sequence[str] = DEFAULT_OBSERVABLES,
                 optimizer: Any = None, rel_tol: float = DEFAULT_REL_TOL) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if gauges is not None and not isinstance(gauges, GaugeSet):
            raise TypeError("gauges must be a GaugeSet (from gaugeopt.find_gauges) or None, "
                            f"got {type(gauges).__name__}")
        if not isinstance(probe, tuple) or len(probe) != 2:
            raise ValueError("probe must be a pair (inputs, targets)")
        if not callable(loss):
            raise TypeError("loss must be callable: loss(outputs, targets) -> per-sample losses")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if logger is not None and not callable(logger):
            raise TypeError("logger must be callable as logger(scalars, step)")
        unknown = [name for name in observables if name not in _ROW_VALUES]
        if isinstance(observables, str) or unknown or not observables:
            raise ValueError(f"observables must be a non-empty list from {list(_ROW_VALUES)}, got {observables!r}")
        self.model = _unwrapped(model)
        self.gauges = gauges
        self.loss = loss
        self.every = every
        self.logger = logger
        self.observables = tuple(observables)
        self.optimizer = optimizer
        self.rel_tol = rel_tol
        self.sites = list(sites) if sites is not None else gauge_carrying_sites(self.model, gauges)
        if not self.sites:
            raise ValueError("sites: the model has no nn.Linear layer that a gauge family acts on; name the sites")
        resolve_sites(self.model, self.sites)  # unknown modules and duplicates fail here, not at step 100
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        self.probe = (_to_device(probe[0], device), _to_device(probe[1], device))
        self.sharded = any(is_sharded(p) for p in self.model.parameters())
        self.rank = _rank()
        self.is_reader = self.rank == 0
        self.steps: list[int] = []
        self.readings: list[DDSReading] = []  # rows and skipped sites of each reading (spectra dropped)
        self.skipped: dict[str, str] = {}  # sites of the last reading that could not be read, with reasons
        self._rows: list[dict[str, float]] = []
        self._count = 0
        self._writer = None
        self._closed = False
        self._start = self._orbit_coordinates() if gauges is not None else None
        if log_dir is not None and self.is_reader:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError("log_dir needs tensorboard: pip install 'gaugeopt[tensorboard]'") from error
            self._writer = SummaryWriter(log_dir=str(log_dir))

    # ----- the loop's side -----------------------------------------------------------------------------
    def step(self, step: int | None = None) -> dict[str, float] | None:
        """Count one optimizer step (or set the count to ``step``) and read when the count is a positive
        multiple of ``every`` not read yet. Returns the reading's scalars on rank 0 at a reading, else
        ``None``. Call it on every rank, after ``optimizer.step()``; :meth:`read` reads at any step (e.g.
        ``read(0)`` before training, for a baseline)."""
        if step is None:
            step = self._count + 1
        elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self._count = step
        if step == 0 or step % self.every or (self.steps and step <= self.steps[-1]):
            return None
        return self.read(step)

    def read(self, step: int) -> dict[str, float] | None:
        """Take one reading now and log it at ``step`` (whatever ``every`` says); the scalars on rank 0."""
        if self._closed:
            raise RuntimeError("the monitor is closed")
        if not (self.is_reader or self.sharded):
            return None  # DDP or another replica: rank 0 reads its own copy, no collective is involved
        started = time.perf_counter()
        scalars: dict[str, float] = {}
        reading = self._dds_reading()
        coordinates = self._orbit_coordinates() if self.gauges is not None else None
        grad_norm = self._grad_norm()
        if not self.is_reader:
            return None
        for row in reading.rows:
            site = site_tag(row.site)
            for name in self.observables:
                scalars[f"dds/{site}/{name}"] = float(getattr(row, name))
        if coordinates is not None:
            for family, drift in orbit_drift(self._start, coordinates).items():
                if drift["coordinates"]:
                    scalars[f"gauge_drift/{family}"] = float(drift["rms_change"])
        if grad_norm is not None:
            scalars[GRAD_NORM_TAG] = grad_norm
        frozen = _frozen_units(self.optimizer)
        if frozen is not None:
            scalars[FROZEN_TOTAL_TAG] = float(sum(len(units) for units in frozen.values()))
            scalars.update({f"frozen_units/{family}": float(len(units)) for family, units in frozen.items()})
        self.steps.append(int(step))
        self.readings.append(DDSReading(rows=reading.rows, skipped=dict(reading.skipped)))
        self.skipped = dict(reading.skipped)
        self._rows.append({"step": int(step), **scalars, "reading_s": time.perf_counter() - started})
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()
        if self.logger is not None:
            self.logger(dict(scalars), int(step))
        return scalars

    def close(self) -> None:
        """Flush and close the TensorBoard writer (the table stays readable)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._closed = True

    def __enter__(self) -> DeadDirectionMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- the three measurements ----------------------------------------------------------------------
    def _dds_reading(self) -> DDSReading:
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            if self.is_reader:
                return dead_direction_signatures(self.model, *self.probe, loss=self.loss, sites=self.sites,
                                                 rel_tol=self.rel_tol)
            capture_sites(self.model, *self.probe, self.loss, self.sites)  # the FSDP2 collectives of the probe
            return DDSReading(rows=(), skipped={})
        finally:
            for module, training in modes:
                module.training = training

    def _orbit_coordinates(self) -> dict[str, torch.Tensor] | None:
        """The families' orbit coordinates on rank 0 (``None`` elsewhere); under FSDP2 the parameters they
        read are gathered whole first, on every rank."""
        if not self.sharded:
            return self.gauges.orbit_coordinates(self.model) if self.is_reader else None
        parameters = dict(self.model.named_parameters())
        whole = {name: full_tensor(parameters[name]) for name in sorted(self.gauges.parameters_touched())}
        return self.gauges.orbit_coordinates(_GatheredParameters(whole)) if self.is_reader else None

    def _grad_norm(self) -> float | None:
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        if not parameters:
            return None
        norm = gauge_invariant_grad_norm(parameters, self.gauges)
        return float(norm) if self.is_reader else None

    # ----- what was read -------------------------------------------------------------------------------
    def table(self) -> list[dict[str, float]]:
        """One row per reading: ``step``, every logged tag and ``reading_s`` (the reading's wall time in
        seconds). ``pandas.DataFrame(monitor.table())`` makes it a data frame. Empty off rank 0."""
        return [dict(row) for row in self._rows]

    def plot(self, path: str | Path | None = None, *, axes: Sequence[Any] | None = None, title: str | None = None):
        """The trajectories in four panels: ``logdet_G`` and ``lambda_min_G`` per site, the drift per gauge
        family, and the gauge-invariant gradient norm (with the frozen units, when any). Draws into
        ``axes`` (four matplotlib axes) when given, else into a new figure; saves it to ``path`` when given.
        Returns the figure."""
        if axes is None:
            from matplotlib.figure import Figure  # no pyplot: works on any backend, and without a display

            figure = Figure(figsize=(11, 7.5), dpi=110)
            axes = list(figure.subplots(2, 2).flat)
        elif len(axes) != 4:
            raise ValueError(f"axes must be four matplotlib axes, got {len(axes)}")
        figure = axes[0].figure
        steps = [row["step"] for row in self._rows]
        panels = [("logdet_G", "logdet+ of G (per site)", "linear"),
                  ("lambda_min_G", "lambda+_min of G (per site)", "log")]
        for ax, (observable, label, scale) in zip(axes[:2], panels):
            tags = self._tags(lambda tag: tag.startswith("dds/") and tag.endswith(f"/{observable}"))
            self._lines(ax, steps, tags, lambda tag: tag[len("dds/"):-len(observable) - 1])
            ax.set_yscale(scale if tags else "linear")
            ax.set_title(label if tags else f"{label}: not logged", fontsize=10)
        drift = self._tags(lambda tag: tag.startswith("gauge_drift/"))
        self._lines(axes[2], steps, drift, lambda tag: tag[len("gauge_drift/"):])
        axes[2].set_title("gauge drift: RMS change of the orbit coordinates" if drift else "gauge drift: not logged",
                          fontsize=10)
        norms = [row.get(GRAD_NORM_TAG, math.nan) for row in self._rows]
        axes[3].plot(steps, norms, color="black", marker=".", label="gauge-invariant grad norm")
        axes[3].set_yscale("log" if any(v > 0 for v in norms) else "linear")
        axes[3].set_title("gauge-invariant gradient norm", fontsize=10)
        frozen = [row.get(FROZEN_TOTAL_TAG) for row in self._rows]
        if any(v for v in frozen if v is not None):
            twin = axes[3].twinx()
            twin.step(steps, [math.nan if v is None else v for v in frozen], where="post", color="tab:red")
            twin.set_ylabel("frozen units", color="tab:red")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        if title:
            figure.suptitle(title)
        figure.tight_layout()
        if path is not None:
            figure.savefig(path)
        return figure

    def _tags(self, keep: Callable[[str], bool]) -> list[str]:
        return list(dict.fromkeys(tag for row in self._rows for tag in row if keep(tag)))

    def _lines(self, ax, steps: list[int], tags: list[str], label: Callable[[str], str]) -> None:
        import matplotlib

        colours = matplotlib.colormaps["viridis"]
        for i, tag in enumerate(tags):
            values = [row.get(tag, math.nan) for row in self._rows]
            ax.plot(steps, values, color=colours(i / max(1, len(tags) - 1)), linewidth=1.2, label=label(tag))
        if tags:
            ax.legend(fontsize=6, ncol=2 if len(tags) > 8 else 1, loc="best")
