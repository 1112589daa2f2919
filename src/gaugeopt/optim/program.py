"""What is stepped with what: the batches of one step, built once per layout of the parameters.

Every parameter with a gradient is stepped as a member of a *batch*: same-shape tensors of one param
group whose frames have the same structure (all layers' query projections, all layers' MLP up
projections, ...), stacked along a new leading axis. Each math step is one operation on the stack, so
the operations dispatched per step grow with the number of distinct shapes, not with depth.

A :class:`StepProgram` is the static part (hashable: compiled phases are cached on it):

* :class:`TensorBatch`: parameters stepped by one rule; each scaled axis says where its frame comes
  from (:class:`GainScale`: the members' norm gains; :class:`NeuronScale`: a :class:`NeuronBatch`'s
  unit scales); a member of an isolated neuron pair names its :class:`PairRole`;
* :class:`NormBatch`: norm families whose channel scales take a step together;
* :class:`NeuronBatch`: neuron families with one frame computation (isolated pairs of one
  signature, or one family of a chain), each of its :class:`NeuronRole` a multiplied or divided
  tensor whose other axes carry frame factors (:class:`GainFactor`, :class:`LinkedFactor`).

A :class:`StepLayout` binds a program to the tensors it steps (per batch one members record), and
:func:`build_program` makes both from the param groups and the frame plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .frames import FramePlan, ScalingFrame
from .guards import compute_dtype
from .rules import Rule
from .shards import RowShard
from .symmetry import Residual, Scaling, Side

__all__ = ["GainScale", "NeuronScale", "PairRole", "GainFactor", "LinkedFactor", "TensorBatch", "NormBatch",
           "NeuronRole", "NeuronBatch", "StepProgram", "TensorMembers", "NormMembers", "NeuronMembers",
           "StepLayout", "build_program"]


# --------------------------------------------------------------------------------------------------
# The static program
# --------------------------------------------------------------------------------------------------


class GainScale(NamedTuple):
    """A member axis on ``side`` of a norm scaling: its frame is the members' gains (step inputs)."""

    axis: int
    side: Side


class NeuronScale(NamedTuple):
    """A member axis on ``side`` of a neuron scaling: its frame is neuron batch ``batch``'s scales."""

    axis: int
    side: Side
    batch: int


AxisScale = GainScale | NeuronScale


class PairRole(NamedTuple):
    """Role ``role`` of isolated neuron batch ``batch`` (a multiplied or divided side of its units)."""

    batch: int
    role: int


class GainFactor(NamedTuple):
    """A role's other ``axis`` merged with the norm gain acting on it."""

    axis: int


class LinkedFactor(NamedTuple):
    """A role's other ``axis`` multiplied by a linked neuron batch's side vector: the upstream batch's
    ``u`` for a multiplied role, the downstream batch's ``v`` for a divided one."""

    axis: int
    batch: int


@dataclass(frozen=True)
class TensorBatch:
    """``members`` same-shape parameters of one group stepped together with one rule.

    ``scales``: the scaled member axes, in axis order; ``channel``: the member axis a norm family's
    channel-scale factor multiplies (its consumer columns), or None; ``stacked``: the new values are
    computed on a stacked copy of the parameters (translations, rebalanced pairs, low precision)
    instead of written in place; ``rebalance``: the pair role of an isolated pair member whose write
    waits for the rebalancing factor; ``params_from``: the pair role whose stacked parameters these
    are. ``shape`` is the members' frame shape (:attr:`~gaugeopt.optim.frames.TensorFrame.shape`);
    ``rule_shape`` their own, which the rule sees, when the frame reads them on a view of another
    shape (else None). On a row shard both are this rank's (``shard``: its rows of the frame shape's
    axis 0).
    """

    members: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    param_dtype: torch.dtype
    rule: Rule | None
    scales: tuple[AxisScale, ...]
    channel: int | None
    centered: bool
    residual: Residual
    stacked: bool
    rebalance: PairRole | None
    params_from: PairRole | None
    rule_shape: tuple[int, ...] | None = None
    shard: RowShard | None = None

    @property
    def gain_scales(self) -> tuple[GainScale, ...]:
        return tuple(s for s in self.scales if isinstance(s, GainScale))


@dataclass(frozen=True)
class NormBatch:
    """Norm families whose channel scales take a step together (same width, gain group, bias);
    ``shard``: the rows of the gains this rank steps (their gradients and state are these rows)."""

    members: int
    units: int
    dtype: torch.dtype
    bias: bool
    shard: RowShard | None = None


@dataclass(frozen=True)
class NeuronRole:
    """One role of a neuron batch's families (a multiplied or divided tensor): the unit ``axis``, its
    ``side``, the frame ``factors`` of its other axes, whether the role is ``centered`` (translated
    rows), and the ``shard`` of its tensors' rows this rank holds (None: whole)."""

    axis: int
    side: Side
    factors: tuple[GainFactor | LinkedFactor, ...]
    centered: bool
    shard: RowShard | None = None

    @property
    def gain_factors(self) -> tuple[GainFactor, ...]:
        return tuple(f for f in self.factors if isinstance(f, GainFactor))


@dataclass(frozen=True)
class NeuronBatch:
    """Neuron families with one frame computation: isolated pairs of one signature (all layers' MLP
    units), or one family of a chain. ``rebalance``: isolated and every member stepped (each unit is
    put back on its orbit's section after the step)."""

    members: int
    units: int
    dtype: torch.dtype
    roles: tuple[NeuronRole, ...]
    rebalance: bool


@dataclass(frozen=True)
class StepProgram:
    """Everything static about one step: the batches, in the order the phases visit them."""

    tensors: tuple[TensorBatch, ...]
    norms: tuple[NormBatch, ...]
    neurons: tuple[NeuronBatch, ...]
    edge_scale: float  # the section constant c of the neuron frames

    def waves(self) -> list[tuple[list[int], list[int]]]:
        """The neuron batches whose frames can be computed together: wave ``i`` holds the batches
        whose ``u`` needs ``i`` upstream ``u`` vectors before it (input side) and those whose ``v``
        needs ``i`` downstream ``v`` vectors (output side). Isolated pairs are all in wave 0; a chain
        of ``k`` families takes ``k`` waves. On shards each wave is one reduction round."""
        def links(batch: NeuronBatch, side: Side) -> list[int]:
            return [f.batch for role in batch.roles if role.side == side for f in role.factors
                    if isinstance(f, LinkedFactor)]

        forward: dict[int, int] = {}
        for k, batch in enumerate(self.neurons):
            forward[k] = 1 + max([forward[s] for s in links(batch, Side.MULTIPLIED)], default=-1)
        backward: dict[int, int] = {}
        for k in reversed(range(len(self.neurons))):
            backward[k] = 1 + max([backward[s] for s in links(self.neurons[k], Side.DIVIDED)], default=-1)
        depth = 1 + max([*forward.values(), *backward.values()], default=-1)
        return [([k for k, level in forward.items() if level == i], [k for k, level in backward.items() if level == i])
                for i in range(depth)]


# --------------------------------------------------------------------------------------------------
# The tensors a program steps
# --------------------------------------------------------------------------------------------------


@dataclass
class TensorMembers:
    """The parameters of a tensor batch, their param group, per :class:`GainScale` the members' gain
    names, and each member's row in the channel-factor table of its width (None: no channel step)
    and the param group of the gain whose channel step that row is (None: the row of ones)."""

    params: list[Tensor]
    group: int
    gains: list[list[str]]
    channel_rows: Tensor | None
    channel_groups: tuple[int | None, ...] = ()


@dataclass
class NormMembers:
    """The norm families of a norm batch, the param group of their gains, and the gain parameters
    (which hold the channel step's state)."""

    families: list[ScalingFrame]
    group: int
    gains: list[Tensor]


@dataclass
class NeuronMembers:
    """The neuron families of a neuron batch; per role the members' tensor names; per role and
    :class:`GainFactor` the members' gain names."""

    families: list[str]
    roles: list[list[str]]
    gains: list[list[list[str]]]


@dataclass
class StepLayout:
    """A :class:`StepProgram` bound to the tensors it steps: per batch its members, the gradients
    only checked for finiteness (gains without a channel step), and the frame views of parameters
    read in another shape (name -> frame shape)."""

    program: StepProgram
    tensors: list[TensorMembers]
    norms: list[NormMembers]
    neurons: list[NeuronMembers]
    checked: list[list[Tensor]]
    views: Mapping[str, tuple[int, ...]]


# --------------------------------------------------------------------------------------------------
# Building the program from param groups
# --------------------------------------------------------------------------------------------------


def _is_active(p: Tensor) -> bool:
    return p.grad is not None and p.requires_grad


def _roles(f: ScalingFrame) -> list[tuple[Any, Side]]:
    """A neuron family's tensors in role order: multiplied refs, then divided."""
    return [(r, Side.MULTIPLIED) for r in f.multiplied] + [(r, Side.DIVIDED) for r in f.divided]


def _chain_components(plan: FramePlan) -> dict[str, str]:
    """Neuron family -> a representative of its chain (families linked as upstream/downstream)."""
    root = {f.name: f.name for f in plan.neurons}

    def find(x: str) -> str:
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    for f in plan.neurons:
        for other in (*f.upstream, *f.downstream):
            root[find(other)] = find(f.name)
    return {name: find(name) for name in root}


def build_program(groups: Sequence[Mapping[str, Any]], names: Mapping[int, str], lookup: Mapping[str, Tensor],
                  plan: FramePlan, rules: Sequence[Rule | None], *, channel_step: bool, edge_scale: float,
                  stack: bool = True, ranks: tuple[int, int] | None = None) -> StepLayout:
    """Sort the parameters with gradients into batches (module docstring).

    ``names`` maps ``id(parameter)`` to its name in ``plan``'s model (parameters without a name have no
    frame); ``lookup`` maps names to the tensors frames read (the model's parameters or stand-ins);
    ``rules[g]`` is group ``g``'s base rule (None: a program that only reads frames, e.g. for
    gradient clipping); ``channel_step`` enables the norm channel-scale step; ``edge_scale`` is the
    section constant ``c`` of the neuron frames. ``stack=False`` makes every batch a single tensor (a
    single family), except the batches of a rule made of matrix products (``rule.matrix_products``:
    Muon), which are stacked across layers whatever ``stack`` says (one batched product per shape).
    ``ranks``: ``(rank, world)`` when every tensor is sharded on dim 0 over ``world`` ranks (FSDP2): the
    program then steps this rank's rows (:class:`~gaugeopt.optim.shards.RowShard`).
    """
    group_of, active = {}, {}
    for g, group in enumerate(groups):
        for p in group["params"]:
            name = names.get(id(p))
            if name is not None:
                group_of[name], active[name] = g, _is_active(p)

    def signature(name: str) -> tuple:
        p, frame = lookup[name], plan.frame(name)
        return (frame.signature() if frame is not None else (), tuple(p.shape), p.dtype, p.device,
                group_of.get(name), active.get(name, False))

    def shards(name: str | None, p: Tensor) -> _Shapes:
        frame = plan.frame(name) if name is not None else None
        return _row_shapes(tuple(p.shape), frame.shape if frame is not None else tuple(p.shape), ranks, name)

    neuron = _sort_neurons(plan, signature, active, lookup, stack, shards)
    norm = _sort_norms(plan, lookup, group_of, active, channel_step, stack, ranks)
    tensor = _sort_tensors(groups, names, plan, rules, neuron, norm, stack, shards)
    program = StepProgram(tuple(b for b, _ in tensor.batches), tuple(b for b, _ in norm.batches),
                          tuple(neuron.batches), float(edge_scale))
    views = {}
    for name in plan.tensors:
        shapes = shards(name, lookup[name])
        if shapes.frame != shapes.own:
            views[name] = shapes.frame
    norms = [NormMembers(families, group, [lookup[f.gain] for f in families])
             for (_, families), group in zip(norm.batches, norm.groups)]
    return StepLayout(program, [m for _, m in tensor.batches], norms, neuron.members, tensor.checked, views)


class _Shapes(NamedTuple):
    """A parameter's shapes on this rank: ``own`` and ``frame`` (its frame's view), the rows of the
    frame shape's axis 0 it holds (``shard``) and those of its own axis 0 (``own_shard``)."""

    own: tuple[int, ...]
    frame: tuple[int, ...]
    shard: RowShard | None
    own_shard: RowShard | None


def _row_shapes(own: tuple[int, ...], frame: tuple[int, ...], ranks: tuple[int, int] | None,
                name: str | None) -> _Shapes:
    """:class:`_Shapes` of a parameter of global shape ``own`` read in ``frame`` shape, sharded on dim 0
    over ``ranks = (rank, world)`` (or whole: ``None``). A frame that splits axis 0 into blocks needs
    shard boundaries between blocks (``NotImplementedError`` otherwise)."""
    if ranks is None or not own:
        return _Shapes(own, frame, None, None)
    inner = own[0] // frame[0] if frame[0] and len(frame) > len(own) and frame[0] != own[0] else 1
    try:
        shard = RowShard.of(frame[0], *ranks, inner=inner)
    except ValueError as error:
        raise NotImplementedError(f"gaugeopt's sharded step cannot step {name}: {error}") from None
    own_shard = shard if inner == 1 else RowShard.of(own[0], *ranks)
    return _Shapes((own_shard.size, *own[1:]), (shard.size, *frame[1:]), shard, own_shard)


@dataclass
class _Neurons:
    batches: list[NeuronBatch]
    members: list[NeuronMembers]
    batch_of: dict[str, int]  # family -> batch
    role_of: dict[str, PairRole]  # tensor of an isolated family -> its role
    chain_members: set[str]


def _sort_neurons(plan: FramePlan, signature: Callable[[str], tuple], active: Mapping[str, bool],
                  lookup: Mapping[str, Tensor], stack: bool,
                  shards: Callable[[str, Tensor], _Shapes]) -> _Neurons:
    """Neuron families to compute frames for: isolated ones of one signature batch together, a
    chain's families one by one (whole chains, if any of their tensors is stepped)."""
    component = _chain_components(plan)
    live = {component[f.name] for f in plan.neurons if any(active.get(n, False) for n in f.members)}
    sorted_: dict[Any, list[ScalingFrame]] = {}
    for f in plan.neurons:
        if component[f.name] in live:
            key = ("isolated", f.units, tuple((r.axis, side, signature(r.name)) for r, side in _roles(f))) \
                if f.isolated and stack else ("one", f.name)
            sorted_.setdefault(key, []).append(f)
    batch_of = {f.name: k for k, families in enumerate(sorted_.values()) for f in families}
    out = _Neurons([], [], batch_of, {}, set())
    for k, families in enumerate(sorted_.values()):
        first = families[0]
        roles, role_names, role_gains = [], [], []
        for r, (ref, side) in enumerate(_roles(first)):
            names = [_roles(f)[r][0].name for f in families]
            frame = plan.frame(ref.name)
            factors, gains = [], []
            for axis, scaled in frame.scaled:
                if axis == ref.axis:
                    continue
                if scaled.kind is Scaling.NORM:
                    factors.append(GainFactor(axis))
                    gains.append([plan.scalings[plan.frame(n).scale_on(axis).family].gain for n in names])
                else:
                    factors.append(LinkedFactor(axis, batch_of[scaled.family]))
            roles.append(NeuronRole(ref.axis, side, tuple(factors), frame.centered and ref.axis != 0,
                                    shards(ref.name, lookup[ref.name]).shard))
            role_names.append(names)
            role_gains.append(gains)
        rebalance = first.isolated and all(active.get(n, False) for names in role_names for n in names)
        out.batches.append(NeuronBatch(len(families), first.units, compute_dtype(lookup[first.members[0]]),
                                       tuple(roles), rebalance))
        out.members.append(NeuronMembers([f.name for f in families], role_names, role_gains))
        for r, names in enumerate(role_names):
            for name in names:
                if first.isolated:
                    out.role_of[name] = PairRole(k, r)
                else:
                    out.chain_members.add(name)
    return out


@dataclass
class _Norms:
    batches: list[tuple[NormBatch, list[ScalingFrame]]]
    groups: list[int]
    row: dict[str, int]  # norm family -> its row in the channel-factor table of its width
    rows: dict[int, int]  # width -> rows of that table before its row of ones
    group: dict[str, int]  # norm family -> the param group of its gain (which sets the channel step's rate)


def _sort_norms(plan: FramePlan, lookup: Mapping[str, Tensor], group_of: Mapping[str, int],
                active: Mapping[str, bool], channel_step: bool, stack: bool, ranks: tuple[int, int] | None) -> _Norms:
    """Norm families whose gains take the channel-scale step, batched by width, dtype and group."""
    sorted_: dict[Any, list[ScalingFrame]] = {}
    for f in plan.norms:
        if channel_step and active.get(f.gain, False) and any(active.get(c, False) for c in f.consumers):
            gain = lookup[f.gain]
            bias = f.bias is not None and active.get(f.bias, False)
            key = (f.units, gain.dtype, gain.device, group_of[f.gain], bias, None if stack else f.name)
            sorted_.setdefault(key, []).append(f)
    out = _Norms([], [], {}, {}, {})
    for (units, dtype, _, group, bias, _), families in sorted_.items():
        shard = RowShard.of(units, *ranks) if ranks is not None else None
        out.batches.append((NormBatch(len(families), units, compute_dtype(lookup[families[0].gain]), bias, shard),
                            families))
        out.groups.append(group)
        for f in families:
            out.group[f.name] = group
            out.row[f.name] = out.rows.get(units, 0)
            out.rows[units] = out.row[f.name] + 1
    return out


@dataclass
class _Tensors:
    batches: list[tuple[TensorBatch, TensorMembers]]
    checked: list[list[Tensor]]


def _sort_tensors(groups: Sequence[Mapping[str, Any]], names: Mapping[int, str], plan: FramePlan,
                  rules: Sequence[Rule | None], neuron: _Neurons, norm: _Norms, stack: bool,
                  shards: Callable[[str | None, Tensor], _Shapes]) -> _Tensors:
    """Parameters with gradients into batches: pair roles by their neuron batch (in its member
    order), chain members one by one, the rest by group, frame and shape. Gains are frames, never
    stepped: their gradients are only checked, or read by the channel-scale step."""
    stepped_gains = {f.gain for _, families in norm.batches for f in families}
    stacked_groups = [stack or (rule is not None and rule.matrix_products) for rule in rules]
    sorted_: dict[Any, list[tuple[str | None, Tensor, int]]] = {}
    checked: dict[Any, list[Tensor]] = {}
    for g, group in enumerate(groups):
        for p in group["params"]:
            if not _is_active(p):
                continue
            name = names.get(id(p))
            frame = plan.frame(name) if name is not None else None
            if frame is not None and frame.gain:
                if name not in stepped_gains:
                    checked.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
                continue
            if name in neuron.role_of:
                key = ("role", neuron.role_of[name])
            elif name in neuron.chain_members:
                key = ("single", name)
            else:
                key = ("batch", g, frame.signature() if frame is not None else (), tuple(p.shape), p.dtype, p.device,
                       None if stacked_groups[g] else id(p))
            sorted_.setdefault(key, []).append((name, p, g))
    out = _Tensors([], list(checked.values()))
    for key, members in sorted_.items():
        role = key[1] if key[0] == "role" else None
        if role is not None:
            order = {n: i for i, n in enumerate(neuron.members[role.batch].roles[role.role])}
            members.sort(key=lambda member: order[member[0]])
        member_names = [n for n, _, _ in members]
        params = [p for _, p, _ in members]
        first, group = params[0], members[0][2]
        frame = plan.frame(member_names[0]) if member_names[0] is not None else None
        scales: list[AxisScale] = []
        gains: list[list[str]] = []
        channel, channel_rows, channel_groups = None, None, ()
        for axis, action in (frame.scaled if frame is not None else ()):
            if action.kind is Scaling.NEURON:
                scales.append(NeuronScale(axis, action.side, neuron.batch_of[action.family]))
                continue
            scales.append(GainScale(axis, action.side))
            families = [plan.frame(n).scale_on(axis).family for n in member_names]
            gains.append([plan.scalings[f].gain for f in families])
            if action.side is Side.DIVIDED and any(f in norm.row for f in families):
                rows = [norm.row.get(f, norm.rows[first.shape[axis]]) for f in families]
                channel, channel_rows = axis, torch.tensor(rows, device=first.device)
                channel_groups = tuple(norm.group.get(f) for f in families)
        rebalance = role if role is not None and neuron.batches[role.batch].rebalance else None
        centered = frame is not None and frame.centered
        dtype = compute_dtype(first)
        stacked = centered or rebalance is not None or dtype != first.dtype
        shapes = shards(member_names[0], first)
        residual = Residual(frame.shared, frame.heads, shapes.own_shard) if frame is not None \
            else Residual(rows=shapes.own_shard)
        batch = TensorBatch(len(params), shapes.frame, dtype, first.dtype, rules[group], tuple(scales),
                            channel, centered, residual, stacked, rebalance, role if stacked else None,
                            shapes.own if shapes.frame != shapes.own else None, shapes.shard)
        out.batches.append((batch, TensorMembers(params, group, gains, channel_rows, channel_groups)))
    return out
