"""Orbit-drift audit: how far an optimizer moves each gauge family's orbit coordinates.

A gauge family acts on the parameters without changing the function (e.g. rescaling a hidden
neuron's input weights by ``c`` and its output weights by ``1/c``). Its *orbit coordinates* say
where on the orbit the parameters sit (for that example, ``log(|in_i| / |out_i|)`` per neuron).
A quotient-respecting optimizer leaves them where they started; Adam-type optimizers drift along
orbits. The audit needs only an object with ``orbit_coordinates(model) -> dict[str, Tensor]``
(each value a 1-D tensor), which ``gaugeopt.find_gauges(model, ...)`` returns.

For each family, the drift from the start is ``delta = c_now - c_start`` and the audit reports
``max_abs_change = max_i |delta_i|`` and ``rms_change = sqrt(mean_i delta_i^2)``, plus the largest
``max_abs_change`` seen at any recording. A coordinate that is not finite at either end (a dead unit:
``log 0``) has no drift; it is left out of both and counted in ``undefined``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn


class HasOrbitCoordinates(Protocol):
    def orbit_coordinates(self, model: nn.Module) -> Mapping[str, torch.Tensor]: ...


def _snapshot(gauges: HasOrbitCoordinates, model: nn.Module) -> dict[str, torch.Tensor]:
    coordinates = gauges.orbit_coordinates(model)
    if not isinstance(coordinates, Mapping):
        raise TypeError("orbit_coordinates(model) must return a mapping family -> 1-D tensor, got "
                        f"{type(coordinates).__name__}")
    return {name: torch.as_tensor(value).detach().to(torch.float64).reshape(-1).clone()
            for name, value in coordinates.items()}


def orbit_drift(start: Mapping[str, torch.Tensor],
                now: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float | int]]:
    """Per family: ``max_abs_change``, ``rms_change``, the number of ``coordinates`` they are taken over
    and the number left out as ``undefined`` (not finite at the start or now)."""
    if set(start) != set(now):
        raise ValueError(f"gauge families differ: {sorted(start)} at the start, {sorted(now)} now")
    drift: dict[str, dict[str, float | int]] = {}
    for name, first in start.items():
        first = torch.as_tensor(first, dtype=torch.float64).reshape(-1)
        current = torch.as_tensor(now[name], dtype=torch.float64).reshape(-1)
        if first.shape != current.shape:
            raise ValueError(f"family {name!r} changed from {first.numel()} to "
                             f"{current.numel()} orbit coordinates")
        defined = torch.isfinite(first) & torch.isfinite(current)
        delta = (current - first)[defined]
        count = int(delta.numel())
        drift[name] = {
            "max_abs_change": float(delta.abs().max()) if count else 0.0,
            "rms_change": float(delta.pow(2).mean().sqrt()) if count else 0.0,
            "coordinates": count,
            "undefined": int(defined.numel()) - count,
        }
    return drift


class OrbitDriftRecorder:
    """Snapshots orbit coordinates at construction and reports their drift at each :meth:`record`.

    Example::

        gauges = gaugeopt.find_gauges(model, example_inputs)
        audit = OrbitDriftRecorder(gauges, model)
        for step in range(steps):
            optimizer.step()
            if step % 100 == 0:
                audit.record(step)
        audit.report()  # {"family": {"max_abs_change": ..., "rms_change": ..., ...}}
    """

    def __init__(self, gauges: HasOrbitCoordinates, model: nn.Module) -> None:
        if not callable(getattr(gauges, "orbit_coordinates", None)):
            raise TypeError("gauges must offer orbit_coordinates(model), e.g. a GaugeSet from "
                            "gaugeopt.find_gauges")
        self.gauges = gauges
        self.model = model
        self.start = _snapshot(gauges, model)
        self.steps: list[int] = []
        self.history: list[dict[str, dict[str, float | int]]] = []

    def record(self, step: int) -> dict[str, dict[str, float | int]]:
        """The drift of every family from the start, now; also kept in ``history``."""
        drift = orbit_drift(self.start, _snapshot(self.gauges, self.model))
        self.steps.append(int(step))
        self.history.append(drift)
        return drift

    def report(self) -> dict[str, dict[str, Any]]:
        """Drift at the last recording plus ``max_abs_change_over_run`` per family."""
        if not self.history:
            raise ValueError("nothing recorded yet; call record(step) first")
        last = self.history[-1]
        return {
            name: {**values,
                   "max_abs_change_over_run": max(h[name]["max_abs_change"] for h in self.history),
                   "last_step": self.steps[-1]}
            for name, values in last.items()
        }
