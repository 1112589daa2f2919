"""Operations dispatched per optimizer step, counted with a ``TorchDispatchMode``, and the reads of
tensor values by the host (:class:`HostReads`).

Every tensor operation an eager step runs reaches torch's dispatcher once (a composite op's inner
calls do not reach a mode again), so the count is device-independent and predicts the step's
launch cost on an accelerator, where each operation is at least one kernel launch. A step whose
count grows with the model's depth is launch-bound on a GPU for small and medium widths. The counts
here are taken on the reference language model at two depths, after one untimed step (state
allocation and the step's layout happen there).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gaugeopt.gauges import GaugeSet

from .optimizer_steps import model_with_gradients

__all__ = ["DispatchCounter", "HostReads", "dispatched_ops", "count_at_depths"]


class DispatchCounter(TorchDispatchMode):
    """Counts the operations dispatched while it is active, by name. The profiler's record-function
    markers (``torch.optim`` wraps each step in one) are not tensor work and are not counted."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "profiler":
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class _ScalarReads(TorchDispatchMode):
    """The dispatched operations that hand a tensor's value to the host."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default)

    def __init__(self, counts: Counter[str]):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


class _MemoryReads(TorchFunctionMode):
    """The tensor methods that copy a tensor's memory to the host without dispatching an operation."""

    READS = (torch.Tensor.tolist, torch.Tensor.numpy)

    def __init__(self, counts: Counter[str]):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.counts[f"Tensor.{func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


class HostReads:
    """Counts the reads of tensor values by the host while it is active, by kind: every
    ``aten._local_scalar_dense`` (``item()``, ``bool()``, ``float()``, ``int()`` of a tensor, a
    tensor in an ``if``), ``aten.equal`` (whose answer is a Python bool), and ``Tensor.tolist`` and
    ``Tensor.numpy``, which copy memory to the host without dispatching an operation (a dispatch mode
    alone does not see them). On an accelerator each read waits for the device to finish the work
    queued before it: a step that reads nothing back can be queued whole, or captured in a CUDA graph.
    """

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self._modes = (_MemoryReads(self.counts), _ScalarReads(self.counts))

    def __enter__(self) -> HostReads:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def dispatched_ops(make: Callable[[nn.Module, GaugeSet], object], model: nn.Module, gauges: GaugeSet
                   ) -> DispatchCounter:
    """The operations one ``step()`` dispatches (after an untimed first step), on a copy of ``model``."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    optimizer = make(twin, gauges.bind(twin))
    optimizer.step()
    with DispatchCounter() as counter:
        optimizer.step()
    return counter


def count_at_depths(factories: dict[str, Callable], *, width: int, depths: tuple[int, ...]) -> dict:
    """``{"rows": [{"layers": L, "parameters": n, "ops": {name: count}, "top": {name: [[op, count], ...]}}]}``."""
    rows = []
    for layers in depths:
        model, gauges = model_with_gradients(width, n_layers=layers)
        counts = {name: dispatched_ops(make, model, gauges) for name, make in factories.items()}
        rows.append({"layers": layers, "parameters": sum(p.numel() for p in model.parameters()),
                     "ops": {name: c.total for name, c in counts.items()},
                     "top": {name: c.counts.most_common(5) for name, c in counts.items()}})
    return {"width": width, "rows": rows}
