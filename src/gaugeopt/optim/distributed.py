"""Distributed training: what gaugeopt's optimizers do under DDP and FSDP2.

**DDP** (``torch.nn.parallel.DistributedDataParallel``) keeps a full replica of every parameter on
every rank and averages the gradients before the step. Every rank then takes the same single-process
step on the same tensors, so the optimizers need nothing: they run unchanged.

**FSDP2** (``torch.distributed.fsdp.fully_shard``) turns every parameter into a ``DTensor`` sharded on
dim 0 (``torch.chunk`` sizes, so uneven when dim 0 is not divisible by the world size), and so are
its gradients. Most of a gauge-frame step is not local to a row shard: a translation gauge centers
over the rows, a row-block rotation averages second moments over rows of one head, a neuron pair
couples a producer's rows with a consumer's columns (norms over the sharded rows), a norm family ties
a gain to the columns of its consumers, and Newton-Schulz, polar factors and inverse square roots
need whole matrices or head blocks.

Design of this version: :func:`sharded_step` wraps an optimizer's ``step``. When a parameter is a
``DTensor``, the step

1. splits the work: parameters that one update couples (a norm family's gain, bias and consumers; a
   neuron pair; otherwise a single tensor) form a component, and components go, largest first, to
   the least loaded rank (:func:`step_owners`, work estimated as ``numel * min(rows, cols)`` per
   matrix: the cost of a Newton-Schulz or Gram iteration);
2. gathers every sharded parameter, its gradient and its state tensors (``DTensor.full_tensor``, an
   all-gather over the parameter's device mesh); the owner keeps the full tensors, the other ranks
   drop them at once. Tensors the step reads outside its components (``parameters_read()``: the
   norm gains) are kept whole by every rank;
3. runs the optimizer's ordinary single-process step, on each rank over its own components' full
   tensors, so every reduction over a sharded axis (row centering, column and pair norms,
   head-block means) and every matrix function sees the whole matrix or head block;
4. shares the results (:func:`_write_back`): each owner broadcasts the new parameters and state of
   its components, and every rank keeps its own shard. A state tensor shaped like its parameter is
   stored as a ``DTensor`` with the parameter's mesh and placements (created on the first step,
   identically on every rank, so ``torch.distributed.checkpoint`` saves it sharded and loads it on
   any number of ranks); other state (step counts, per-unit scalars of another shape) is
   replicated.

The result equals the single-process step up to the rounding of the averaged gradient (the tests
require 1e-8 relative after 10 steps and measure about 3e-16). Costs of this first version: the
arithmetic and the full copies held through the step are split over the ranks, but the traffic is
not: per parameter and step, the parameter, its gradient and each state tensor are all-gathered to
every rank (although only the owner keeps them), then the parameter and each state tensor are
broadcast whole from the owner. Gathering to the owner only and scattering shards back would cut
that; this version does not. Parameters on a mesh other than one 1-D mesh (HSDP, tensor parallel) are gathered whole and every
rank steps every component (no split); only FSDP2 on a 1-D mesh is tested.

An optimizer opts in by decorating ``step`` with :func:`sharded_step`. Its public component
interface (:class:`~gaugeopt.optim.base.FramedOptimizer` has it): ``parameters_read()`` (parameters
every rank's step reads whole, e.g. norm gains), ``substitute_parameters(stand_in)`` (read parameter
``p`` as ``stand_in[id(p)]``), ``coupled_parameters()`` (lists of parameters whose frames are computed
together) and ``distributed_reports`` (names of
dict attributes each rank fills for the components it stepped, merged after the step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .guards import GuardedOptimizer, all_finite

__all__ = ["sharded_step", "gathered_parameters", "is_sharded", "has_sharded_parameters", "full_tensor"]


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a distributed tensor (an FSDP2 parameter, gradient or state tensor)."""
    return isinstance(t, DTensor)


def has_sharded_parameters(optimizer: torch.optim.Optimizer) -> bool:
    return any(is_sharded(p) for group in optimizer.param_groups for p in group["params"])


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: gathered over its mesh when it is a ``DTensor`` (a collective: every rank
    of the mesh must call it), else ``t`` itself."""
    return t.detach().full_tensor() if is_sharded(t) else t


def _shard_like(full: Tensor, like: DTensor) -> DTensor:
    """This rank's part of ``full`` as a ``DTensor`` placed like ``like`` (no communication)."""
    return distribute_tensor(full.detach(), like.device_mesh, like.placements, src_data_rank=None)


def sharded_step(step: Callable) -> Callable:
    """Decorator for ``Optimizer.step``: run it on gathered full tensors when parameters are sharded.

    Without ``DTensor`` parameters (single process, DDP) the decorated ``step`` is called as it is.
    Otherwise the closure (if any) runs first, then ``step`` runs inside :func:`gathered_parameters`.
    """

    @functools.wraps(step)
    def wrapper(self: torch.optim.Optimizer, closure: Callable[[], float] | None = None):
        if not has_sharded_parameters(self):
            return step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            if not _gradients_finite_on_every_rank(self):
                return loss
            with gathered_parameters(self):
                step(self)
        return loss

    return wrapper


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_sharded(t) else t


def _gradients_finite_on_every_rank(optimizer: torch.optim.Optimizer) -> bool:
    """Decide the non-finite gradient policy once for all ranks of a split step.

    Each rank steps only its own components, so a rank's own check would see only their gradients:
    one rank would skip (or raise) while the others stepped, and a raising rank would leave the
    others waiting in the next collective. Here every rank tests its local gradient shards
    (:func:`all_finite`), one all-reduced flag combines them, and only when it is down are the bad
    parameters' names gathered and the optimizer's ``nonfinite`` policy applied, identically on
    every rank. Optimizers without that policy, and steps not split over ranks (every rank then
    checks every whole gradient itself), pass.
    """
    params = _group_parameters(optimizer)
    group = _step_group([p for p in params if is_sharded(p)])
    if group is None or not isinstance(optimizer, GuardedOptimizer):
        return True
    located = [(gi, pi, p) for gi, g in enumerate(optimizer.param_groups) for pi, p in enumerate(g["params"])
               if p.grad is not None]
    grads = [_local(p.grad) for _, _, p in located]
    device = grads[0].device if grads else _local(params[0]).device
    flag = torch.tensor([1.0 if all_finite(grads) else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if flag.item() == 1.0:
        return True
    names = optimizer.parameter_names()
    here = [optimizer.describe_parameter(gi, pi, names) for gi, pi, p in located if not torch.isfinite(_local(p.grad)).all()]
    everywhere: list = [None] * group.size()
    dist.all_gather_object(everywhere, here, group=group)
    return optimizer.apply_nonfinite_policy(sorted({name for part in everywhere for name in part}))


@contextmanager
def gathered_parameters(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside: the optimizer's param groups hold only the parameters this rank steps
    (:func:`step_owners`), as full tensors with full gradients and state.

    After the step each owner broadcasts the new values and state of its parameters, and every rank
    writes its own shard of each: a parameter's shard in place, a state tensor shaped like its
    parameter as a ``DTensor`` placed like it (updated in place when it exists), other state whole.
    """
    params = _group_parameters(optimizer)
    sharded = [p for p in params if is_sharded(p)]
    group = _step_group(sharded)
    rank = group.rank() if group is not None else 0
    owners = step_owners(optimizer, group.size()) if group is not None else {id(p): 0 for p in params}

    stand_in: dict[int, Tensor] = {}
    for p in sharded:  # gathering is collective: every rank takes part, the owner keeps the result
        full = full_tensor(p)
        grad = full_tensor(p.grad) if p.grad is not None else None
        state = {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in optimizer.state.get(p, {}).items()}
        if owners[id(p)] == rank:
            stand_in[id(p)] = whole = nn.Parameter(full, requires_grad=p.requires_grad)
            whole.grad = grad
            if p in optimizer.state:
                optimizer.state[whole] = state
    read = [t for t in {id(t): t for t in getattr(optimizer, "parameters_read", lambda: [])()}.values()
            if is_sharded(t)]
    for t in read:  # read whole by every rank (norm gains), written only by their owner if optimized
        full = full_tensor(t)
        stand_in.setdefault(id(t), full)
    originals = {id(stand_in[id(t)]): t for t in (*params, *read) if id(t) in stand_in}

    whole_groups = [g["params"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["params"] = [stand_in.get(id(p), p) for p in g["params"] if owners[id(p)] == rank]
    _swap_hook(optimizer, stand_in)
    try:
        yield
        _write_back(optimizer, params, owners, stand_in, group)
    finally:
        for g, whole in zip(optimizer.param_groups, whole_groups):
            g["params"] = whole
        _swap_hook(optimizer, originals)
        for p in sharded:
            if id(p) in stand_in:
                optimizer.state.pop(stand_in[id(p)], None)


def _group_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters of all param groups, each once, in group order."""
    return list({id(p): p for group in optimizer.param_groups for p in group["params"]}.values())


def _step_group(sharded: list[DTensor]) -> dist.ProcessGroup | None:
    """The process group that splits the step: that of the one 1-D mesh every sharded parameter
    lives on, or ``None`` (every rank then steps everything, e.g. on a 2-D HSDP mesh)."""
    meshes = {(p.device_mesh.device_type, tuple(p.device_mesh.mesh.flatten().tolist()), p.device_mesh.ndim)
              for p in sharded}
    if len(meshes) != 1 or sharded[0].device_mesh.ndim != 1 or sharded[0].device_mesh.size() == 1:
        return None
    return sharded[0].device_mesh.get_group()


def step_owners(optimizer: torch.optim.Optimizer, world: int) -> dict[int, int]:
    """Which rank steps each parameter: ``{id(parameter): rank}``, the same on every rank.

    Parameters one update couples (``optimizer.coupled_parameters()``: a norm family's gain, bias and
    consumers, a neuron pair) form one component; components go, largest first, to the rank with
    the least work so far. Work is estimated as ``numel * min(rows, cols)`` for a matrix (the cost of
    a Newton-Schulz or Gram-matrix iteration) and ``numel`` for a vector.
    """
    params = _group_parameters(optimizer)
    index = {id(p): i for i, p in enumerate(params)}
    root = list(range(len(params)))

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for coupled in getattr(optimizer, "coupled_parameters", lambda: [])():
        members = [index[id(t)] for t in coupled if id(t) in index]
        for i in members[1:]:
            root[find(i)] = find(members[0])
    components: dict[int, list[int]] = {}
    for i in range(len(params)):
        components.setdefault(find(i), []).append(i)

    def cost(p: Tensor) -> int:
        return p.numel() * (min(p.shape[-2:]) if p.ndim >= 2 else 1)

    load = [0] * world
    owner: dict[int, int] = {}
    ordered = sorted(components.values(), key=lambda c: (-sum(cost(params[i]) for i in c), c[0]))
    for component in ordered:
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += sum(cost(params[i]) for i in component)
        owner.update({id(params[i]): rank for i in component})
    return owner


def _write_back(optimizer: torch.optim.Optimizer, params: list[Tensor], owners: dict[int, int],
                stand_in: dict[int, Tensor], group: dist.ProcessGroup | None) -> None:
    """Give every rank the stepped values and state of every parameter, each rank its shards.

    With a split step (``group``), the owners first publish the layout of their parameters' state
    (keys, shapes, dtypes, and the values that are not tensors) with one ``all_gather_object``; then
    each tensor is broadcast from its owner, in parameter order. Dict attributes named in
    ``optimizer.distributed_reports`` (``frozen``), which each rank fills for the parameters it
    stepped, are merged.
    """
    rank = group.rank() if group is not None else 0
    if group is not None:
        report_names = getattr(optimizer, "distributed_reports", ())
        layouts = {}
        for i, p in enumerate(params):
            stepped = stand_in.get(id(p), p)
            if owners[id(p)] == rank:
                layouts[i] = _layout(optimizer.state[stepped]) if stepped in optimizer.state else None
        mine = {"state": layouts, "reports": {name: getattr(optimizer, name) for name in report_names}}
        published: list = [None] * group.size()
        dist.all_gather_object(published, mine, group=group)
        for name in report_names:
            setattr(optimizer, name, {k: v for part in published for k, v in part["reports"][name].items()})
    for i, p in enumerate(params):
        owned = owners[id(p)] == rank
        if owned or not is_sharded(p):
            value = stand_in.get(id(p), p)  # the stepped full tensor (a replicated parameter: itself)
        else:
            value = torch.empty(p.shape, dtype=p.dtype, device=p.device)  # receives the owner's
        state = optimizer.state.get(value) if owned else None
        if group is not None:
            source = dist.get_global_rank(group, owners[id(p)])
            _broadcast(value.detach(), source, group)
            layout = published[owners[id(p)]]["state"][i]
            if layout is not None and not owned:
                state = _receive_state(layout, optimizer.state.get(p, {}), p.device)
            for key, (is_tensor, _shape, _dtype, _value) in (layout or {}).items():
                if is_tensor:
                    _broadcast(state[key], source, group)
        if is_sharded(p):
            p.copy_(_shard_like(value, p))
            if state is not None:
                optimizer.state[p] = _shard_state(state, p, optimizer.state.get(p, {}))
        elif state is not None:
            optimizer.state[p] = state


def _receive_state(layout: dict, held: dict, device: torch.device) -> dict:
    """Buffers for a state broadcast with ``layout``: a held whole tensor of the same shape and dtype
    is received in place, anything else is allocated; non-tensor values are taken from the layout."""
    state = {}
    for key, (is_tensor, shape, dtype, value) in layout.items():
        here = held.get(key)
        if not is_tensor:
            state[key] = value
        elif torch.is_tensor(here) and not is_sharded(here) and tuple(here.shape) == shape and here.dtype == dtype:
            state[key] = here
        else:
            state[key] = torch.empty(shape, dtype=dtype, device=device)
    return state


def _broadcast(t: Tensor, source: int, group: dist.ProcessGroup) -> None:
    """``dist.broadcast`` into ``t`` in place; collectives send memory as laid out, so a strided
    tensor (a momentum buffer made ``zeros_like`` a transposed view) goes through a contiguous copy."""
    buffer = t.contiguous()
    dist.broadcast(buffer, src=source, group=group)
    if buffer is not t:
        t.copy_(buffer)


def _layout(state: dict) -> dict:
    """``{key: (is_tensor, shape, dtype, value)}`` of a state dict (value only for non-tensors)."""
    return {key: (True, tuple(v.shape), v.dtype, None) if torch.is_tensor(v) else (False, None, None, v)
            for key, v in state.items()}


def _swap_hook(optimizer: torch.optim.Optimizer, replace: Mapping[int, Tensor]) -> None:
    """Let the optimizer read ``replace[id(p)]`` for parameter ``p`` outside its param groups."""
    hook = getattr(optimizer, "substitute_parameters", None)
    if hook is not None:
        hook(replace)


def _shard_state(state: dict, param: DTensor, before: dict) -> dict:
    """A parameter's state after a gathered step: its own shard of every tensor shaped like it."""
    out = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape:
            shard = _shard_like(value, param)
            old = before.get(key)
            if is_sharded(old) and old.placements == shard.placements and old.shape == shard.shape:
                old.copy_(shard)  # keep the object (a checkpoint loader may hold it)
                shard = old
            out[key] = shard
        else:
            out[key] = value
    return out
