"""Distributed training: what gaugeopt's optimizers do under DDP and FSDP2.

**DDP** (``torch.nn.parallel.DistributedDataParallel``) keeps a full replica of every parameter on
every rank and averages the gradients before the step. Every rank then takes the same single-process
step on the same tensors, so the optimizers need nothing: they run unchanged.

**FSDP2** (``torch.distributed.fsdp.fully_shard``) turns every parameter into a ``DTensor`` sharded on
dim 0 (``torch.chunk`` sizes, so uneven when dim 0 is not divisible by the world size), and so are
its gradients. The optimizers then take their ordinary step (:mod:`gaugeopt.optim.step`) on
each rank's rows (:class:`~gaugeopt.optim.shards.RowShard`), with the :class:`ProcessGroupCollectives`
of the mesh's process group for what is not local to the rows:

* every frame reduction (sums of squares over a neuron unit's slices, row means of translated
  tensors, a head block's mean second moment across a shard boundary, a norm family's channel
  factors) is a partial sum on each rank; the sums of one reduction round are packed per dtype into
  one flat buffer and all-reduced once. The step's rounds: the norm gains made whole (they are the
  frames of their consumers' columns: each rank holds its rows of every gain), the mean rows of
  translated parameters, the neuron frames (one round per link of a neuron chain; isolated pairs
  need one), the channel factors, the row means of translated
  canonical gradients and directions, and the isolated pairs' sums of squares after the lift;
* a map that needs whole matrices (DDCMuon's Newton-Schulz, the layerwise maps of
  SymmetryCompatible) gets them by :meth:`ProcessGroupCollectives.whole`: of each stack of
  same-shape matrices, each matrix goes to one rank (the least loaded so far, by
  ``rows * cols * min(rows, cols)``), which maps it and sends every rank its rows of the result:
  one ``all_to_all_single`` each way per stack (megabatches, as microsoft/dion does). Momentum and
  Adam moments are elementwise: they stay on their shards and never cross the wire;
* whether every gradient is finite is one all-reduced flag before the step
  (:func:`gradients_finite_on_every_rank`), so every rank applies the same policy.

No parameter, gradient or optimizer state is gathered: DDCAdam sends only reductions (vectors per
unit or channel, a mean row per translated tensor), DDCMuon and SymmetryCompatible additionally
each matrix's map input to its rank and its rows back. State shaped like its parameter is stored as
a ``DTensor`` placed like it (a view of this rank's rows, created on the first step), so
``torch.distributed.checkpoint`` saves it sharded and loads it on any number of ranks; other state
(step counts, the channel-scale step's per-channel moments) is replicated, computed identically on
every rank.

The result equals the single-process step up to the rounding of sums taken in another order (the
tests require 1e-10 relative after 10 steps). Only parameters on one 1-D mesh with ``Shard(0)``
placements are supported (FSDP2's default); anything else (a 2-D HSDP mesh, tensor parallelism,
another shard dim, parameters on several meshes, some parameters not sharded) raises
``NotImplementedError`` on every rank before the step's first collective. A compiled optimizer
(``compiled=True``) takes its sharded steps eagerly.

:func:`collective_traffic` counts the collective calls and bytes of a block of code on this rank
(``benchmarks/distributed_traffic.py`` uses it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard
from torch.utils._python_dispatch import TorchDispatchMode

from .guards import GuardedOptimizer, all_finite
from .shards import RowShard, local_tensor

__all__ = ["ShardedStep", "ProcessGroupCollectives", "sharded_step", "sharded_parameters", "gradients_finite_on_every_rank",
           "whole_tensors", "whole_by_name", "is_sharded", "full_tensor", "collective_traffic",
           "CollectiveTraffic"]


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a distributed tensor (an FSDP2 parameter, gradient or state tensor)."""
    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: gathered over its mesh when it is a ``DTensor`` (a collective: every rank
    of the mesh must call it), else ``t`` itself."""
    return t.detach().full_tensor() if is_sharded(t) else t


def gradients_finite_on_every_rank(optimizer: torch.optim.Optimizer) -> bool:
    """Decide the non-finite gradient policy once for all ranks of a sharded step.

    Each rank holds only its rows of every gradient, so a rank's own check would see only those: one
    rank would skip (or raise) while the others stepped, and a raising rank would leave the others
    waiting in the step's next collective. Here every rank tests its local gradient shards
    (:func:`all_finite`), one all-reduced flag combines them, and only when it is down are the bad
    parameters' names gathered and the optimizer's ``nonfinite`` policy applied, identically on
    every rank. Optimizers without that policy pass.
    """
    params = _group_parameters(optimizer)
    group = _step_group([p for p in params if is_sharded(p)])
    if not isinstance(optimizer, GuardedOptimizer):
        return True
    located = [(gi, pi, p) for gi, g in enumerate(optimizer.param_groups) for pi, p in enumerate(g["params"])
               if p.grad is not None]
    grads = [local_tensor(p.grad) for _, _, p in located]
    device = grads[0].device if grads else local_tensor(params[0]).device
    flag = torch.tensor([1.0 if all_finite(grads) else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if flag.item() == 1.0:
        return True
    names = optimizer.parameter_names()
    here = [optimizer.describe_parameter(gi, pi, names) for gi, pi, p in located if not torch.isfinite(local_tensor(p.grad)).all()]
    everywhere: list = [None] * group.size()
    dist.all_gather_object(everywhere, here, group=group)
    return optimizer.apply_nonfinite_policy(sorted({name for part in everywhere for name in part}))


@dataclass
class ShardedStep:
    """A step on FSDP2 shards: the mesh's process group, this rank, the world size and the step's
    collectives (made fresh for every step: :meth:`ProcessGroupCollectives.whole` balances the
    matrices of one step over the ranks)."""

    group: dist.ProcessGroup
    rank: int
    world: int
    collectives: ProcessGroupCollectives

    @property
    def ranks(self) -> tuple[int, int]:
        return self.rank, self.world


def sharded_step(optimizer: torch.optim.Optimizer) -> ShardedStep | None:
    """The :class:`ShardedStep` of ``optimizer``'s next step, or ``None`` when no parameter is a
    ``DTensor`` (one process, DDP); :func:`sharded_parameters` of its parameters."""
    return sharded_parameters(_group_parameters(optimizer))


def sharded_parameters(params: Sequence[Tensor]) -> ShardedStep | None:
    """The :class:`ShardedStep` for a step over ``params``, or ``None`` when none is a ``DTensor``.
    ``NotImplementedError`` (raised alike on every rank, before any collective) for layouts the step
    does not support: parameters with gradients of which only some are sharded, placements other
    than ``Shard(0)``, a mesh that is not one 1-D mesh."""
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    group = _step_group(sharded)
    plain = [i for i, p in enumerate(params) if not is_sharded(p) and p.grad is not None]
    if plain:
        raise NotImplementedError(
            f"gaugeopt's sharded step needs every parameter sharded by fully_shard, but {len(plain)} with gradients "
            "are plain tensors (shard the root module too)")
    for p in sharded:
        if tuple(p.placements) != (Shard(0),):
            raise NotImplementedError(f"gaugeopt's sharded step supports Shard(0) placements (FSDP2's default), "
                                      f"not {tuple(p.placements)}")
    device = local_tensor(sharded[0]).device
    return ShardedStep(group, group.rank(), group.size(), ProcessGroupCollectives(group, device))


def whole_tensors(tensors: Sequence[Tensor], step: ShardedStep) -> list[Tensor]:
    """Each ``Shard(0)`` tensor made whole on every rank (one round: every rank contributes its rows
    at their places, zeros elsewhere); tensors of zero dimensions or not sharded are returned as
    they are."""
    index = [i for i, t in enumerate(tensors) if is_sharded(t) and t.dim() > 0]
    parts = []
    for i in index:
        t = tensors[i]
        rows = local_tensor(t).detach().reshape(1, -1, math.prod(t.shape[1:]))
        shard = RowShard.of(t.shape[0], step.rank, step.world)
        parts.append(_placed(rows, shard))
    out = list(tensors)
    for i, whole in zip(index, step.collectives.sum(parts)):
        out[i] = whole.reshape(tensors[i].shape)
    return out


def whole_by_name(names: Sequence[str], lookup: Mapping[str, Tensor], step: ShardedStep | None) -> dict[str, Tensor]:
    """``{name: whole tensor}`` of ``lookup[name]`` on every rank (:func:`whole_tensors`): how a
    sharded step reads the norm gains, the frames of their consumers' columns. Empty without a
    :class:`ShardedStep` (one process reads the tensors where they are)."""
    if step is None:
        return {}
    return dict(zip(names, whole_tensors([lookup[n].detach() for n in names], step)))


def _placed(rows: Tensor, shard: RowShard) -> Tensor:
    """``(1, rows here, cols)`` at rows ``[start, stop)`` of a ``(1, rows, cols)`` zero tensor."""
    whole = rows.new_zeros(1, shard.rows, rows.shape[2])
    whole[:, shard.start:shard.stop] = rows
    return whole


class ProcessGroupCollectives:
    """:class:`~gaugeopt.optim.shards.Collectives` over a process group (module docstring)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group, self.device = group, device
        self.rank, self.world = group.rank(), group.size()
        self.load = [0] * self.world  # work of the matrices each rank has mapped whole in this step

    def sum(self, partials: Sequence[Tensor]) -> list[Tensor]:
        """All-reduce (sum) every tensor: one call per dtype for the whole list."""
        out: list[Tensor] = list(partials)
        for dtype in sorted({t.dtype for t in partials}, key=str):
            index = [i for i, t in enumerate(partials) if t.dtype == dtype]
            flat = torch.cat([partials[i].reshape(-1) for i in index])
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for i in index:
                n = partials[i].numel()
                out[i] = flat[offset:offset + n].view(partials[i].shape)
                offset += n
        return out

    def whole(self, stack: Tensor, shard: RowShard | None, fn: Callable[[Tensor], Tensor],
              out_dtype: torch.dtype | None = None) -> Tensor:
        """Each member of ``stack`` (this rank's rows on axis 1) to one rank, ``fn`` there on the
        whole members it received, this rank's rows of every result (in ``out_dtype``, ``None``:
        ``stack``'s) back (module docstring)."""
        if shard is None:
            return fn(stack)
        members, rest = stack.shape[0], tuple(stack.shape[2:])
        cost = shard.rows * math.prod(rest) * min(shard.rows, math.prod(rest) or 1)
        owners = []
        for _ in range(members):
            owner = min(range(self.world), key=lambda r: (self.load[r], r))
            self.load[owner] += cost
            owners.append(owner)
        sizes = [shard.bounds[r + 1] - shard.bounds[r] for r in range(self.world)]
        messages = [_Message(src, owner, (sizes[src], *rest), stack.dtype, stack[m] if src == self.rank else None)
                    for m, owner in enumerate(owners) for src in range(self.world) if src != owner]
        received = iter(_route(messages, self.group, self.device))
        mine = [m for m, owner in enumerate(owners) if owner == self.rank]
        wholes = []
        for m in mine:
            pieces = [stack[m] if src == self.rank else next(received) for src in range(self.world)]
            wholes.append(torch.cat(pieces))
        results = fn(torch.stack(wholes)) if wholes else None
        result_of = {m: results[i] for i, m in enumerate(mine)}
        messages = [_Message(owner, dst, (sizes[dst], *rest), out_dtype or stack.dtype,
                             result_of[m][shard.bounds[dst]:shard.bounds[dst + 1]] if owner == self.rank else None)
                    for m, owner in enumerate(owners) for dst in range(self.world) if dst != owner]
        received = iter(_route(messages, self.group, self.device))
        rows = [result_of[m][shard.start:shard.stop] if owner == self.rank else next(received)
                for m, owner in enumerate(owners)]
        return torch.stack(rows)


@dataclass
class _Message:
    """One tensor sent from rank ``src`` to rank ``dst``: its ``shape`` and ``dtype`` are known to every
    rank, the ``payload`` only to ``src``."""

    src: int
    dst: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    payload: Tensor | None = None


def _route(messages: list[_Message], group: dist.ProcessGroup, device: torch.device) -> list[Tensor]:
    """Deliver ``messages`` (the same list, but for payloads, on every rank): returns the payloads of
    those addressed to this rank, in order (a message to oneself is handed over without a copy).

    Per dtype, the messages between distinct ranks are packed into one flat buffer per rank, ordered
    by destination, and exchanged by one ``all_to_all_single`` with per-rank split sizes.
    """
    rank, world = group.rank(), group.size()
    numel = [math.prod(m.shape) for m in messages]
    delivered: dict[int, Tensor] = {}
    for dtype in sorted({m.dtype for m in messages if m.src != m.dst}, key=str):
        outgoing = sorted((m.dst, i) for i, m in enumerate(messages)
                          if m.dtype == dtype and m.src == rank and m.dst != rank)
        incoming = sorted((m.src, i) for i, m in enumerate(messages)
                          if m.dtype == dtype and m.dst == rank and m.src != rank)
        send_sizes = [sum(numel[i] for d, i in outgoing if d == q) for q in range(world)]
        recv_sizes = [sum(numel[i] for s, i in incoming if s == q) for q in range(world)]
        wire = torch.uint8 if dtype == torch.bool else dtype  # collectives do not take bool
        send = torch.cat([messages[i].payload.reshape(-1).to(wire) for _, i in outgoing]) if outgoing \
            else torch.empty(0, dtype=wire, device=device)
        recv = torch.empty(sum(recv_sizes), dtype=wire, device=device)
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
        offset = 0
        for _, i in incoming:
            delivered[i] = recv[offset:offset + numel[i]].view(messages[i].shape).to(dtype)
            offset += numel[i]
    return [m.payload if m.src == m.dst else delivered[i] for i, m in enumerate(messages) if m.dst == rank]


def _group_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters of all param groups, each once, in group order."""
    return list({id(p): p for group in optimizer.param_groups for p in group["params"]}.values())


def _step_group(sharded: list[DTensor]) -> dist.ProcessGroup:
    """The process group that splits the step: that of the one 1-D mesh every sharded parameter lives
    on. Other layouts (a 2-D HSDP mesh, parameters on several meshes) are refused: the routing of
    the step assumes one shard per rank of one group."""
    meshes = {(p.device_mesh.device_type, tuple(p.device_mesh.mesh.flatten().tolist()), p.device_mesh.ndim)
              for p in sharded}
    if len(meshes) != 1 or sharded[0].device_mesh.ndim != 1:
        raise NotImplementedError(
            "gaugeopt's sharded step needs every DTensor parameter on one 1-D device mesh (FSDP2's "
            f"fully_shard on a 1-D mesh); found meshes {sorted(meshes)}. HSDP (a 2-D mesh) and tensor "
            "parallelism are not supported.")
    return sharded[0].device_mesh.get_group()


@dataclass
class CollectiveTraffic:
    """What one rank passed to ``torch.distributed`` collectives while :func:`collective_traffic` was
    open: ``calls`` (one per collective, ``all_gather_object`` and friends included; waits on
    functional collectives are not calls) and ``bytes``. A call's bytes are the larger of what this
    rank hands in and what it gets out (``max(input, output)``, summed over the call's tensors): the
    gathered tensor of an all-gather, the reduced tensor of an all-reduce, the broadcast tensor, the
    owner's whole tensor or another rank's shard of a gather or scatter."""

    calls: int = 0
    bytes: int = 0
    ops: dict[str, int] = field(default_factory=dict)


def _tensor_bytes(value) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class _CollectiveCounter(TorchDispatchMode):
    """Sees every collective as the dispatcher op it becomes (``c10d::*`` for ``torch.distributed``'s
    calls, ``_c10d_functional::*`` for DTensor's). An op on DTensors is handed back to DTensor first
    (as torch's ``CommDebugMode`` does), so the collectives a DTensor op issues are seen too."""

    def __init__(self, traffic: CollectiveTraffic):
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run first: the collectives it desugars into come back here
        out = func(*args, **(kwargs or {}))
        namespace, name = func.namespace, func._schema.name.split("::")[-1]
        if namespace in ("c10d", "_c10d_functional") and not name.startswith(("_", "wait", "barrier", "monitored")):
            first = _tensor_bytes(args[0]) if args else 0
            second = _tensor_bytes(args[1]) if namespace == "c10d" and len(args) > 1 else _tensor_bytes(out)
            self.traffic.calls += 1
            self.traffic.bytes += max(first, second)
            self.traffic.ops[name] = self.traffic.ops.get(name, 0) + 1
        return out


@contextmanager
def collective_traffic() -> Iterator[CollectiveTraffic]:
    """Count this rank's collective calls and their bytes inside the block (a diagnostic; exact and
    deterministic, since it counts what is passed, not what is timed)."""
    traffic = CollectiveTraffic()
    with _CollectiveCounter(traffic):
        yield traffic
