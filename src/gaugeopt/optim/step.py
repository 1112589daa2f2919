"""The one step of the gauge-equivariant optimizers: read -> canonicalize -> rule -> lift -> write.

A step runs a :class:`~gaugeopt.optim.program.StepProgram` on the tensors of its
:class:`~gaugeopt.optim.program.StepLayout` in two phases, pure functions of the program and the
step's tensors:

1. :func:`read_frames` (reads only): stack the gradients where the rule works on stacks (eager,
   torch's fused Adam and Muon's momentum take them per member) and the parameters where a frame
   needs them, compute the frames (:mod:`gaugeopt.optim.frames`: norm gains, neuron scales ``s``, frozen
   channels and units, the gradient factors ``gamma``), the canonical gradients
   ``G~ = P(G gamma)`` (:func:`canonicalize`; eager only: traced, the write forms them inside its
   own loop) and the three flags the caller reads with one host synchronisation: every gradient
   finite, some canonical gradient beyond :func:`~gaugeopt.optim.rules.square_safe`, any channel or
   unit frozen. The flags come from the tensors the phase forms anyway (:class:`_Probes`).
2. :func:`write` (only after the flags allow it): per norm family the channel-scale step (a scalar
   Adam on ``h = g dL/dg (+ beta dL/dbeta)``, the gain's AdamW step taken as a factor
   ``e = exp(-min(lr_g, lr_c) r)`` on the consumers' columns, ``lr_g`` the gain's rate and ``lr_c``
   the consumer's); per batch the Adam batches' canonical gradients clipped to ``square_safe`` if
   the flag says some are beyond it, the rule's canonical direction ``D`` (eager elementwise Adam in
   torch's fused AdamW kernel), the lift (:func:`lift`) and the write

       p <- (1 - lr wd) p e - r D gamma e     (horizontal part only for a translated tensor)

   with ``r = lr s`` the rate, ``s`` the rule's :meth:`~gaugeopt.optim.rules.Rule.rate_factor`
   (Muon's shape factor; 1 for Adam), and, for isolated neuron pairs, the gauge element that puts
   every unit back on the section of its orbit before the write (:func:`pair_factors`), so their
   orbit coordinates do not move.

Frozen channels and units (a zero gain, a unit whose incoming side is zero: no frame exists there) get
``gamma = 0`` and are written back exactly as they were. Both phases run eagerly or traced by
``torch.compile`` (:mod:`gaugeopt.optim.compile`); ``traced`` says which, so that the eager step
writes through views and reuses scratch memory where a traced one must not.

The same program steps a row shard (FSDP2: :mod:`gaugeopt.optim.shards`). Every batch then holds this
rank's rows of its members; per-unit and per-channel vectors are whole on every rank (sliced to the
rows where they act on the row axis), and every sum over the rows is this rank's part, added over the
ranks by the step's :class:`~gaugeopt.optim.shards.Collectives` (the identity in one process). The
phases are ordered in *reduction rounds*: all the sums one part of the step needs are taken together,
then added in one call (the mean rows of translated parameters; the neuron frames, one round per wave
of :meth:`~gaugeopt.optim.program.StepProgram.waves`; the channel factors; the mean rows of translated
canonical gradients; each translated direction's mean row; the isolated pairs' sums of squares). Maps
that need whole matrices are the rule's affair (:meth:`~gaugeopt.optim.shards.Collectives.whole`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..gauges.families import unit_section
from .frames import finite_nonnegative, frozen_gains, neuron_frames, unit_square_sums
from .program import GainFactor, GainScale, NeuronRole, PairRole, StepLayout, StepProgram, TensorBatch
from .rules import Adam, adam_direction_, square_safe
from .shards import LOCAL, Collectives, RowShard, global_units, local_rows, local_tensor
from .storage import ScalarTables, StackedState, stacked_rows, stacked_view
from .symmetry import Side

__all__ = ["CHANNEL_ADAM", "CHANNEL_STATE", "BatchScalars", "Members", "TensorInputs", "NormInputs", "NeuronInputs",
           "StepTensors", "Frames", "step_inputs", "with_state", "read_frames", "canonicalize", "lift", "write",
           "pair_factors", "rebalance"]

#: The scalar Adam of the channel-scale step (settings read from the group of the gain).
CHANNEL_ADAM = Adam()
CHANNEL_STATE = ("step", "scale_exp_avg", "scale_exp_avg_sq")


# --------------------------------------------------------------------------------------------------
# A step's tensors
# --------------------------------------------------------------------------------------------------


class BatchScalars(NamedTuple):
    """A batch's numbers for this step, as tensors in its compute dtype: the learning rate, the decay
    factor ``1 - lr wd`` (norm batches: unused, 1), the rule's scalars (:meth:`Rule.scalars`; also
    kept as host numbers in :attr:`TensorInputs.numbers` for a rule given its members' gradients) and
    the rate of the lifted direction, ``lr`` times the rule's :meth:`~gaugeopt.optim.rules.Rule.rate_factor`;
    for a batch that a channel step scales, per member the share of its gain's channel step it takes
    (:func:`channel_shares`; empty otherwise)."""

    lr: Tensor
    decay: Tensor
    rule: Sequence[Tensor]
    rate: Tensor
    channel_share: Tensor | Sequence[float] = ()


#: A batch's members: their list, or the ``(L, ...)`` stack of them where they lie in one buffer
#: (:func:`~gaugeopt.optim.storage.stacked_view`, no copy; writing it writes them; read-only gains:
#: gathered from it, a copy).
Members = Tensor | list[Tensor]


class TensorInputs(NamedTuple):
    params: Members
    grads: Members
    gains: list[Members]  # per GainScale of the batch, the members' gains
    channel_rows: Tensor | None  # each member's row in the channel-factor table of its width
    state: dict[str, Tensor]  # stacked buffers
    scalars: BatchScalars | None
    group: Mapping[str, Any] | None = None  # the param group (its numbers on the host, for fused kernels)
    numbers: Sequence[Any] | None = None  # the rule's scalars as host numbers (for its foreach kernels)


class NormInputs(NamedTuple):
    gains: Members
    gain_grads: Members
    biases: Members
    bias_grads: Members
    state: dict[str, Tensor]
    scalars: BatchScalars | None


class NeuronInputs(NamedTuple):
    params: list[Members]  # per role, the members' tensors
    gains: list[list[Members]]  # per role, per GainFactor, the members' gains


class StepTensors(NamedTuple):
    """The tensors of one step, laid out as the program says (state and scalars are added once the
    read phase has cleared the step: :func:`with_state`)."""

    tensors: list[TensorInputs]
    norms: list[NormInputs]
    neurons: list[NeuronInputs]
    checked: list[Members]  # gradients only checked for finiteness (gains without a channel step)
    collectives: Collectives = LOCAL  # how a step on row shards sums over the ranks (gaugeopt.optim.shards)


class Frames(NamedTuple):
    """What the read phase hands the write phase."""

    grads: list[Tensor | None]  # the gradients per tensor batch, stacked, where the canonical ones are
    canonical: list[Tensor | list[Tensor] | None]  # eager: G~ per tensor batch (a stack, or per member)
    params: list[Tensor | None]  # stacked parameters (compute dtype) where a batch needs them
    means: list[Tensor | None]  # per translated tensor batch, the mean row of its parameters
    gammas: list[list[Tensor]]  # per tensor batch, per scaled axis, the gradient factor (broadcastable)
    dead: list[list[Tensor]]  # per tensor batch, per scaled axis, its dead slices (broadcastable)
    scales: list[Tensor]  # per neuron batch, s
    sections: list[tuple[Tensor, Tensor]]  # per neuron batch, (u^2, |w~_in|^2) of which s = sqrt(u^2 / |w~_in|^2)
    neuron_dead: list[Tensor]  # per neuron batch, (members, units): frozen (incoming side zero)
    neuron_outgoing_zero: list[Tensor]  # per neuron batch, (members, units): outgoing side zero
    neuron_gains: list[list[list[Tensor]]]  # per neuron batch, per role, per gain factor, the stacked gains
    norm_dead: list[Tensor]  # per norm batch, the zero gains
    scale_inputs: list[Tensor]  # per norm batch, h
    workspace: dict[torch.dtype, Tensor]  # scratch for the neuron frames' sums of squares, per dtype
    flags: Tensor  # (every canonical gradient finite, some beyond square_safe, some channel or unit dead)


def step_inputs(layout: StepLayout, lookup: Mapping[str, Tensor], whole: Mapping[str, Tensor] = {},
                collectives: Collectives = LOCAL) -> StepTensors:
    """This step's parameters, gradients and gains (``lookup``: name -> tensor to read), each
    parameter and gradient in its batch's frame shape (a view where that is not its own); members
    that lie one after another in one buffer as its view (:data:`Members`), gains that lie in one
    buffer in another order gathered from it. On row shards every tensor is this rank's rows, but
    the norm gains read as frames, which are ``whole[name]``, and ``collectives`` sums over the ranks."""
    program = layout.program

    def framed(ts: list[Tensor], shape: tuple[int, ...]) -> Members:
        ts = [local_tensor(t) for t in ts]
        return _members_or_stack([t if t.shape == shape else t.view(shape) for t in ts])

    def read(name: str) -> Tensor:
        t = local_tensor(lookup[name])
        return t if name not in layout.views else t.view(layout.views[name])

    gathered: dict[tuple[str, ...], Members] = {}  # one stack per list of gains (eager: framed once)

    def gains(names: Sequence[str]) -> Members:
        key = tuple(names)
        if key not in gathered:
            gathered[key] = _members_or_stack([whole[n] if n in whole else lookup[n] for n in names], gather=True)
        return gathered[key]

    def grads(ts: list[Tensor]) -> Members:
        return _members_or_stack([local_tensor(t.grad) for t in ts])

    tensors = [TensorInputs(framed(members.params, batch.shape), framed([p.grad for p in members.params], batch.shape),
                            [gains(names) for names in members.gains], members.channel_rows, {}, None)
               for batch, members in zip(program.tensors, layout.tensors)]
    norms = []
    for batch, members in zip(program.norms, layout.norms):
        own = [lookup[f.gain] for f in members.families]
        biases = [lookup[f.bias] for f in members.families] if batch.bias else []
        norms.append(NormInputs(gains([f.gain for f in members.families]), grads(own),
                                _members_or_stack([local_tensor(b) for b in biases]), grads(biases), {}, None))
    neurons = [NeuronInputs([_members_or_stack([read(n) for n in names]) for names in members.roles],
                            [[gains(names) for names in role] for role in members.gains])
               for members in layout.neurons]
    return StepTensors(tensors, norms, neurons, [grads(ps) for ps in layout.checked], collectives)


def _members_or_stack(tensors: list[Tensor], gather: bool = False) -> Members:
    """``tensors`` as their stacked view where they lie one after another in one buffer, else as they
    are; with ``gather``, members that lie in one buffer in another order (a norm's gains for
    consumers that repeat or skip some) as a stack gathered from it in one operation."""
    if len(tensors) < 2:
        return tensors
    if not gather:
        view = stacked_view(tensors)
        return tensors if view is None else view
    found = stacked_rows(tensors)
    if found is None:
        return tensors
    rows, index = found
    if index == list(range(len(tensors))) and rows.shape[0] == len(tensors):
        return rows
    return rows.index_select(0, _row_index(tuple(index), rows.device))


@functools.lru_cache(maxsize=256)
def _row_index(index: tuple[int, ...], device: torch.device) -> Tensor:
    """``index`` as a tensor on ``device``, made once (no host-to-device copy in later steps)."""
    return torch.tensor(index, device=device)


def with_state(layout: StepLayout, inputs: StepTensors, groups: Sequence[Mapping[str, Any]], state: Mapping,
               stacked: StackedState, tables: ScalarTables) -> StepTensors:
    """``inputs`` with every batch's state buffers (made, or stacked again, where needed) and this
    step's numbers (:class:`BatchScalars`) as tensors in the batch's compute dtype on its device: the
    numbers of all batches of one dtype and device are slices of one of ``tables``, written once."""
    tensors, numbers_of = [], []
    for b, (batch, members, t) in enumerate(zip(layout.program.tensors, layout.tensors, inputs.tensors)):
        # state is kept per parameter (the layout's own tensors, not the frame views) in its own shape
        buffers = stacked.buffers(state, ("tensor", b), members.params, batch.rule.state_keys)
        steps = stacked.advance(("tensor", b)) if "step" in buffers else []
        group = groups[members.group]
        lr = float(group["lr"])
        numbers = batch.rule.scalars(group, steps)
        rate = lr * batch.rule.rate_factor(batch.rule_shape or batch.shape, batch.residual)
        share = channel_shares(lr, [None if g is None else float(groups[g]["lr"]) for g in members.channel_groups]) \
            if members.channel_groups else ()
        numbers_of.append(((batch.dtype, t.params[0].device),
                           BatchScalars(lr, 1 - lr * float(group["weight_decay"]), numbers, rate, share)))
        tensors.append(t._replace(state=buffers, group=group, numbers=numbers))
    norms = []
    for n, (batch, members, t) in enumerate(zip(layout.program.norms, layout.norms, inputs.norms)):
        buffers = stacked.buffers(state, ("norm", n), members.gains, CHANNEL_STATE)
        group = groups[members.group]
        steps = stacked.advance(("norm", n))
        lr = float(group["lr"])
        numbers_of.append(((batch.dtype, t.gains[0].device), BatchScalars(lr, 1.0, CHANNEL_ADAM.scalars(group, steps), lr)))
        norms.append(t._replace(state=buffers))
    scalars = _uploaded(numbers_of, tables)
    tensors = [t._replace(scalars=x) for t, x in zip(tensors, scalars)]
    norms = [t._replace(scalars=x) for t, x in zip(norms, scalars[len(tensors):])]
    return inputs._replace(tensors=tensors, norms=norms)


def channel_shares(lr: float, gain_lrs: Sequence[float | None]) -> list[float]:
    """Per member of a batch stepped at rate ``lr_c = lr``, the share ``min(lr_c, lr_g) / lr_g`` of
    its gain's channel step ``exp(-lr_g r)`` that it takes (``lr_g``: the gain's group rate; 0 where
    that is 0 or the member's norm takes no step, ``None``): the channel step moves no consumer faster
    than its own group's rate, nor at more than the gain's, and a group with lr 0 stays where it is
    on either side."""
    return [min(lr, g) / g if g else 0.0 for g in gain_lrs]


def _uploaded(numbers_of: Sequence[tuple[tuple[torch.dtype, torch.device], BatchScalars]], tables: ScalarTables
              ) -> list[BatchScalars]:
    """Each batch's host numbers as tensors, one of ``tables`` per dtype and device, in the order given."""
    keys = list(dict.fromkeys(key for key, _ in numbers_of))
    out: list[BatchScalars | None] = [None] * len(numbers_of)
    for dtype, device in keys:
        index = [i for i, (key, _) in enumerate(numbers_of) if key == (dtype, device)]
        for i, scalars in zip(index, tables.upload(tuple(numbers_of[i][1] for i in index), dtype, device)):
            out[i] = scalars
    return out


# --------------------------------------------------------------------------------------------------
# Small helpers on stacks
# --------------------------------------------------------------------------------------------------


def _stack(members: Members, dtype: torch.dtype) -> Tensor:
    """The members stacked along a new axis 0, in ``dtype``: a stack as it is, a single member as a
    view, else a copy (:func:`_made` says which)."""
    if isinstance(members, Tensor):
        stacked = members
    else:
        stacked = members[0].unsqueeze(0) if len(members) == 1 else torch.stack(list(members))
    return stacked if stacked.dtype == dtype else stacked.to(dtype)


def _made(members: Members, dtype: torch.dtype) -> bool:
    """Whether :func:`_stack` of ``members`` is a new tensor (the step's own memory), not a view of them."""
    first = members if isinstance(members, Tensor) else members[0]
    return first.dtype != dtype or (isinstance(members, list) and len(members) > 1)


def _contiguous(members: Members) -> bool:
    """Whether every member is contiguous (a stack: itself, so each of its slices)."""
    return members.is_contiguous() if isinstance(members, Tensor) else all(t.is_contiguous() for t in members)


def _listed(members: Members) -> list[Tensor]:
    """The members one by one (for foreach kernels): the slices of a stack."""
    return list(members.unbind(0)) if isinstance(members, Tensor) else members


def _along(vector: Tensor, axis: int, ndim: int) -> Tensor:
    """An ``(L, size)`` vector shaped to broadcast along member ``axis`` of an ``(L, ...)`` stack with
    ``ndim`` member dimensions."""
    shape = [vector.shape[0]] + [1] * ndim
    shape[axis + 1] = vector.shape[1]
    return vector.reshape(shape)


def _on_axis(vector: Tensor, axis: int, ndim: int, shard: RowShard | None) -> Tensor:
    """:func:`_along` for a vector over all of ``axis``: this rank's rows of it on the row axis."""
    return _along(local_rows(vector, shard) if axis == 0 else vector, axis, ndim)


def _members(values: Tensor | list[Tensor], count: int) -> list[Tensor]:
    """A per-member list for a foreach op: the slices of a stacked tensor, or a 0-d tensor repeated."""
    if isinstance(values, Tensor) and values.dim() == 0:
        return [values] * count
    return list(values.expand(count, *values.shape[1:]).unbind(0))


def _row_mean_part(stack: Tensor, shard: RowShard | None) -> Tensor:
    """This rank's part of the mean row of a stack (the rows are member axis 0), kept as a row: the
    sum of its rows over all the rows' count; the mean itself without a shard."""
    return stack.mean(dim=1, keepdim=True) if shard is None else stack.sum(dim=1, keepdim=True).div_(shard.rows)


# --------------------------------------------------------------------------------------------------
# Read: the frames
# --------------------------------------------------------------------------------------------------


def _role_squares(program: StepProgram, index: int, side: Side, stacks: list[Tensor], gains: list[list[Tensor]],
                  vectors: list[Tensor | None], means: list[Tensor | None], workspace: Tensor | None) -> Tensor:
    """Per unit of neuron batch ``index``, the sum over its roles on ``side`` of the squared slices,
    each other axis multiplied by its frame factor (gain, or the ``vectors`` of a linked batch), the
    rows of a centred role less their mean ``means[role]``: on a row shard, this rank's part of the
    sum, at the units' global positions."""
    batch, total = program.neurons[index], None
    for r, role in enumerate(batch.roles):
        if role.side != side:
            continue
        p = stacks[r] - means[r] if role.centered else stacks[r]
        part = unit_square_sums(p, role.axis + 1, _slice_factors(role, gains[r], vectors), workspace=workspace)
        part = global_units(part, role.axis, role.shard)
        total = part if total is None else total + part
    return total


def _slice_factors(role: NeuronRole, gains: Sequence[Tensor], vectors: Sequence[Tensor | None]) -> dict[int, Tensor]:
    """The factors of a role's other axes (stacked axes, so ``axis + 1``): its norm gains in order, or
    the ``vectors`` of the linked neuron batch (this rank's rows of them on the row axis)."""
    factors, gain_count = {}, 0
    for factor in role.factors:
        if isinstance(factor, GainFactor):
            value = gains[gain_count]
            gain_count += 1
        else:
            value = vectors[factor.batch]
        factors[factor.axis + 1] = local_rows(value, role.shard) if factor.axis == 0 else value
    return factors


class _Probes:
    """The step's flags, gathered while the read phase forms its tensors: every gradient finite, some
    canonical gradient beyond :func:`~gaugeopt.optim.rules.square_safe` (so the write clips them),
    some channel or unit dead.

    Eager, a tensor's probe is its Euclidean norm ``|x|_2``, taken for every tensor probed in one
    multi-tensor operation per dtype (torch's CPU kernels take a norm about as fast as ``aminmax``
    and over 10x faster than the largest magnitude ``|x|_inf``). It bounds the largest magnitude,
    ``|x|_inf <= |x|_2``, and is finite exactly when every entry is, unless the sum of squares of
    finite entries overflows. Both errors are on the safe side: a norm beyond ``square_safe`` whose
    entries are not only clips entries that the clip leaves as they are, and an overflowed norm sends
    the caller to its per-parameter scan, which finds every gradient finite and clips
    (:meth:`~gaugeopt.optim.base.FramedOptimizer.step`). Traced, the tests of a stack are exact:
    ``isfinite(x).all()`` and ``(|x| > bound).any()`` (inductor fuses the two into one loop)."""

    def __init__(self, traced: bool):
        self.traced = traced
        self.probed: dict[tuple[torch.dtype, bool], list[Tensor]] = {}  # by dtype and bounded, for their norms
        self.finite: list[Tensor] = []
        self.beyond: list[Tensor] = []
        self.dead: list[Tensor] = []  # frozen-unit and frozen-channel masks (eager: each once)

    def check(self, values: Tensor | list[Tensor], bounded: bool = False) -> None:
        """Probe ``values`` (a stack, or a list of member tensors) for finiteness, and for entries
        beyond ``square_safe`` if ``bounded``. The tensors are read when :meth:`flags` is taken: not
        written before."""
        if isinstance(values, Tensor) and self.traced:
            if values.numel():
                self.finite.append(torch.isfinite(values).all())
                if bounded:
                    self.beyond.append((values.abs() > square_safe(values.dtype)).any())
            return
        for value in (values if isinstance(values, list) else [values]):
            if value.numel():
                self.probed.setdefault((value.dtype, bounded), []).append(value)

    def frozen(self, mask: Tensor) -> Tensor:
        """Count ``mask``'s frozen channels or units in the step's flag; returns it."""
        if self.traced or all(m is not mask for m in self.dead):
            self.dead.append(mask)
        return mask

    def flags(self) -> Tensor:
        for (dtype, bounded), values in self.probed.items():
            norms = torch.stack(torch._foreach_norm(values))
            self.finite.append(finite_nonnegative(norms).all())
            if bounded:
                self.beyond.append((norms > square_safe(dtype)).any())
        return torch.stack([torch.stack(self.finite).all() if self.finite else torch.ones((), dtype=torch.bool),
                            torch.stack(self.beyond).any() if self.beyond else torch.zeros((), dtype=torch.bool),
                            torch.cat([m.reshape(-1) for m in self.dead]).any() if self.dead
                            else torch.zeros((), dtype=torch.bool)])


def read_frames(program: StepProgram, inputs: StepTensors, traced: bool = False) -> Frames:
    """The read-only half of a step (module docstring): frames, canonical gradients and the flags."""
    probes = _Probes(traced)
    collectives = inputs.collectives

    def checked(stack: Tensor) -> Tensor:
        probes.check(stack)
        return stack

    stacks = [[_stack(ts, batch.dtype) for ts in inputs.neurons[k].params]
              for k, batch in enumerate(program.neurons)]
    role_gains = [[[_stack(gs, batch.dtype) for gs in role] for role in inputs.neurons[k].gains]
                  for k, batch in enumerate(program.neurons)]
    params: list[Tensor | None] = []
    for batch, tensors in zip(program.tensors, inputs.tensors):
        if batch.params_from is not None:
            params.append(stacks[batch.params_from.batch][batch.params_from.role])
        else:
            params.append(_stack(tensors.params, batch.dtype) if batch.stacked else None)

    # The mean rows of translated parameters (one round): centred roles, then centred batches.
    centred_roles = [(k, r) for k, batch in enumerate(program.neurons) for r, role in enumerate(batch.roles)
                     if role.centered]
    centred = [b for b, batch in enumerate(program.tensors) if batch.centered]
    found = collectives.sum([_row_mean_part(stacks[k][r], program.neurons[k].roles[r].shard) for k, r in centred_roles] +
                            [_row_mean_part(params[b], program.tensors[b].shard) for b in centred])
    role_means: list[list[Tensor | None]] = [[None] * len(batch.roles) for batch in program.neurons]
    for (k, r), mean in zip(centred_roles, found):
        role_means[k][r] = mean
    means: list[Tensor | None] = [None] * len(program.tensors)
    for b, mean in zip(centred, found[len(centred_roles):]):
        means[b] = mean
    if traced:  # the write phase stacks its own views (no copy; none written through)
        params = [None] * len(params)

    # Neuron frames: u from the input side (dependency order), v from the output side (reverse), one
    # round per wave. Eager, one scratch tensor serves every sum of squares (here and in the
    # rebalance); traced, the sums fuse into their loops and a scratch tensor passed between the
    # phases would be copied back.
    sizes: dict[torch.dtype, int] = {}
    for batch, role_stacks in zip(program.neurons, stacks):
        sizes[batch.dtype] = max([sizes.get(batch.dtype, 0), *(s.numel() for s in role_stacks)])
    workspace = {} if traced else \
        {dtype: torch.empty(size, dtype=dtype, device=stacks[0][0].device) for dtype, size in sizes.items()}

    forward: list[Tensor | None] = [None] * len(program.neurons)
    backward: list[Tensor | None] = [None] * len(program.neurons)
    for ahead, behind in program.waves():
        parts = [_role_squares(program, k, Side.MULTIPLIED, stacks[k], role_gains[k], forward, role_means[k],
                               workspace.get(program.neurons[k].dtype)) for k in ahead]
        parts += [_role_squares(program, k, Side.DIVIDED, stacks[k], role_gains[k], backward, role_means[k],
                                workspace.get(program.neurons[k].dtype)) for k in behind]
        totals = collectives.sum(parts)
        for k, total in zip(ahead, totals):
            forward[k] = total.sqrt()
        for k, total in zip(behind, totals[len(ahead):]):
            backward[k] = total.sqrt()
    scales, sections, neuron_dead = [], [], []
    for u, v in zip(forward, backward):
        frames = neuron_frames(u.square(), v.square(), program.edge_scale)
        scales.append(frames.scale)
        sections.append((u.square(), frames.incoming))
        neuron_dead.append(frames.frozen)

    # Norm families taking the channel-scale step: h = g dL/dg (+ beta dL/dbeta), invariant.
    norm_dead, scale_inputs = [], []
    for dead in neuron_dead:
        probes.frozen(dead)
    # A norm's gains frame its own channel step and every batch they scale: eager, stacked, tested and
    # inverted once per step, keyed by the gain tensors (traced, no key: inductor reads them in place).
    gain_frames: dict[Any, tuple[Any, Tensor, Tensor]] = {}
    gamma_of: dict[tuple[Any, Side], Tensor] = {}

    def gain_frame(gains: Members, dtype: torch.dtype) -> tuple[Any, Tensor, Tensor]:
        key = None if traced else (id(gains) if isinstance(gains, Tensor) else tuple(map(id, gains)), dtype)
        frame = gain_frames.get(key)
        if frame is None:
            stack = _stack(gains, dtype)
            frame = (key, stack, probes.frozen(frozen_gains(stack)))
            if key is not None:
                gain_frames[key] = frame
        return frame

    for batch, norm in zip(program.norms, inputs.norms):
        _, gains, dead = gain_frame(norm.gains, batch.dtype)
        gain_grads = checked(_stack(norm.gain_grads, batch.dtype))
        gains, dead = local_rows(gains, batch.shard), local_rows(dead, batch.shard)
        h = gains * gain_grads
        if batch.bias:
            h = torch.addcmul(h, _stack(norm.biases, batch.dtype), checked(_stack(norm.bias_grads, batch.dtype)))
        norm_dead.append(dead)
        scale_inputs.append(h.masked_fill_(dead, 0.0))

    # Tensors: the gradient factors gamma (G~ = G gamma, centred where translated) and dead slices.
    gammas, deads = [], []
    for batch, tensors in zip(program.tensors, inputs.tensors):
        ndim = len(batch.shape)
        factors, dead, gain_count = [], [], 0
        for scale in batch.scales:
            if isinstance(scale, GainScale):
                key, frame, off = gain_frame(tensors.gains[gain_count], batch.dtype)
                gain_count += 1
            else:
                key, frame, off = ("neuron", scale.batch), scales[scale.batch], neuron_dead[scale.batch]
            gamma = gamma_of.get((key, scale.side)) if key is not None else None
            if gamma is None:
                gamma = frame.masked_fill(off, 0.0) if scale.side is Side.MULTIPLIED else \
                    frame.reciprocal().masked_fill_(off, 0.0)
                if key is not None:
                    gamma_of[(key, scale.side)] = gamma
            factors.append(_on_axis(gamma, scale.axis, ndim, batch.shard))
            dead.append(_on_axis(off, scale.axis, ndim, batch.shard))
        gammas.append(factors)
        deads.append(dead)
    for ts in inputs.checked:
        checked(ts)

    # The canonical gradients: formed here (eager) or inside the update (traced: fused into its loop);
    # eager, per member where the rule's first passes are elementwise (torch's fused Adam, Muon's
    # momentum), so no stack of them is written and read again, unless the gradients lie in one
    # buffer (stack_parameters) and a factor acts: then one stacked operation forms them (a factor
    # broadcast to each member of a list sends a CUDA multi-tensor operation down its per-tensor path).
    grads = [_stack(t.grads, batch.dtype) if traced or not (_fused(batch, t) or _member_wise(batch))
             or (isinstance(t.grads, Tensor) and bool(factors)) else None
             for batch, t, factors in zip(program.tensors, inputs.tensors, gammas)]
    per_member = [_listed(t.grads) if grad is None else grad for grad, t in zip(grads, inputs.tensors)]
    # traced, these are only probed: the stacks go to the write phase as they are
    owned = [] if traced else [grad is not None and _made(t.grads, batch.dtype)
                               for grad, batch, t in zip(grads, program.tensors, inputs.tensors)]
    canonical = canonicalize(program, per_member, gammas, collectives, owned)
    for values in canonical:
        probes.check(values, bounded=True)
    if traced:
        canonical = [None] * len(canonical)
    outgoing_zero = [v == 0 for v in backward]
    return Frames(grads, canonical, params, means, gammas, deads, scales, sections, neuron_dead, outgoing_zero,
                  role_gains, norm_dead, scale_inputs, workspace, probes.flags())


# --------------------------------------------------------------------------------------------------
# Canonicalize and lift
# --------------------------------------------------------------------------------------------------


def _canonical_gradient(grad: Tensor, gammas: list[Tensor], owned: bool) -> Tensor:
    """``G gamma``, in the step's own memory (the rule may overwrite it): ``grad`` itself when it is
    (``owned``: a stacked copy), a new tensor when it is a view of the user's gradients."""
    canonical = grad
    for gamma in gammas:
        canonical = canonical.mul_(gamma) if owned else canonical * gamma
        owned = True
    return canonical if owned else canonical.clone()


def canonicalize(program: StepProgram, grads: Sequence[Tensor | list[Tensor]], gammas: Sequence[Sequence[Tensor]],
                 collectives: Collectives = LOCAL, owned: Sequence[bool] = ()) -> list[Tensor | list[Tensor]]:
    """The canonical gradients ``G~ = P(G gamma)`` of every tensor batch: the gradient times its frame's
    gradient factor ``gamma``, less its mean row for translated batches (``P``; their row sums are one
    reduction round on shards). Invariant under every gauge but the rotations, under which they rotate
    (:mod:`gaugeopt.optim.frames`). ``grads[b]`` is a batch's stacked gradients (then so is its
    ``G~``, in memory of the step's own: ``grads[b]`` itself where ``owned[b]`` says the step made
    that stack, else new) or the list of its members' (then ``G~`` is a list too: the gradients
    themselves where no factor acts)."""
    canonical: list[Tensor | list[Tensor]] = []
    for b, (batch, grad, factors) in enumerate(zip(program.tensors, grads, gammas)):
        if isinstance(grad, Tensor):
            canonical.append(_canonical_gradient(grad, factors, b < len(owned) and owned[b]))
            continue
        for factor in factors:
            grad = torch._foreach_mul(grad, _members(factor, batch.members))
        canonical.append(list(grad))
    centred = [b for b, batch in enumerate(program.tensors) if batch.centered]
    means = collectives.sum([_row_mean_part(canonical[b], program.tensors[b].shard) for b in centred])
    for b, mean in zip(centred, means):
        canonical[b] = canonical[b].sub_(mean)
    return canonical


def lift(direction: Tensor | list[Tensor], factors: Sequence[Tensor], lr: Tensor
         ) -> tuple[Tensor | list[Tensor], Tensor]:
    """The canonical direction ``D`` (a stack, or its members) mapped back by the frame: the step
    ``lr D f_1 ... f_k`` (``f`` the gradient factors ``gamma``, and the channel factor ``e``) as
    ``(D f_1 ... f_{j-1}, lr f_j)``, the last product left to the write's fused multiply-add.
    Factors that act on the same axes (a gain's ``gamma`` and the channel factor ``e`` of its
    columns: each broadcasts to the other's shape) are first multiplied together, vectors with
    vectors, so that ``D`` is multiplied once per scaled axis, not once per factor (``j <= k``).
    ``direction`` is overwritten; one in a narrower dtype than the factors (Muon's bfloat16) is
    multiplied into a new tensor of theirs, the product taken in their dtype."""
    merged: list[Tensor] = []
    for factor in factors:
        for i, other in enumerate(merged):
            if torch.broadcast_shapes(other.shape, factor.shape) in (other.shape, factor.shape):
                merged[i] = other * factor
                break
        else:
            merged.append(factor)
    factors = merged
    for factor in factors[:-1]:
        if isinstance(direction, Tensor) and direction.dtype != factor.dtype:
            direction = torch.mul(direction, factor if factor.dim() else factor.reshape(1))  # promotes
        elif isinstance(direction, Tensor):
            direction = direction.mul_(factor)
        else:
            torch._foreach_mul_(direction, _members(factor, len(direction)))
    return direction, (factors[-1] * lr if factors else lr)


# --------------------------------------------------------------------------------------------------
# Write
# --------------------------------------------------------------------------------------------------


class _Held(NamedTuple):
    """An isolated pair's batch waiting for its side's factor: the new values (horizontal part), mean
    row and per-unit sums of squares (this rank's part on a shard), both of ``value / pending``
    where the decay was left to the rebalance (:func:`write`; ``pending`` is then the decay)."""

    batch: int
    value: Tensor
    mean: Tensor | None
    after: Tensor
    pending: Tensor | None = None


class _ChannelTable(NamedTuple):
    """The channel-scale steps of the norm batches of one width, stacked in program order, then a row
    for consumers whose norm takes no step: ``log_factor = -lr_g r`` per channel (0 in that row)."""

    log_factor: Tensor

    def factors(self, rows: Tensor, share: Tensor) -> Tensor:
        """The factors ``exp(-min(lr_g, lr_c) r)`` of the channels of table ``rows`` for the members of
        a consumer, which take the ``share`` ``min(lr_g, lr_c) / lr_g`` of their rows' steps
        (:func:`channel_shares`)."""
        return torch.exp(self.log_factor.index_select(0, rows) * share[:, None])


def _channel_tables(program: StepProgram, inputs: StepTensors, frames: Frames, traced: bool
                    ) -> dict[int, _ChannelTable]:
    """Per channel width, the :class:`_ChannelTable` of the norm batches of that width: ``r`` is
    Adam's direction for the invariant ``h``, with the gains' group settings (each rank steps the
    channels of its rows of the gains). Eager, formed in the memory of the read phase's ``h``; traced,
    not (an input a graph writes must be a static one to be captured in a CUDA graph)."""
    rows: dict[int, list[Tensor]] = {}
    for n, (batch, norm) in enumerate(zip(program.norms, inputs.norms)):
        h = frames.scale_inputs[n]
        h = _clip(h.clone() if traced else h, batch.dtype, owned=True)
        r = adam_direction_(h, norm.state["scale_exp_avg"], norm.state["scale_exp_avg_sq"], norm.scalars.rule)
        log_factor = r.mul_(-norm.scalars.lr).masked_fill_(frames.norm_dead[n], 0.0)
        rows.setdefault(batch.units, []).append(global_units(log_factor, 0, batch.shard))
    # on shards each rank has its channels' log-factors at their places, zeros elsewhere: one round
    summed = iter(inputs.collectives.sum([log_factor for parts in rows.values() for log_factor in parts]))
    tables = {}
    for width, parts in rows.items():
        logs = [next(summed) for _ in parts]
        tables[width] = _ChannelTable(torch.cat([*logs, torch.zeros_like(logs[0][:1])]))
    return tables


def _finish(tensors: TensorInputs, old: Tensor, value: Tensor, mean: Tensor | None, restore: Tensor | None) -> None:
    """Add the held mean row back, restore ``restore`` (dead) entries from ``old``, and write, unless
    the new values were formed in ``old`` and ``old`` is the parameters' memory (a single member's
    view, or the stack of parameters held in one buffer: :func:`_made`), a new tensor otherwise.
    (Members written through their buffer are marked modified for autograd by the optimizer's step.)"""
    if mean is not None:
        value = value.add_(mean)
    if restore is not None:
        value = torch.where(restore, old, value)
    if value is old and old._is_view() and not _made(tensors.params, old.dtype):
        return
    if isinstance(tensors.params, Tensor):
        tensors.params.copy_(value)
    else:
        torch._foreach_copy_(tensors.params, list(value.unbind(0)))


def _old_values(batch: TensorBatch, tensors: TensorInputs, frames: Frames, b: int, traced: bool) -> Tensor:
    """A stacked batch's parameters before the step (compute dtype)."""
    return frames.params[b] if frames.params[b] is not None else _stack(tensors.params, batch.dtype)


def _fused(batch: TensorBatch, tensors: TensorInputs) -> bool:
    """Whether an eager step takes the batch's Adam moments in torch's fused kernel, on its members'
    canonical gradients: elementwise Adam (no block-shared second moments), no translation (a
    translated batch's canonical gradients are a stack: :func:`_fused_on_stack`), parameters in
    their compute dtype, and parameters and gradients laid out like the state (contiguous: the
    kernel walks their memory)."""
    return isinstance(batch.rule, Adam) and not batch.residual.shared and not batch.centered and \
        batch.dtype == batch.param_dtype and _contiguous(tensors.params) and _contiguous(tensors.grads)


def _fused_on_stack(batch: TensorBatch) -> bool:
    """Whether an eager step takes a translated batch's Adam moments in torch's fused kernel, on the
    slices of its stack of canonical gradients (the step's own, contiguous); its direction's mean
    row is then taken off as the rule path's is."""
    return isinstance(batch.rule, Adam) and not batch.residual.shared and batch.centered


def _member_wise(batch: TensorBatch) -> bool:
    """Whether an eager step hands the batch's rule its members' canonical gradients as a list
    (:attr:`~gaugeopt.optim.rules.Rule.member_gradients`): not translated (the mean row is a stacked
    reduction) and parameters in their compute dtype."""
    return batch.rule is not None and batch.rule.member_gradients and not batch.centered and \
        batch.dtype == batch.param_dtype


def _clip(canonical: Tensor | list[Tensor], dtype: torch.dtype, owned: bool) -> Tensor | list[Tensor]:
    """Every entry of the canonical gradients clipped to ``square_safe(dtype)``, so that no moment
    overflows (:func:`~gaugeopt.optim.rules.square_safe`); a list that is the user's gradients is
    clipped into new tensors."""
    bound = square_safe(dtype)
    if isinstance(canonical, Tensor):
        return canonical.clamp_(-bound, bound)
    if owned:
        torch._foreach_clamp_max_(canonical, bound)
    else:
        canonical = list(torch._foreach_clamp_max(canonical, bound))
    torch._foreach_clamp_min_(canonical, -bound)
    return canonical


def _fused_adam(batch: TensorBatch, tensors: TensorInputs, canonical: list[Tensor], target: list[Tensor] | None
                ) -> None:
    """Adam's moments and direction in torch's fused AdamW kernel, on the members' canonical gradients.

    With ``target`` (the parameters of a batch no frame acts on): AdamW's whole step on them, with the
    group's rate and decay. Else the kernel steps the canonical gradients themselves (the step's own
    tensors) with rate 1 and decay 1: each entry is read before it is written, and the decay factor
    ``1 - 1 * 1`` zeroes it, so ``-D`` is left in ``canonical`` for the lift."""
    beta1, beta2 = (float(b) for b in tensors.group[batch.rule.betas_key])
    eps = float(tensors.group[batch.rule.eps_key])
    state = tensors.state
    if batch.rule_shape is not None:
        canonical = [c.view(batch.rule_shape) for c in canonical]
    moments = [list(state[key].unbind(0)) for key in ("exp_avg", "exp_avg_sq")]
    steps = list(state["step"].unbind(0))
    lr, decay = (float(tensors.group["lr"]), float(tensors.group["weight_decay"])) if target is not None else (1.0, 1.0)
    torch._fused_adamw_(canonical if target is None else target, canonical, *moments, [], steps, lr=lr, beta1=beta1,
                        beta2=beta2, weight_decay=decay, eps=eps, amsgrad=False, maximize=False)


def write(program: StepProgram, inputs: StepTensors, frames: Frames, masked: bool, clip: bool = True,
          traced: bool = False) -> tuple[list[_Held], dict[int, dict[Side, Tensor]]]:
    """The update of a step (module docstring): channel-scale steps, rule directions and lifts; every
    batch written except the isolated pairs', whose new values are returned with their factors
    (:func:`pair_factors`, from sums taken in the same pass) for :func:`rebalance`. ``masked``: some
    unit or channel is dead (the read phase's flag), so dead entries are kept exactly as they are;
    ``clip``: some canonical gradient is beyond ``square_safe`` (the read phase's flag), so the Adam
    batches' are clipped to it, as Adam's moments need (traced, always: it is fused into the update's
    loop); other rules take them as they are.

    Eager, a batch of elementwise Adam takes its moments and direction in torch's fused kernel
    (:func:`_fused_adam`), the rest the rule's own stacked math; both are Adam's formula."""
    collectives = inputs.collectives
    # every batch's step counts, one operation (torch's fused kernel reads them for its bias corrections)
    counts = [t.state["step"] for t in (*inputs.norms, *inputs.tensors) if "step" in t.state]
    if counts:
        torch._foreach_add_(counts, 1)
    tables = _channel_tables(program, inputs, frames, traced)
    # traced, the stacks of gradients are the read graph's outputs: formed out of place, as a graph
    # that writes an input copies it back (and is captured in no CUDA graph unless that input is static)
    canonical = canonicalize(program, frames.grads, frames.gammas, collectives) if traced else frames.canonical
    held: list[_Held] = []
    for b, (batch, tensors) in enumerate(zip(program.tensors, inputs.tensors)):
        ndim, members = len(batch.shape), batch.members
        decay = tensors.scalars.decay
        gradient = canonical[b]
        # a list of members' canonical gradients is the user's gradients themselves where no gradient
        # factor acts; a stack is always the step's own
        owned = isinstance(gradient, Tensor) or bool(frames.gammas[b])
        if (clip or traced) and isinstance(batch.rule, Adam):
            gradient, owned = _clip(gradient, batch.dtype, owned), True
        factors = list(frames.gammas[b])
        if batch.channel is not None:
            table = tables[batch.shape[batch.channel]]
            e = _on_axis(table.factors(tensors.channel_rows, tensors.scalars.channel_share), batch.channel, ndim,
                         batch.shard)
            factors.append(e)
            decay = decay * e
        dead = functools.reduce(torch.logical_or, frames.dead[b]) if masked and frames.dead[b] else None
        if dead is not None:
            decay = torch.where(dead, 1.0, decay)  # the lift is 0 there: dead entries stay as they are
        # a stack of canonical gradients: a translated batch's, or held gradients a factor acts on
        if isinstance(gradient, Tensor) and not traced and (_fused_on_stack(batch) or _fused(batch, tensors)):
            _fused_adam(batch, tensors, list(gradient.unbind(0)), None)  # -D, in the stack's memory
            direction, sign = gradient, 1
        elif not isinstance(gradient, Tensor) and not batch.rule.member_gradients:
            # torch's fused Adam; its direction comes negated, per member
            if not factors and not batch.stacked:  # no frame acts: AdamW on the parameters themselves
                _fused_adam(batch, tensors, gradient, _listed(tensors.params))
                continue
            if not owned:  # the kernel writes the direction into them: copies (one operation)
                gradient = list(torch._foreach_mul(gradient, 1.0))
            _fused_adam(batch, tensors, gradient, None)
            direction, sign = gradient, 1
        else:
            if batch.rule_shape is not None:  # the rule steps the parameter as it is (Muon: its own matrix)
                gradient = gradient.reshape(members, *batch.rule_shape) if isinstance(gradient, Tensor) else \
                    [g.view(batch.rule_shape) for g in gradient]
            scalars = tensors.scalars.rule if isinstance(gradient, Tensor) else tensors.numbers
            direction = batch.rule.direction(gradient, tensors.state, scalars, batch.residual, collectives)
            if batch.rule_shape is not None:
                direction = direction.reshape(members, *batch.shape)
            sign = -1
        if batch.centered:  # the horizontal part of the direction (one reduction round on shards)
            direction = direction.to(batch.dtype)
            (mean,) = collectives.sum([_row_mean_part(direction, batch.shard)])
            direction = direction.sub_(mean)
        direction, step = lift(direction, factors, tensors.scalars.rate)
        if not batch.stacked and isinstance(tensors.params, Tensor) and isinstance(direction, Tensor):
            # parameters held in one buffer: two operations, the direction read as it is
            tensors.params.mul_(decay).addcmul_(direction, step, value=sign)
            continue
        if not batch.stacked:  # written member by member
            if isinstance(direction, Tensor):  # a narrower direction (Muon's bfloat16) read as it is:
                direction = list(direction.unbind(0))  # the multiply-add promotes it, as a copy would
            params = _listed(tensors.params)
            torch._foreach_mul_(params, decay if decay.dim() == 0 else _members(decay, members))
            torch._foreach_addcmul_(params, direction, _members(step, members), value=sign)
            continue
        old = _old_values(batch, tensors, frames, b, traced)
        # a new tensor where the old values are needed again, or when traced (writing through a view
        # of an input is copied back whole there; the new values are copied into the parameters anyway)
        keep_old = (dead is not None and (batch.centered or batch.rebalance is not None)) or traced
        mean = frames.means[b]
        # A rebalanced pair's decay is one number (no dead entry, no channel factor) that the pair
        # factor can carry: p' = f (decay p + step D) is formed as (f decay)(p + (step / decay) D),
        # one pass over the values fewer (decay > 0: lr wd < 1, read from the group on the host; eager
        # only: traced, inductor fuses the decay into the update's loop anyway).
        pending = decay if not traced and batch.rebalance is not None and mean is None and dead is None and \
            decay.dim() == 0 and float(tensors.group["lr"]) * float(tensors.group["weight_decay"]) < 1 else None
        if pending is not None:
            step, value = step / pending, old
        elif mean is not None and batch.rebalance is None:
            # decay old + (1 - decay) mean - lr D gamma, one pass over old: the mean row held, and
            # exactly old at lr 0
            value = torch.addcmul((1 - decay) * mean, old, decay, out=None if keep_old else old)
        elif mean is not None:  # a pair's centred role: its horizontal part, which the pair factor scales
            value = (old - mean).mul_(decay)
        else:
            value = old * decay if keep_old else old.mul_(decay)
        if isinstance(direction, Tensor):  # one operation, which reads a narrower direction where it is
            value.addcmul_(direction, step, value=sign)
        else:
            torch._foreach_addcmul_(list(value.unbind(0)), direction, _members(step, members), value=sign)
        if batch.rebalance is not None:  # with the sums of squares after the lift, in the same pass
            held.append(_Held(b, value, mean, _role_square_sums(program, frames, batch.rebalance, value), pending))
        else:
            _finish(tensors, old, value, None, dead if keep_old else None)
    return held, (pair_factors(program, frames, held, collectives) if held else {})


def _role_square_sums(program: StepProgram, frames: Frames, role: PairRole, value: Tensor) -> Tensor:
    """Per unit of an isolated neuron batch, the sum of squares of ``role``'s slices of ``value``,
    merged with their norm gains (an isolated pair links to no other neuron batch); on a row shard,
    this rank's part at the units' global positions."""
    batch, spec = program.neurons[role.batch], program.neurons[role.batch].roles[role.role]
    factors = _slice_factors(spec, frames.neuron_gains[role.batch][role.role], ())
    sums = unit_square_sums(value, spec.axis + 1, factors, workspace=frames.workspace.get(batch.dtype))
    return global_units(sums, spec.axis, spec.shard)


def pair_factors(program: StepProgram, frames: Frames, held: list[_Held], collectives: Collectives = LOCAL
                 ) -> dict[int, dict[Side, Tensor]]:
    """Per isolated neuron batch, the per-unit factors of its two sides (``{MULTIPLIED: f_A, DIVIDED:
    f_B}``) that put every unit back on the section of its orbit (:func:`~gaugeopt.gauges.unit_section`)
    at the size the step gave it: with ``a``, ``b`` the new canonical norms of the multiplied and
    divided sides (in the frame of the step), ``l'^2 = a b`` and the section point
    ``(|w~_in|, |w~_out|)`` of ``l'``,

        f_A = |w~_in| / a,    f_B = |w~_out| / b = 1 / f_A

    (in raw terms ``|w~_in| s / |A|`` on the multiplied side ``A``, computed as
    ``sqrt(|w~_in|^2 u^2 / (|A|^2 |w~_in,0|^2))`` from the frame's ``u`` and section point, which is
    exactly 1 where the step changed nothing). ``f_A f_B = 1`` makes it a gauge
    element: it does not change the function. Being a function of invariants it keeps the step
    equivariant, and the new point is the section point of its size, so the frame ``s`` (the orbit
    coordinate ``log(|w_in| / |w~_in|)``) is what it was before the step (also where the divided side
    is zero: then ``l' = 0`` and the multiplied side goes back to ``|w~_in| = c``, whatever decay did).
    Frozen units get 1. On shards the sums of squares are one reduction round."""
    by_role = {program.tensors[h.batch].rebalance: h for h in held}
    rebalanced = [n for n, batch in enumerate(program.neurons) if batch.rebalance]
    totals = iter(collectives.sum([_unpended(by_role[PairRole(n, r)]) for n in rebalanced
                                   for r in range(len(program.neurons[n].roles))]))
    out: dict[int, dict[Side, Tensor]] = {}
    for n in rebalanced:
        (u2, incoming_before), dead = frames.sections[n], frames.neuron_dead[n]
        after: dict[Side, Tensor] = {}
        for role in program.neurons[n].roles:
            total = next(totals)
            after[role.side] = total if role.side not in after else after[role.side] + total
        incoming, _ = unit_section(torch.sqrt(after[Side.MULTIPLIED]) * torch.sqrt(after[Side.DIVIDED]),
                                   program.edge_scale)
        f = torch.sqrt((incoming * u2) / (after[Side.MULTIPLIED] * incoming_before))
        f = torch.where(dead | ~finite_nonnegative(f), 1.0, f)
        out[n] = {Side.MULTIPLIED: f, Side.DIVIDED: f.reciprocal()}
    return out


def _unpended(held: _Held) -> Tensor:
    """The held values' sums of squares, with their pending decay (:class:`_Held`)."""
    return held.after if held.pending is None else held.after * held.pending.square()


def rebalance(program: StepProgram, inputs: StepTensors, frames: Frames, held: list[_Held],
              factors_by_batch: dict[int, dict[Side, Tensor]], masked: bool, traced: bool = False) -> None:
    """Write the isolated pairs' held values, each unit put back on its section by its factors
    (:func:`pair_factors`)."""
    by_role = {program.tensors[h.batch].rebalance: h for h in held}
    for n, sides in factors_by_batch.items():
        for r, role in enumerate(program.neurons[n].roles):
            h = by_role[PairRole(n, r)]
            tensor_batch, tensors = program.tensors[h.batch], inputs.tensors[h.batch]
            side = sides[role.side] if h.pending is None else sides[role.side] * h.pending
            factor = _on_axis(side, role.axis, len(tensor_batch.shape), tensor_batch.shard)
            dead = functools.reduce(torch.logical_or, frames.dead[h.batch]) if masked and frames.dead[h.batch] else None
            old = _old_values(tensor_batch, tensors, frames, h.batch, traced)
            value = h.value * factor if traced else h.value.mul_(factor)
            _finish(tensors, old, value, h.mean, dead)
