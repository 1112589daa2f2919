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
2. gathers each component to its owner only (:func:`gathered_parameters`): every rank sends its
   shard of each parameter, gradient and parameter-shaped state tensor to the owner, which
   concatenates the shards along the sharded dim. Tensors the step reads outside its components
   (``parameters_read()``: the norm gains) go whole to every rank;
3. runs the optimizer's ordinary single-process step, on each rank over its own components' full
   tensors, so every reduction over a sharded axis (row centering, column and pair norms,
   head-block means) and every matrix function sees the whole matrix or head block;
4. scatters the results (:func:`_write_back`): each owner sends every other rank that rank's shard
   of the new parameters and of each state tensor shaped like its parameter, and the other state
   whole. A state tensor shaped like its parameter is stored as a ``DTensor`` with the parameter's
   mesh and placements (created on the first step, identically on every rank, so
   ``torch.distributed.checkpoint`` saves it sharded and loads it on any number of ranks); other
   state (step counts, per-unit scalars of another shape) is replicated.

Messages (one tensor piece from one rank to another; shapes known to every rank from the
parameters' global shapes, ``torch.chunk`` shard sizes and the published state layout) are packed
per dtype into one flat buffer per rank and exchanged by one ``all_to_all_single`` (:func:`_route`).
A step therefore makes a fixed number of collective calls, whatever the number of parameters: the
all-reduced finiteness flag, the gather round, one ``all_gather_object`` (state layouts and the
merged reports) and the scatter round (one all-to-all per dtype in each round). Per rank and step,
about half of each gathered tensor crosses the wire each way at 2 ranks: (parameter + gradient +
parameter-shaped state) / 2 in, (parameter + parameter-shaped state) / 2 out.

The result equals the single-process step up to the rounding of the averaged gradient (the tests
require 1e-10 relative after 10 steps and measure about 3e-16). Only parameters on one 1-D mesh
(FSDP2's ``fully_shard``) with ``Shard(dim)`` placements are supported; any other layout (a 2-D HSDP
mesh, tensor parallelism, parameters on several meshes) raises ``NotImplementedError`` before the
step's first collective, on every rank alike.

:func:`collective_traffic` counts the collective calls and bytes of a block of code on this rank
(``benchmarks/distributed_traffic.py`` uses it).

An optimizer opts in by decorating ``step`` with :func:`sharded_step`. Its public component
interface (:class:`~gaugeopt.optim.base.FramedOptimizer` has it): ``parameters_read()`` (parameters
every rank's step reads whole, e.g. norm gains), ``substitute_parameters(stand_in)`` (read parameter
``p`` as ``stand_in[id(p)]``), ``coupled_parameters()`` (lists of parameters whose frames are computed
together) and ``distributed_reports`` (names of
dict attributes each rank fills for the components it stepped, merged after the step).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard
from torch.utils._python_dispatch import TorchDispatchMode

from .guards import GuardedOptimizer, all_finite

__all__ = ["sharded_step", "gathered_parameters", "is_sharded", "has_sharded_parameters", "full_tensor",
           "collective_traffic", "CollectiveTraffic"]


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a distributed tensor (an FSDP2 parameter, gradient or state tensor)."""
    return isinstance(t, DTensor)


def has_sharded_parameters(optimizer: torch.optim.Optimizer) -> bool:
    return any(is_sharded(p) for group in optimizer.param_groups for p in group["params"])


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: gathered over its mesh when it is a ``DTensor`` (a collective: every rank
    of the mesh must call it), else ``t`` itself."""
    return t.detach().full_tensor() if is_sharded(t) else t


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
    every rank. Optimizers without that policy pass.
    """
    params = _group_parameters(optimizer)
    group = _step_group([p for p in params if is_sharded(p)])
    if not isinstance(optimizer, GuardedOptimizer):
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

    Entering is one exchange round (:func:`_route`): every rank sends its shard of each parameter,
    gradient and parameter-shaped state tensor to that parameter's owner only, and its shard of each
    tensor in ``parameters_read()`` to every rank. Leaving is a second round (:func:`_write_back`):
    each owner sends every other rank that rank's shard of the new parameter and of each
    parameter-shaped state tensor, and the rest of the state (step counts, per-unit moments) whole.
    Each round is one all-to-all of one flat buffer per dtype, so the number of calls does not grow
    with the number of parameters.
    """
    params = _group_parameters(optimizer)
    sharded = [p for p in params if is_sharded(p)]
    group = _step_group(sharded)
    rank, world = group.rank(), group.size()
    owners = step_owners(optimizer, world)
    read = [t for t in {id(t): t for t in getattr(optimizer, "parameters_read", lambda: [])()}.values()
            if is_sharded(t)]
    read_ids = {id(t) for t in read}

    wanted: list[tuple[DTensor, tuple[int, ...]]] = []  # (tensor, the ranks that need it whole)
    for p in sharded:
        owner = (owners[id(p)],)
        wanted.append((p, tuple(range(world)) if id(p) in read_ids else owner))
        if p.grad is not None:
            wanted.append((p.grad, owner))
        wanted += [(v, owner) for v in optimizer.state.get(p, {}).values() if _is_sharded_state(v, p)]
    wanted += [(t, tuple(range(world))) for t in read if id(t) not in owners]
    gathered = _gather(wanted, group)

    stand_in: dict[int, Tensor] = {}
    for p in sharded:
        if owners[id(p)] == rank:
            stand_in[id(p)] = whole = nn.Parameter(gathered[id(p)], requires_grad=p.requires_grad)
            whole.grad = gathered[id(p.grad)] if p.grad is not None else None
            if p in optimizer.state:
                optimizer.state[whole] = {k: gathered[id(v)] if _is_sharded_state(v, p) else v
                                          for k, v in optimizer.state[p].items()}
    for t in read:  # read whole by every rank (norm gains), written only by their owner if optimized
        stand_in.setdefault(id(t), gathered[id(t)])
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


def _is_sharded_state(value, param: Tensor) -> bool:
    """A state tensor stored sharded like its parameter (shaped like it, a ``DTensor``)."""
    return is_sharded(value) and tuple(value.shape) == tuple(param.shape)


def _shard_sizes(t: DTensor, world: int) -> tuple[int, list[int]]:
    """The sharded dim of ``t`` and every rank's extent along it (``torch.chunk`` sizes, as FSDP2)."""
    (placement,) = t.placements
    if type(placement) is not Shard:
        raise NotImplementedError(f"gaugeopt's sharded step supports Shard(dim) placements, not {placement}")
    sizes = [len(c) for c in torch.arange(t.shape[placement.dim]).chunk(world)]
    return placement.dim, sizes + [0] * (world - len(sizes))


def _piece_shape(shape: tuple[int, ...], dim: int, size: int) -> tuple[int, ...]:
    return (*shape[:dim], size, *shape[dim + 1:])


def _gather(wanted: list[tuple[DTensor, tuple[int, ...]]], group: dist.ProcessGroup) -> dict[int, Tensor]:
    """Whole tensors from shards: ``{id(t): full}`` for each ``(t, destinations)`` this rank is one of
    the destinations of. One routing round; every rank lists the same tensors in the same order."""
    rank, world = group.rank(), group.size()
    messages = []
    for t, destinations in wanted:
        dim, sizes = _shard_sizes(t, world)
        for dst in destinations:
            for src in range(world):
                payload = _local(t) if src == rank else None
                messages.append(_Message(src, dst, _piece_shape(tuple(t.shape), dim, sizes[src]), t.dtype, payload))
    received = iter(_route(messages, group, _local(wanted[0][0]).device))
    out = {}
    for t, destinations in wanted:
        if rank in destinations:
            out[id(t)] = torch.cat([next(received) for _ in range(world)], dim=_shard_sizes(t, world)[0])
    return out


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
                stand_in: dict[int, Tensor], group: dist.ProcessGroup) -> None:
    """Give every rank its shards of the stepped parameters and their state, and the rest whole.

    The owners first publish the layout of their parameters' state (keys, shapes, dtypes, and the
    values that are not tensors) and the dict attributes named in ``optimizer.distributed_reports``
    (``frozen``, filled by each rank for the parameters it stepped, merged here) with one
    ``all_gather_object``. Then one routing round (:func:`_route`) carries, from each owner to each
    other rank, that rank's shard of every sharded parameter and of every state tensor shaped like
    it, and every other state tensor (and any unsharded parameter) whole. A state tensor shaped like
    its parameter is kept as a ``DTensor`` placed like it, updated in place when it exists (a
    checkpoint loader may hold it); other state is replicated.
    """
    rank, world = group.rank(), group.size()
    report_names = getattr(optimizer, "distributed_reports", ())
    layouts = {}
    for i, p in enumerate(params):
        stepped = stand_in.get(id(p), p)
        if owners[id(p)] == rank:
            layouts[i] = _layout(optimizer.state[stepped]) if stepped in optimizer.state else None
    mine = {"state": layouts, "reports": {name: getattr(optimizer, name) for name in report_names}}
    published: list = [None] * world
    dist.all_gather_object(published, mine, group=group)
    for name in report_names:
        setattr(optimizer, name, {k: v for part in published for k, v in part["reports"][name].items()})

    messages, writes = [], []  # writes: (parameter, state key or None, sharded?, message index)
    for i, p in enumerate(params):
        owner = owners[id(p)]
        stepped = stand_in.get(id(p), p)
        state = optimizer.state.get(stepped, {}) if owner == rank else {}
        layout = published[owner]["state"][i] or {}
        tensors = [(None, tuple(p.shape), p.dtype, stepped if owner == rank else None)]
        tensors += [(k, shape, dtype, state.get(k)) for k, (is_tensor, shape, dtype, _) in layout.items() if is_tensor]
        for key, shape, dtype, value in tensors:
            split = is_sharded(p) and shape == tuple(p.shape) and len(shape) > 0
            dim, sizes = _shard_sizes(p, world) if split else (0, None)
            for dst in range(world):
                if dst == owner and not split:
                    continue  # the owner holds it whole already
                payload = None
                if owner == rank:
                    payload = value.detach().narrow(dim, sum(sizes[:dst]), sizes[dst]) if split else value.detach()
                if dst == rank:
                    writes.append((p, key, split, len(messages)))
                messages.append(_Message(owner, dst, _piece_shape(shape, dim, sizes[dst]) if split else shape,
                                         dtype, payload))
    received = dict(zip([m for *_, m in writes], _route(messages, group, _local(params[0]).device)))
    mine_by_parameter: dict[int, list] = {}
    for write in writes:
        mine_by_parameter.setdefault(id(write[0]), []).append(write)

    for i, p in enumerate(params):
        owner = owners[id(p)]
        layout = published[owner]["state"][i]
        held = optimizer.state.get(p, {})
        new = {}
        if layout is not None:
            new = {k: value for k, (is_tensor, _, _, value) in layout.items() if not is_tensor}
            if owner == rank:  # the owner keeps its replicated state as stepped
                stepped = optimizer.state[stand_in.get(id(p), p)]
                new.update({k: stepped[k] for k, (is_tensor, *_) in layout.items() if is_tensor})
        for _, key, split, m in mine_by_parameter.get(id(p), ()):
            value = received[m]
            if key is None:
                if is_sharded(p) or owner != rank:
                    _local(p).copy_(value)
            elif split:
                old = held.get(key)
                if is_sharded(old) and tuple(old.shape) == tuple(p.shape) and old.placements == p.placements:
                    _local(old).copy_(value)  # keep the object (a checkpoint loader may hold it)
                    new[key] = old
                else:
                    new[key] = DTensor.from_local(value.clone(memory_format=torch.contiguous_format), p.device_mesh,
                                                  p.placements, run_check=False, shape=p.shape, stride=p.stride())
            else:
                new[key] = value.clone()
        if layout is not None:
            optimizer.state[p] = {k: new[k] for k in layout}


def _layout(state: dict) -> dict:
    """``{key: (is_tensor, shape, dtype, value)}`` of a state dict (value only for non-tensors)."""
    return {key: (True, tuple(v.shape), v.dtype, None) if torch.is_tensor(v) else (False, None, None, v)
            for key, v in state.items()}


def _swap_hook(optimizer: torch.optim.Optimizer, replace: Mapping[int, Tensor]) -> None:
    """Let the optimizer read ``replace[id(p)]`` for parameter ``p`` outside its param groups."""
    hook = getattr(optimizer, "substitute_parameters", None)
    if hook is not None:
        hook(replace)


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
