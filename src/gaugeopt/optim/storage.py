"""Persistent stacked storage: the rule state of a batch as one buffer, each member's state a view of it.

The step updates a batch's state as one stacked tensor ``(L, ...)``; ``optimizer.state[p][key]`` is
the member's slice of that buffer (a view), so ``state_dict``, checkpoints and schedulers see
ordinary per-parameter state, and nothing is stacked or copied back in a step. A buffer is made once
per layout (from the members' entries: their values survive a new layout) and handed out again
while every member's entry is still the view it was given.

Parameters and their gradients may be held the same way (the optimizers' ``stack_parameters=True``):
:func:`move_into_stack` gives a batch's parameters one buffer, each parameter's ``.data`` its slice,
:func:`hold_gradients` does the same for their ``.grad`` (backward then accumulates into it;
:class:`HeldGradients` says when), and
:func:`stacked_view` finds such members again at every step (:func:`stacked_rows`: also members
read in another order), so the step reads and writes them where they are instead of stacking a copy
and copying the new values back. It is checked, not assumed: members that no longer lie one after
another in one buffer (``model.to(...)`` moved them, a load replaced them, backward made new
gradients) are stacked as copies.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .guards import compute_dtype
from .shards import local_tensor, shard_like

__all__ = ["HeldGradients", "ScalarTables", "StackedState", "hold_gradients", "move_into_stack", "owns_its_memory",
           "stacked_rows", "stacked_view"]


class StackedState:
    """A batch's rule state as stacked buffers whose slices are the members' entries in the
    optimizer's ``state`` (module docstring). The members' step counts are mirrored on the host, so
    the bias corrections of a step are host numbers, not device work; the mirror is read again
    whenever the count tensors were written by anyone but the step (their version counter moved:
    ``load_state_dict``, ``torch.distributed.checkpoint`` loading in place).

    :meth:`buffers` checks that every member's entry is still the view it handed out; an entry
    replaced since (a load, the first step, a batch that changed) is stacked again (a copy). A single
    member's entry is used as it is (its buffer is a view of it).
    """

    def __init__(self):
        self._slots: dict[Any, tuple[Tensor, list[Tensor], list[Tensor]]] = {}  # buffer, views, members
        self._steps: dict[Any, tuple[list[int], int]] = {}  # counts and the buffer's version when read

    def buffers(self, state: Mapping, slot: Any, members: Sequence[Tensor], keys: Sequence[str],
                shape: tuple[int, ...] | None = None) -> dict[str, Tensor]:
        """The stacked buffers of ``keys`` for ``members`` (``shape``: of each member's entry, if not
        the member's own)."""
        out = {}
        for key in keys:
            held = self._slots.get((slot, key))
            current = [state[p].get(key) for p in members]
            if held is not None and all(a is b for a, b in zip(current, held[1])):
                out[key] = held[0]
                continue
            target = _zeros(members[0], key, shape)
            like = [_zeros(p, key, shape) if value is None else local_tensor(value)
                    for p, value in zip(members, current)]
            if len(members) == 1:
                value = like[0]
                if (value.dtype, value.device) != (target.dtype, target.device):
                    value = value.to(device=target.device, dtype=target.dtype)
                buffer, views = value.unsqueeze(0), [value]
            else:
                buffer = torch.stack([v.to(dtype=target.dtype, device=target.device) for v in like])
                views = list(buffer.unbind(0))
            if key != "step" and shape is None:  # shaped like its parameter: a shard of it, if it is one
                views = [shard_like(view, p) for p, view in zip(members, views)]
            for p, view in zip(members, views):
                state[p][key] = view
            self._slots[(slot, key)] = (buffer, views, list(members))
            if key == "step":
                self._steps.pop(slot, None)  # counts read again from the new buffer
            out[key] = buffer
        return out

    def advance(self, slot: Any) -> list[int]:
        """The members' step counts after this step (the write phase adds 1 to the state's counts)."""
        buffer = self._slots[(slot, "step")][0]
        counts, version = self._steps.get(slot, (None, None))
        if counts is None or version != buffer._version:
            counts = [int(t) for t in buffer.tolist()]
        counts = [t + 1 for t in counts]
        self._steps[slot] = (counts, None)
        return counts

    def settle(self) -> None:
        """Record the step counts' versions after a step wrote them (an external write moves them)."""
        for slot, (counts, _) in self._steps.items():
            self._steps[slot] = (counts, self._slots[(slot, "step")][0]._version)

    def release(self, state: Mapping) -> None:
        """Give every member a tensor of its own (before the buffers are dropped with their layout)."""
        for (slot, key), (buffer, views, members) in self._slots.items():
            if len(members) > 1:
                for p, view in zip(members, views):
                    if p in state and state[p].get(key) is view:
                        state[p][key] = view.clone()
        self._slots.clear()
        self._steps.clear()


def _zeros(p: Tensor, key: str, shape: tuple[int, ...] | None = None) -> Tensor:
    """A state entry's initial value: a 0-d float32 step count, else zeros shaped like ``p`` (or
    ``shape``) in ``p``'s compute dtype."""
    p = local_tensor(p)
    if key == "step":
        return torch.zeros((), dtype=torch.float32, device=p.device)
    return torch.zeros(p.shape if shape is None else shape, dtype=compute_dtype(p), device=p.device)


class ScalarTables:
    """A step's host numbers (its :class:`~gaugeopt.optim.step.BatchScalars`, a rule's
    :meth:`~gaugeopt.optim.rules.Rule.scalars`) as slices of one persistent tensor per dtype and
    device, written in place at every step: the step's programs read their numbers at the same
    addresses each time (static inputs, as a CUDA graph needs), and no step allocates a table. The
    write is a copy from a host tensor queued on the device's stream (``non_blocking``): it waits for
    no queued work, and the work queued before it has read the previous step's numbers already."""

    def __init__(self):
        self._tables: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def upload(self, values: Any, dtype: torch.dtype, device: torch.device) -> Any:
        """``values`` with each number a 0-d tensor and each list a 1-d tensor (tuples and named tuples
        kept as such), slices of this dtype's and device's table."""
        flat, spans = _flattened(values)
        host = torch.tensor(flat, dtype=dtype)
        key = (dtype, torch.device(device))
        table = self._tables.get(key)
        if table is None or table.numel() != host.numel():
            table = self._tables[key] = torch.empty(host.numel(), dtype=dtype, device=device)
        table.copy_(host, non_blocking=True)
        return _sliced(values, spans, table)


def _flattened(values: Any) -> tuple[list[float], Any]:
    """The numbers of ``values`` in order, and where each number or list lies among them."""
    flat: list[float] = []

    def place(value: Any) -> Any:
        if isinstance(value, tuple):
            return [place(v) for v in value]
        start = len(flat)
        if isinstance(value, list):
            flat.extend(float(v) for v in value)
            return slice(start, len(flat))
        flat.append(float(value))
        return start

    return flat, place(values)


def _sliced(values: Any, span: Any, table: Tensor) -> Any:
    """``values``' structure with each number or list the slice ``span`` of ``table`` gives it."""
    if isinstance(values, tuple):
        fields = [_sliced(v, s, table) for v, s in zip(values, span)]
        return type(values)(*fields) if hasattr(values, "_fields") else tuple(fields)
    return table[span]


def stacked_view(tensors: Sequence[Tensor]) -> Tensor | None:
    """The members as one ``(L, *shape)`` tensor without a copy, a view of the memory they share, when
    they lie one after another in it in order (each contiguous, of one shape and dtype); else None.
    Writing the view writes the members."""
    found = stacked_rows(tensors)
    if found is None:
        return None
    rows, index = found
    return rows if index == list(range(len(tensors))) and rows.shape[0] == len(tensors) else None


def stacked_rows(tensors: Sequence[Tensor]) -> tuple[Tensor, list[int]] | None:
    """Where members of one shape and dtype all lie, each contiguous, in one memory at places a
    whole member apart (a buffer of :func:`move_into_stack`, read in any order, a member repeated):
    the ``(R, *shape)`` view of that memory from the first of them to the last, and each member's row
    of it (so ``rows[index]`` is their stack); else None."""
    first = tensors[0]
    if not first.is_contiguous():
        return None
    size, storage = first.numel(), first.untyped_storage().data_ptr()
    offsets = []
    for t in tensors:
        if t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous() or \
                t.untyped_storage().data_ptr() != storage:
            return None
        offsets.append(t.storage_offset())
    start = min(offsets)
    if size == 0 or any((o - start) % size for o in offsets):
        return None
    index = [(o - start) // size for o in offsets]
    strides = [1] * first.dim()
    for axis in range(first.dim() - 2, -1, -1):
        strides[axis] = strides[axis + 1] * first.shape[axis + 1]
    return first.as_strided((max(index) + 1, *first.shape), (size, *strides), start), index


def owns_its_memory(t: Tensor) -> bool:
    """Whether ``t``'s storage is ``t`` itself: not a view into memory that something else holds too."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def move_into_stack(params: Sequence[Tensor]) -> Tensor:
    """Give same-shape, same-dtype parameters one new ``(L, *shape)`` buffer holding their values, each
    parameter's ``.data`` becoming its slice (the parameter objects, their gradients and hooks stay
    as they are); returns the buffer. Afterwards :func:`stacked_view` of them is a view of it."""
    buffer = torch.stack([p.detach() for p in params])
    for p, row in zip(params, buffer.unbind(0)):
        p.data = row
    return buffer


def hold_gradients(params: Sequence[Tensor], buffer: Tensor | None = None) -> Tensor | None:
    """The parameters' gradients as one ``(L, *shape)`` tensor whose slices they are: their stacked
    view where they are that already, else ``buffer`` (when given, of their stacked shape, dtype and
    device) or a new buffer, holding their values (one copy), each parameter's ``.grad`` becoming its
    slice (so a backward that accumulates into the gradients writes the buffer). None where a
    parameter has no gradient or one unlike it (shape, dtype, device)."""
    grads = [p.grad for p in params]
    if any(g is None or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device
           for g, p in zip(grads, params)):
        return None
    view = stacked_view(grads)
    if view is not None:
        return view
    shape = (len(grads), *grads[0].shape)
    if buffer is not None and buffer.shape == shape and buffer.dtype == grads[0].dtype and \
            buffer.device == grads[0].device:
        torch._foreach_copy_(list(buffer.unbind(0)), grads)
    else:
        buffer = torch.stack(grads)
    for p, row in zip(params, buffer.unbind(0)):
        p.grad = row
    return buffer


class HeldGradients:
    """The gradients of the parameter lists held in one buffer each (:func:`move_into_stack`), held
    the same way (:func:`hold_gradients`) where that costs nothing, or copied in where the step
    needs every batch as one tensor:

    * gradients that lie in one buffer already are left there;
    * gradients that are the tensors the last step saw (``zero_grad(set_to_none=False)``, so
      backward accumulates into them) are moved into a buffer, once: backward adds into it from then
      on. (Where something puts its own tensors back in their place at every step, as DDP's
      ``gradient_as_bucket_view`` does, they are not moved again.)
    * new gradients (backward made them after torch's ``zero_grad()``) are copied in only when
      :meth:`hold` is asked to ``copy`` (one copy, what stacking them costs); with ``keep``, into the
      buffer the list had before, so that it keeps its address from step to step (as a CUDA graph's
      static input must), at the cost of that buffer's memory between steps.

    (They are not held by zeroing them in place instead of setting them to ``None``: backward would
    then add every gradient into its buffer, reading and writing it, which costs more than the copy,
    and a parameter without a gradient would be stepped on zeros.)"""

    def __init__(self, lists: Sequence[Sequence[Tensor]]):
        self.lists = [list(params) for params in lists]
        self._seen: list[tuple[weakref.ref, ...] | None] = [None] * len(self.lists)  # last step's gradients
        self._moved = [False] * len(self.lists)  # persisting gradients moved into a buffer once
        self._buffers: list[Tensor | None] = [None] * len(self.lists)

    def hold(self, copy: bool, keep: bool = False) -> None:
        for i, params in enumerate(self.lists):
            grads = [p.grad for p in params]
            if any(g is None for g in grads):  # (a member without a gradient: nothing to hold)
                self._seen[i] = None
                continue
            seen = self._seen[i]
            move = seen is not None and not self._moved[i] and all(ref() is g for ref, g in zip(seen, grads))
            if (copy or move) and stacked_view(params) is not None and stacked_view(grads) is None:
                buffer = hold_gradients(params, self._buffers[i])
                self._moved[i] = self._moved[i] or move
                if keep:
                    self._buffers[i] = buffer
            self._seen[i] = tuple(weakref.ref(p.grad) for p in params)
