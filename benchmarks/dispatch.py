"""Operations, memory traffic and host reads per optimizer step, counted with a ``TorchDispatchMode``
(and a ``TorchFunctionMode`` for the reads that dispatch nothing).

Every tensor operation an eager step runs reaches torch's dispatcher once (a composite op's inner
calls do not reach a mode again), so the counts are device-independent:

* **operations**: every one dispatched, views and host reads included; a step whose count grows
  with the model's depth is launch-bound on a GPU for small and medium widths;
* **launches**: the kernels the operations run on a CUDA device: none for views (metadata only),
  allocations without initial values and host reads, one for every other operation, but one per
  member for a multi-tensor (``_foreach_``) operation whose lists torch's multi-tensor kernels
  cannot take together: corresponding tensors of other sizes or strides (a factor broadcast to each
  member, a 0-d tensor per member), of another dtype or device, or not contiguous send the CUDA
  operation down its per-tensor fallback (torch's ``check_fast_path_restrictions``; on a CPU every
  ``_foreach_`` operation loops over its members);
* **bytes**: what each operation reads and writes, the sum of its tensor arguments' and results'
  sizes (a tensor passed twice counted once; an argument the operation writes counted as read and
  written, except where it only writes: ``out=``, ``copy_``, ``zero_``, ``fill_``). View operations
  move nothing. On a GPU an optimizer step is bound by this traffic: torch's fused AdamW moves 28
  bytes per float32 parameter (reads ``p, g, m, v``, writes ``p, m, v``), its foreach AdamW 80;
* **host reads**: operations that bring a tensor's values to the host program, by kind: every
  ``aten._local_scalar_dense`` (``item()``, ``bool()``, ``float()``, ``int()`` of a tensor, a tensor
  in an ``if``), ``aten.equal`` (whose answer is a Python bool), operations whose result's size
  depends on values (``nonzero``, ``unique``, ``masked_select``), a copy from a device to the CPU,
  a blocking copy from the CPU to a device (a ``copy_`` or ``to`` without ``non_blocking``, and
  ``torch.tensor(numbers, device=...)``: each waits for the device's queue before it copies), and
  ``Tensor.tolist`` and ``Tensor.numpy``, which copy memory to the host without dispatching an
  operation. On an accelerator each read waits for the device to finish the work queued before it:
  a step that reads nothing back can be queued whole, or captured in a CUDA graph.

The counts here are taken on the reference language model at two depths, after two untimed steps
(state allocation and the step's layout happen there), each step on new gradient tensors as
backward leaves them after torch's ``zero_grad()`` (or, asked, on gradients kept from step to step);
:func:`iteration_traffic` counts a whole training iteration, phase by phase.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gaugeopt.gauges import GaugeSet

from .optimizer_steps import VOCAB, model_with_gradients, next_token_loss, reference_tokens

__all__ = ["DispatchCounter", "HostReads", "dispatched_ops", "count_at_depths", "iteration_traffic",
           "iterations_traffic", "step_traffic"]

#: Operations that write an argument without reading it.
_WRITE_ONLY = frozenset({"aten.copy_.default", "aten.zero_.default", "aten.fill_.Scalar", "aten.fill_.Tensor",
                         "aten._foreach_copy_.default", "aten._foreach_zero_.default", "aten.set_.source_Storage",
                         "aten.set_.source_Storage_storage_offset", "aten.set_.source_Tensor"})
#: Operations that move no bytes: views not marked as such, and allocations without initial values.
_NO_TRAFFIC = frozenset({"aten._unsafe_view.default", "aten.lift_fresh.default", "aten._reshape_alias.default",
                         "aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default",
                         "aten.new_empty.default", "aten.new_empty_strided.default"})
#: Arguments that an operation's schema marks as written but that it only reads (torch's fused
#: optimizers declare the gradients mutable for ``maximize`` and the gradient scaler).
_READ_ONLY_ARGUMENTS = frozenset({"grads", "state_steps"})
#: Operations whose answer the host reads: a Python number or bool, or a result whose size depends
#: on tensor values.
_HOST_READS = frozenset({"aten.nonzero.default", "aten._local_scalar_dense.default", "aten.equal.default",
                         "aten._unique2.default", "aten.unique_dim.default", "aten.masked_select.default"})


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _HostCopies(TorchFunctionMode):
    """The tensor methods that copy a tensor's memory to the host without dispatching an operation
    (a dispatch mode alone does not see them; what they dispatch inside is not counted again), and
    the factories that copy host data to a device, which wait for its queue."""

    METHODS = (torch.Tensor.tolist, torch.Tensor.numpy)
    #: Factories that copy host data to the tensor's device, blocking when that is not the CPU.
    FACTORIES = (torch.tensor, torch.as_tensor)

    def __init__(self, counter: DispatchCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FACTORIES:
            device = (kwargs or {}).get("device")
            if device is not None and torch.device(device).type != "cpu" and not self.counter._inside_host_copy:
                self.counter.reads[f"torch.{func.__name__} to {torch.device(device).type}, blocking"] += 1
            return func(*args, **(kwargs or {}))
        if func not in self.METHODS:
            return func(*args, **(kwargs or {}))
        self.counter.reads[f"Tensor.{func.__name__}"] += 1
        self.counter._inside_host_copy += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter._inside_host_copy -= 1


class DispatchCounter(TorchDispatchMode):
    """Counts, while it is active, the operations dispatched (``counts``, by name), those that launch
    a kernel (``launches``, by name), the bytes they move (``bytes``, by name) and the host reads
    (``reads``, by kind; module docstring). The
    profiler's record-function markers (``torch.optim`` wraps each step in one) are not tensor work
    and are not counted."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.launches: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.reads: Counter[str] = Counter()
        self._inside_host_copy = 0
        self._copies = _HostCopies(self)

    def __enter__(self) -> DispatchCounter:
        self._copies.__enter__()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._copies.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "profiler":
            return out
        name = str(func)
        self.counts[name] += 1
        if not func.is_view and name not in _NO_TRAFFIC and name not in _HOST_READS:
            self.launches[name] += _kernels(name, args, kwargs)
        if not self._inside_host_copy:
            if name in _HOST_READS:
                self.reads[name] += 1
            elif name in ("aten._to_copy.default", "aten.copy_.default"):
                sources = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                if any(s.device.type != "cpu" for s in sources) and any(r.device.type == "cpu" for r in results):
                    self.reads[f"{name} to cpu"] += 1
                source = args[1] if name == "aten.copy_.default" else args[0]
                blocking = not (kwargs.get("non_blocking") or (name == "aten.copy_.default" and len(args) > 2
                                                                and args[2]))
                if blocking and source.device.type == "cpu" and any(r.device.type != "cpu" for r in results):
                    self.reads[f"{name} from cpu, blocking"] += 1
        if not func.is_view and name not in _NO_TRAFFIC:
            self.bytes[name] += self._traffic(func, name, args, kwargs, out)
        return out

    @staticmethod
    def _traffic(func, name: str, args, kwargs, out) -> int:
        written: dict[int, torch.Tensor] = {}
        read: dict[int, torch.Tensor] = {}
        schema = func._schema
        for index, argument in enumerate(schema.arguments):
            value = kwargs.get(argument.name) if argument.kwarg_only or index >= len(args) else args[index]
            tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
            writes = argument.alias_info is not None and argument.alias_info.is_write and \
                not (name.startswith("aten._fused_") and argument.name in _READ_ONLY_ARGUMENTS)
            for t in tensors:
                if writes:
                    written[id(t)] = t
                if not writes or not (argument.is_out or name in _WRITE_ONLY):
                    read[id(t)] = t
        if not schema.is_mutable or not written:  # a functional op: its results are written
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    written.setdefault(id(t), t)
        return sum(_nbytes(t) for t in read.values()) + sum(_nbytes(t) for t in written.values())

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def total_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def host_reads(self) -> int:
        return sum(self.reads.values())


def _kernels(name: str, args, kwargs) -> int:
    """The kernels one launching operation runs on a CUDA device (module docstring: launches)."""
    if not name.startswith("aten._foreach_"):
        return 1
    lists = [a for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple)) and a
             and all(isinstance(t, torch.Tensor) for t in a)]
    first = lists[0]
    for tensors in lists:
        for t, like in zip(tensors, first):
            if t.shape != like.shape or t.stride() != like.stride() or t.dtype != first[0].dtype \
                    or t.device != first[0].device or not t.is_contiguous():
                return len(first)
    return 1


class HostReads:
    """The host reads alone of a :class:`DispatchCounter`: ``counts`` by kind and their ``total``."""

    def __init__(self):
        self._counter = DispatchCounter()

    def __enter__(self) -> HostReads:
        self._counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._counter.__exit__(*exc)

    @property
    def counts(self) -> Counter[str]:
        return self._counter.reads

    @property
    def total(self) -> int:
        return self._counter.host_reads


def dispatched_ops(make: Callable[[nn.Module, GaugeSet], object], model: nn.Module, gauges: GaugeSet,
                   gradients: str = "new") -> DispatchCounter:
    """What one ``step()`` dispatches (after two untimed steps), on a copy of ``model`` holding its
    gradients. ``gradients="new"``: every step finds new gradient tensors, as backward leaves them
    after torch's ``zero_grad()``; ``"kept"``: the same tensors every step, as after
    ``zero_grad(set_to_none=False)`` (backward accumulates into them)."""
    if gradients not in ("new", "kept"):
        raise ValueError(f'gradients must be "new" or "kept", got {gradients!r}')
    twin = copy.deepcopy(model)
    pairs = list(zip(model.parameters(), twin.parameters()))
    optimizer = make(twin, gauges.bind(twin))

    def hand_gradients() -> None:
        for p, q in pairs:
            if gradients == "new" or q.grad is None:
                q.grad = p.grad.clone()

    for _ in range(2):  # state and layout (kept gradients persist: the step moves them into their buffers)
        hand_gradients()
        optimizer.step()
    hand_gradients()
    with DispatchCounter() as counter:
        optimizer.step()
    return counter


def iteration_traffic(make: Callable[[nn.Module, GaugeSet], object], model: nn.Module, gauges: GaugeSet,
                      loss: Callable[[nn.Module], torch.Tensor]) -> dict[str, float]:
    """Bytes per parameter of each phase of one training iteration, the optimizer's ``zero_grad()``,
    forward and backward (``loss(model).backward()``), ``step``, on a copy of ``model``, after two
    untimed iterations: what the optimizer costs outside its step too (a ``zero_grad`` that kept the
    gradients would make backward add each one into its predecessor instead of handing over a new
    tensor)."""
    twin = copy.deepcopy(model)
    optimizer = make(twin, gauges.bind(twin))
    n = sum(p.numel() for p in twin.parameters())
    for _ in range(2):
        optimizer.zero_grad()
        loss(twin).backward()
        optimizer.step()
    out = {}
    with DispatchCounter() as counter:
        optimizer.zero_grad()
    out["zero_grad"] = counter.total_bytes / n
    with DispatchCounter() as counter:
        loss(twin).backward()
    out["forward_backward"] = counter.total_bytes / n
    with DispatchCounter() as counter:
        optimizer.step()
    out["step"] = counter.total_bytes / n
    return out


def step_traffic(factories: dict[str, Callable], *, width: int, layers: int, vocab: int = VOCAB) -> dict:
    """``{name: {"ops", "bytes_per_parameter", "host_reads", "top_bytes"}}`` of one step of each
    optimizer on the reference LM at ``width`` x ``layers`` with a vocabulary of ``vocab`` (float32)."""
    model, gauges = model_with_gradients(width, n_layers=layers, vocab=vocab)
    n = sum(p.numel() for p in model.parameters())
    out = {}
    for name, make in factories.items():
        c = dispatched_ops(make, model, gauges)
        out[name] = {"ops": c.total, "bytes_per_parameter": c.total_bytes / n, "host_reads": c.host_reads,
                     "top_bytes": [[op, b / n, c.counts[op]] for op, b in c.bytes.most_common()]}
    return {"width": width, "layers": layers, "vocab": vocab, "parameters": n, "optimizers": out}


def iterations_traffic(factories: dict[str, Callable], *, width: int, layers: int) -> dict:
    """``{name: {"zero_grad", "forward_backward", "step"}}``: :func:`iteration_traffic` of each
    optimizer on the reference LM at ``width`` x ``layers`` (float32) with its reference loss."""
    model, gauges = model_with_gradients(width, n_layers=layers)
    tokens = reference_tokens()
    out = {name: iteration_traffic(make, model, gauges, lambda m: next_token_loss(m, tokens))
           for name, make in factories.items()}
    return {"width": width, "layers": layers, "parameters": sum(p.numel() for p in model.parameters()),
            "optimizers": out}


def count_at_depths(factories: dict[str, Callable], *, width: int, depths: tuple[int, ...],
                    kept: frozenset[str] = frozenset()) -> dict:
    """``{"rows": [{"layers": L, "parameters": n, "ops": {name: count}, "top": {name: [[op, count], ...]}}],
    "kept": [name, ...]}``: each optimizer's step on new gradients, those named in ``kept`` on
    gradients kept from step to step (:func:`dispatched_ops`)."""
    rows = []
    for layers in depths:
        model, gauges = model_with_gradients(width, n_layers=layers)
        counts = {name: dispatched_ops(make, model, gauges, gradients="kept" if name in kept else "new")
                  for name, make in factories.items()}
        rows.append({"layers": layers, "parameters": sum(p.numel() for p in model.parameters()),
                     "ops": {name: c.total for name, c in counts.items()},
                     "launches": {name: c.total_launches for name, c in counts.items()},
                     "host_reads": {name: c.host_reads for name, c in counts.items()},
                     "top": {name: c.counts.most_common(5) for name, c in counts.items()}})
    return {"width": width, "rows": rows, "kept": sorted(kept & set(factories))}
