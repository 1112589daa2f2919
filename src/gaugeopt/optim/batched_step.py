"""The one step of the gauge-equivariant optimizers: frame -> base rule -> lift, batched across layers.

Every parameter with a gradient is stepped as part of a *batch*: same-shape tensors of one param
group whose frames have the same structure (all layers' query projections, all layers' MLP up
projections, ...), stacked along a new leading axis. Each math step is then one operation on the
stack, so the operations dispatched per step grow with the number of distinct shapes, not with depth.

A step has two phases, pure functions of a static :class:`StepProgram` and the step's tensors:

1. :func:`read_phase` (reads only): stack the gradients (and the parameters where a frame needs
   them), compute the frames (:mod:`gaugeopt.optim.frames`: norm gains, neuron scales ``s``, frozen
   channels and units, the gradient factors ``gamma``) and the two flags the caller reads with one
   host synchronisation: every gradient finite, any channel or unit frozen.
2. :func:`write_phase` (only after the flags allow it): per norm family the channel-scale step (a
   scalar Adam on ``h = g dL/dg (+ beta dL/dbeta)``, the gain's AdamW step taken as a factor
   ``e = exp(-min(lr_g, lr_c) r)`` on the consumers' columns, ``lr_g`` the gain's rate and ``lr_c``
   the consumer's); per batch the canonical gradient ``G~ = G gamma``
   (centred for translations), the rule's canonical direction ``D``, the lift and the write

       p <- (1 - lr wd) p e - lr D gamma e     (horizontal part only for a translated tensor)

   and, for isolated neuron pairs, the gauge element that puts every unit back on the section of its
   orbit before the write (:func:`_pair_factors`), so their orbit coordinates do not move.

Both run eagerly, or compiled by ``torch.compile`` (:func:`compiled_phase`, one graph per phase and program,
learning rate, betas and decay as tensor inputs). Frozen channels and units (a zero gain, a unit
whose incoming side is zero: no frame exists there) get ``gamma = 0`` and are written back exactly
as they were.

The same program steps a row shard (FSDP2: :mod:`gaugeopt.optim.shards`). Every batch then holds
this rank's rows of its members; per-unit and per-channel vectors are whole on every rank (sliced
to the rows where they act on the row axis), and every sum over the rows is this rank's part, added
over the ranks by the step's :class:`~gaugeopt.optim.shards.Collectives` (the identity in one
process). The phases are ordered in *reduction rounds*: all the sums one part of the step needs are
taken together, then added in one call (the mean rows of translated parameters; the neuron frames,
one round per wave of :func:`_waves`; the channel factors; the mean rows of translated canonical gradients; each translated direction's mean
row; the isolated pairs' sums of squares). Maps that need whole matrices are the rule's affair
(:meth:`~gaugeopt.optim.shards.Collectives.whole`).
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..gauges.families import unit_section
from .frames import (
    FramePlan,
    ScalingFrame,
    frozen_gains,
    neuron_frames,
    unit_square_sums,
)
from .guards import compute_dtype
from .rules import Adam, Rule, adam_direction_
from .shards import LOCAL, Collectives, RowShard, global_units, local_rows, local_tensor, shard_like
from .symmetry import Residual

__all__ = [
    "TensorBatch",
    "NormBatch",
    "NeuronBatch",
    "NeuronRole",
    "StepProgram",
    "StepTensors",
    "StepLayout",
    "build_program",
    "read_phase",
    "write_phase",
    "canonical_gradient",
    "compiled_phase",
    "StackedState",
]

#: The scalar Adam of the channel-scale step (settings read from the group of the gain).
CHANNEL_ADAM = Adam()
CHANNEL_STATE = ("step", "scale_exp_avg", "scale_exp_avg_sq")


# --------------------------------------------------------------------------------------------------
# The static program
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorBatch:
    """``members`` same-shape parameters of one group stepped together with one rule.

    ``scaled``: ``(axis, side, kind, source)`` per scaled member axis, ``source`` the index of the
    neuron batch giving ``s`` (kind "neuron") or -1 (kind "norm": the members' gains are inputs);
    ``channel``: the member axis a norm family's channel-scale factor multiplies (its consumer
    columns), or -1; ``stacked``: the new values are computed on a stacked copy of the parameters
    (translations, rebalanced pairs, low precision) instead of written in place; ``rebalance``:
    ``(neuron batch, role)`` of an isolated pair member whose write waits for the rebalancing factor;
    ``params_from``: ``(neuron batch, role)`` whose stacked parameters these are. ``shape`` is the
    members' frame shape (:attr:`~gaugeopt.optim.frames.TensorFrame.shape`); ``rule_shape`` their own,
    which the rule sees, when the frame reads them on a view of another shape (else None). On a row
    shard both are this rank's (``shard``: its rows of the frame shape's axis 0).
    """

    members: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    param_dtype: torch.dtype
    rule: Rule
    scaled: tuple[tuple[int, int, str, int], ...]
    channel: int
    centered: bool
    residual: Residual
    stacked: bool
    rebalance: tuple[int, int] | None
    params_from: tuple[int, int] | None
    rule_shape: tuple[int, ...] | None = None
    shard: RowShard | None = None


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
    """One role of a neuron batch's families (a multiplied or divided tensor): the unit ``axis``,
    ``side`` (+1 multiplied, -1 divided), ``factors``: ``(axis, kind, batch)`` per other axis with a
    frame factor (kind "gain": the merging norm gain, an input; "u"/"v": that neuron batch's
    input-side or output-side vector), whether the role is ``centered`` (translated rows), and the
    ``shard`` of its tensors' rows this rank holds (None: whole)."""

    axis: int
    side: int
    factors: tuple[tuple[int, str, int], ...]
    centered: bool
    shard: RowShard | None = None


@dataclass(frozen=True)
class NeuronBatch:
    """Neuron families with one frame computation: isolated pairs of one signature (all layers' MLP
    units), or one family of a chain. ``rebalance``: isolated and every member stepped (each unit is
    put back on its orbit's section after the step: :func:`_pair_factors`)."""

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


class TensorInputs(NamedTuple):
    params: list[Tensor]
    grads: list[Tensor]
    gains: list[list[Tensor]]  # per norm-scaled axis (in ``scaled`` order), the members' gains
    channel: Tensor | None  # each member's row in the channel-factor table of its width
    state: dict[str, Tensor]  # stacked buffers
    scalars: Tensor | None  # lr, 1 - lr wd, then the rule's scalars (compute dtype)


class NormInputs(NamedTuple):
    gains: list[Tensor]
    gain_grads: list[Tensor]
    biases: list[Tensor]
    bias_grads: list[Tensor]
    state: dict[str, Tensor]
    scalars: Tensor | None  # lr, then Adam's scalars


class NeuronInputs(NamedTuple):
    params: list[list[Tensor]]  # per role, the members' tensors
    gains: list[list[list[Tensor]]]  # per role, per "gain" factor, the members' gains


class StepTensors(NamedTuple):
    """The tensors of one step, laid out as the program says (state and scalars are added once the
    read phase has cleared the step: :meth:`StepLayout.for_writing`)."""

    tensors: list[TensorInputs]
    norms: list[NormInputs]
    neurons: list[NeuronInputs]
    checked: list[list[Tensor]]  # gradients only checked for finiteness (gains without a channel step)
    collectives: Collectives = LOCAL  # how a step on row shards sums over the ranks (gaugeopt.optim.shards)


class ReadOut(NamedTuple):
    """What the read phase hands the write phase."""

    grads: list[Tensor]  # the gradients per tensor batch, stacked (a view of a single member's)
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
    flags: Tensor  # (every gradient finite, some channel or unit dead)


# --------------------------------------------------------------------------------------------------
# Small helpers on stacks
# --------------------------------------------------------------------------------------------------


def _stack(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """The members stacked along a new axis 0, in ``dtype``; a single member is a view."""
    stacked = tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))
    return stacked if stacked.dtype == dtype else stacked.to(dtype)


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


# --------------------------------------------------------------------------------------------------
# The read phase
# --------------------------------------------------------------------------------------------------


def _role_squares(program: StepProgram, index: int, side: int, stacks: list[list[Tensor]],
                  gains: list[list[list[Tensor]]], vectors: list[Tensor | None], means: list[Tensor | None],
                  workspace: Tensor | None) -> Tensor:
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
    for axis, kind, source in role.factors:
        if kind == "gain":
            factor = gains[gain_count]
            gain_count += 1
        else:
            factor = vectors[source]
        factors[axis + 1] = local_rows(factor, role.shard) if axis == 0 else factor
    return factors


def _row_mean_part(stack: Tensor, shard: RowShard | None) -> Tensor:
    """This rank's part of the mean row of a stack (the rows are member axis 0), kept as a row: the
    sum of its rows over all the rows' count; the mean itself without a shard."""
    return stack.mean(dim=1, keepdim=True) if shard is None else stack.sum(dim=1, keepdim=True).div_(shard.rows)


def _finiteness_probes(stack: Tensor) -> tuple[Tensor, ...]:
    """Numbers that are all finite exactly when every entry of ``stack`` is: its extremes (eager), or
    0 or NaN by ``isfinite(stack).all()`` (compiled: inductor's CPU code reduces that about 3x faster
    than a min and a max; a sum of ``0 * x`` would be faster still, but inductor folds ``0 * x`` to 0)."""
    if torch.compiler.is_compiling():
        return (torch.where(torch.isfinite(stack).all(), 0.0, math.nan),)
    return tuple(torch.aminmax(stack))


def _waves(program: StepProgram) -> list[tuple[list[int], list[int]]]:
    """The neuron batches whose frames can be computed together: wave ``i`` holds the batches whose
    ``u`` needs ``i`` upstream ``u`` vectors before it (input side) and those whose ``v`` needs ``i``
    downstream ``v`` vectors (output side). Isolated pairs are all in wave 0; a chain of ``k``
    families takes ``k`` waves. On shards each wave is one reduction round."""
    forward: dict[int, int] = {}
    for k, batch in enumerate(program.neurons):
        forward[k] = 1 + max([forward[s] for role in batch.roles if role.side > 0
                              for _, kind, s in role.factors if kind == "u"], default=-1)
    backward: dict[int, int] = {}
    for k in reversed(range(len(program.neurons))):
        backward[k] = 1 + max([backward[s] for role in program.neurons[k].roles if role.side < 0
                               for _, kind, s in role.factors if kind == "v"], default=-1)
    depth = 1 + max([*forward.values(), *backward.values()], default=-1)
    return [([k for k, level in forward.items() if level == i], [k for k, level in backward.items() if level == i])
            for i in range(depth)]


def read_phase(program: StepProgram, inputs: StepTensors) -> ReadOut:
    """The read-only half of a step (module docstring): stacked gradients, frames and the flags."""
    probes: list[Tensor] = []  # finite exactly when every checked gradient is
    collectives = inputs.collectives

    def checked(stack: Tensor) -> Tensor:
        if stack.numel():
            probes.extend(_finiteness_probes(stack))
        return stack

    stacks = [[_stack(ts, batch.dtype) for ts in inputs.neurons[k].params] for k, batch in enumerate(program.neurons)]
    role_gains = [[[_stack(gs, batch.dtype) for gs in role] for role in inputs.neurons[k].gains]
                  for k, batch in enumerate(program.neurons)]
    params: list[Tensor | None] = []
    for batch, tensors in zip(program.tensors, inputs.tensors):
        if batch.params_from is not None:
            params.append(stacks[batch.params_from[0]][batch.params_from[1]])
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
    if torch.compiler.is_compiling():  # the write phase stacks its own views (no copy; none written through)
        params = [None] * len(params)

    # Neuron frames: u from the input side (dependency order), v from the output side (reverse), one
    # round per wave. Eager, one scratch tensor serves every sum of squares (here and in the
    # rebalance); compiled, the sums fuse into their loops and a scratch tensor passed between the
    # phases would be copied back.
    sizes: dict[torch.dtype, int] = {}
    for batch, role_stacks in zip(program.neurons, stacks):
        sizes[batch.dtype] = max([sizes.get(batch.dtype, 0), *(s.numel() for s in role_stacks)])
    workspace = {} if torch.compiler.is_compiling() else \
        {dtype: torch.empty(size, dtype=dtype, device=stacks[0][0].device) for dtype, size in sizes.items()}
    grads = [checked(_stack(tensors.grads, batch.dtype)) for batch, tensors in zip(program.tensors, inputs.tensors)]

    forward: list[Tensor | None] = [None] * len(program.neurons)
    backward: list[Tensor | None] = [None] * len(program.neurons)
    for wave, (ahead, behind) in enumerate(_waves(program)):
        parts = [_role_squares(program, k, 1, stacks[k], role_gains[k], forward, role_means[k],
                               workspace.get(program.neurons[k].dtype)) for k in ahead]
        parts += [_role_squares(program, k, -1, stacks[k], role_gains[k], backward, role_means[k],
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
    norm_dead, scale_inputs, dead_flags = [], [], [d.any() for d in neuron_dead]
    for batch, norm in zip(program.norms, inputs.norms):
        gains, gain_grads = _stack(norm.gains, batch.dtype), checked(_stack(norm.gain_grads, batch.dtype))
        dead = frozen_gains(gains)
        dead_flags.append(dead.any())
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
        for axis, side, kind, source in batch.scaled:
            if kind == "norm":
                scale = _stack(tensors.gains[gain_count], batch.dtype)
                gain_count += 1
                off = frozen_gains(scale)
            else:
                scale, off = scales[source], neuron_dead[source]
            dead_flags.append(off.any())
            gamma = torch.where(off, 0.0, scale if side > 0 else scale.reciprocal())
            factors.append(_on_axis(gamma, axis, ndim, batch.shard))
            dead.append(_on_axis(off, axis, ndim, batch.shard))
        gammas.append(factors)
        deads.append(dead)
    for ts in inputs.checked:
        checked(_stack(ts, ts[0].dtype))
    finite = torch.stack(probes).isfinite().all() if probes else torch.ones((), dtype=torch.bool)
    some_dead = torch.stack(dead_flags).any() if dead_flags else torch.zeros((), dtype=torch.bool)
    outgoing_zero = [v == 0 for v in backward]
    return ReadOut(grads, params, means, gammas, deads, scales, sections, neuron_dead, outgoing_zero, role_gains,
                   norm_dead, scale_inputs, workspace, torch.stack([finite, some_dead]))


# --------------------------------------------------------------------------------------------------
# The write phase
# --------------------------------------------------------------------------------------------------


class _Held(NamedTuple):
    """An isolated pair's batch waiting for its side's factor: the new values (horizontal part), mean
    row and per-unit sums of squares (this rank's part on a shard)."""

    batch: int
    value: Tensor
    mean: Tensor | None
    after: Tensor


class _ChannelTable(NamedTuple):
    """The channel-scale steps of the norm batches of one width, stacked in program order, then a row
    for consumers whose norm takes no step: ``log_factor = -lr_g r`` per channel (0 in that row) and
    the rate ``lr_g`` of each row's gain (0 in that row)."""

    log_factor: Tensor
    rate: Tensor

    def factors(self, rows: Tensor, rate: Tensor) -> Tensor:
        """The factors ``exp(-min(lr_g, lr_c) r)`` of the channels of table ``rows`` for a consumer
        stepped at rate ``lr_c = rate``: the channel step moves no consumer faster than its own group's
        rate, nor at more than the gain's (a group with lr 0 stays where it is on either side)."""
        gain_rate = self.rate.index_select(0, rows)
        ratio = torch.where(gain_rate > 0, torch.clamp(rate / gain_rate, max=1.0), 0.0)
        return torch.exp(self.log_factor.index_select(0, rows) * ratio[:, None])


def _channel_tables(program: StepProgram, inputs: StepTensors, read: ReadOut) -> dict[int, _ChannelTable]:
    """Per channel width, the :class:`_ChannelTable` of the norm batches of that width: ``r`` is
    Adam's direction for the invariant ``h``, with the gains' group settings (each rank steps the
    channels of its rows of the gains)."""
    rows: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for n, (batch, norm) in enumerate(zip(program.norms, inputs.norms)):
        norm.state["step"].add_(1)
        r = adam_direction_(read.scale_inputs[n], norm.state["scale_exp_avg"], norm.state["scale_exp_avg_sq"],
                            norm.scalars[1:3], norm.scalars[3:])
        log_factor = r.mul_(-norm.scalars[0]).masked_fill_(read.norm_dead[n], 0.0)
        rows.setdefault(batch.units, []).append((global_units(log_factor, 0, batch.shard),
                                                 norm.scalars[0].expand(batch.members)))
    # on shards each rank has its channels' log-factors at their places, zeros elsewhere: one round
    summed = iter(inputs.collectives.sum([log_factor for parts in rows.values() for log_factor, _ in parts]))
    tables = {}
    for width, parts in rows.items():
        logs = [next(summed) for _ in parts]
        tables[width] = _ChannelTable(torch.cat([*logs, torch.zeros_like(logs[0][:1])]),
                                      torch.cat([*(rate for _, rate in parts), torch.zeros_like(parts[0][1][:1])]))
    return tables


def _is_view(batch: TensorBatch, stacked: Tensor) -> bool:
    """Whether a batch's stacked parameters are a view of its single member (writing them writes it)."""
    return batch.members == 1 and stacked.dtype == batch.param_dtype


def _finish(batch: TensorBatch, tensors: TensorInputs, old: Tensor, value: Tensor, mean: Tensor | None,
            restore: Tensor | None) -> None:
    """Add the held mean row back, restore ``restore`` (dead) entries from ``old``, and write."""
    if mean is not None:
        value = value.add_(mean)
    if restore is not None:
        value = torch.where(restore, old, value)
    if not (value is old and _is_view(batch, old)):
        torch._foreach_copy_(tensors.params, list(value.unbind(0)))


def canonical_gradient(batch: TensorBatch, grad: Tensor, gammas: list[Tensor]) -> Tensor:
    """``G gamma``, in the step's own memory (the rule may overwrite it): ``grad`` itself when it is a
    stacked copy, a new tensor when it is a view of the user's gradient. A translated batch's
    canonical gradient is this less its mean row (:func:`canonical_gradients`)."""
    owned = batch.members > 1 or batch.dtype != batch.param_dtype
    canonical = grad
    for gamma in gammas:
        canonical = canonical.mul_(gamma) if owned else canonical * gamma
        owned = True
    return canonical if owned else canonical.clone()


def canonical_gradients(program: StepProgram, read: ReadOut, batches: Sequence[int],
                        collectives: Collectives = LOCAL) -> list[Tensor]:
    """``G~ = P(G gamma)`` of tensor batches ``batches`` (``P``: less the mean row, for translated
    batches; their row sums are one reduction round on shards)."""
    canonical = [canonical_gradient(program.tensors[b], read.grads[b], read.gammas[b]) for b in batches]
    centred = [i for i, b in enumerate(batches) if program.tensors[b].centered]
    means = collectives.sum([_row_mean_part(canonical[i], program.tensors[batches[i]].shard) for i in centred])
    for i, mean in zip(centred, means):
        canonical[i] = canonical[i].sub_(mean)
    return canonical


def write_phase(program: StepProgram, inputs: StepTensors, read: ReadOut, masked: bool, compiled: bool = False
                ) -> None:
    """The writing half of a step (module docstring). ``masked``: some unit or channel is dead (the
    read phase's flag), so dead entries are kept exactly as they are. ``compiled``: run its parts
    (the update with the isolated pairs' factors, their application) as compiled graphs; they are
    separate because inductor's CPU loop fusion fails on the write-after-read hazards of one."""
    run = compiled_phase if compiled else (lambda phase: phase)
    held, factors = run(_update)(program, inputs, read, masked=masked)
    if held:
        run(_rebalance)(program, inputs, read, held, factors, masked=masked)


def _old_values(batch: TensorBatch, tensors: TensorInputs, read: ReadOut, b: int) -> Tensor:
    """A stacked batch's parameters before the step (compute dtype)."""
    return read.params[b] if read.params[b] is not None else _stack(tensors.params, batch.dtype)


def _update(program: StepProgram, inputs: StepTensors, read: ReadOut, masked: bool
            ) -> tuple[list[_Held], dict[int, dict[int, Tensor]]]:
    """Channel-scale steps, rule directions and lifts; every batch written except the isolated pairs',
    whose new values are returned with their factors (:func:`_pair_factors`, from sums taken in the
    same pass)."""
    collectives = inputs.collectives
    tables = _channel_tables(program, inputs, read)
    centred = [b for b, batch in enumerate(program.tensors) if batch.centered]
    centred_gradients = dict(zip(centred, canonical_gradients(program, read, centred, collectives)))
    held: list[_Held] = []
    for b, (batch, tensors) in enumerate(zip(program.tensors, inputs.tensors)):
        ndim, members = len(batch.shape), batch.members
        lr, decay = tensors.scalars[:2].unbind(0)
        if "step" in tensors.state:
            tensors.state["step"].add_(1)
        canonical = centred_gradients.pop(b) if batch.centered else \
            canonical_gradient(batch, read.grads[b], read.gammas[b])
        if batch.rule_shape is not None:  # the rule steps the parameter as it is (Muon: its own matrix)
            canonical = canonical.reshape(members, *batch.rule_shape)
        direction = batch.rule.direction(canonical, tensors.state, tensors.scalars[2:], batch.residual, collectives)
        if batch.rule_shape is not None:
            direction = direction.reshape(members, *batch.shape)
        if batch.centered:  # the horizontal part of the direction (one reduction round on shards)
            (mean,) = collectives.sum([_row_mean_part(direction, batch.shard)])
            direction = direction.sub_(mean)
        factors = list(read.gammas[b])
        if batch.channel >= 0:
            e = _on_axis(tables[batch.shape[batch.channel]].factors(tensors.channel, lr), batch.channel, ndim,
                         batch.shard)
            factors.append(e)
            decay = decay * e
        dead = functools.reduce(torch.logical_or, read.dead[b]) if masked and read.dead[b] else None
        if dead is not None:
            decay = torch.where(dead, 1.0, decay)  # the lift is 0 there: dead entries stay as they are
        lift = factors[-1] * lr if factors else lr
        for factor in factors[:-1]:
            direction = direction.mul_(factor)
        if not batch.stacked:
            torch._foreach_mul_(tensors.params, decay if decay.dim() == 0 else _members(decay, members))
            torch._foreach_addcmul_(tensors.params, list(direction.unbind(0)), _members(lift, members), value=-1)
            continue
        old = _old_values(batch, tensors, read, b)
        # a new tensor where the old values are needed again, or when compiling (writing through a view
        # of an input is copied back whole there; the new values are copied into the parameters anyway)
        keep_old = (dead is not None and (batch.centered or batch.rebalance is not None)) or torch.compiler.is_compiling()
        mean = read.means[b]
        if mean is not None and batch.rebalance is None:
            # old - (1 - decay)(old - mean) - lr D gamma: the mean row held, and exactly old at lr 0
            value = torch.addcmul(old, old - mean, 1 - decay, value=-1)
        elif mean is not None:  # a pair's centred role: its horizontal part, which the pair factor scales
            value = (old - mean).mul_(decay)
        else:
            value = old * decay if keep_old else old.mul_(decay)
        value = value.addcmul_(direction, lift, value=-1)
        if batch.rebalance is not None:  # with the sums of squares after the lift, in the same pass
            held.append(_Held(b, value, mean, _role_square_sums(program, read, *batch.rebalance, value)))
        else:
            _finish(batch, tensors, old, value, None, dead if keep_old else None)
    factors = _pair_factors(program, read, held, collectives) if held else {}
    return held, factors


def _role_square_sums(program: StepProgram, read: ReadOut, n: int, r: int, value: Tensor) -> Tensor:
    """Per unit of isolated neuron batch ``n``, the sum of squares of role ``r``'s slices of ``value``,
    merged with their norm gains (an isolated pair links to no other neuron batch); on a row shard,
    this rank's part at the units' global positions."""
    batch, role = program.neurons[n], program.neurons[n].roles[r]
    factors = _slice_factors(role, read.neuron_gains[n][r], ())
    sums = unit_square_sums(value, role.axis + 1, factors, workspace=read.workspace.get(batch.dtype))
    return global_units(sums, role.axis, role.shard)


def _side_sums(program: StepProgram, n: int, per_role: Mapping[int, Tensor]) -> dict[int, Tensor]:
    """Per side (+1 multiplied, -1 divided) of isolated neuron batch ``n``, the sum of ``per_role``."""
    sums: dict[int, Tensor] = {}
    for r, role in enumerate(program.neurons[n].roles):
        sums[role.side] = per_role[r] if role.side not in sums else sums[role.side] + per_role[r]
    return sums


def _pair_factors(program: StepProgram, read: ReadOut, held: list[_Held], collectives: Collectives = LOCAL
                  ) -> dict[int, dict[int, Tensor]]:
    """Per isolated neuron batch, the per-unit factors of its two sides (``{+1: f_A, -1: f_B}``) that put
    every unit back on the section of its orbit (:func:`~gaugeopt.gauges.unit_section`) at the size
    the step gave it: with ``a``, ``b`` the new canonical norms of the multiplied and divided sides
    (in the frame of the step), ``l'^2 = a b`` and the section point ``(|w~_in|, |w~_out|)`` of ``l'``,

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
    totals = iter(collectives.sum([by_role[(n, r)].after for n in rebalanced
                                   for r in range(len(program.neurons[n].roles))]))
    out: dict[int, dict[int, Tensor]] = {}
    for n in rebalanced:
        (u2, incoming_before), dead = read.sections[n], read.neuron_dead[n]
        after = _side_sums(program, n, {r: next(totals) for r in range(len(program.neurons[n].roles))})
        incoming, _ = unit_section(torch.sqrt(after[1]) * torch.sqrt(after[-1]), program.edge_scale)
        f = torch.sqrt((incoming * u2) / (after[1] * incoming_before))
        f = torch.where(dead | ~torch.isfinite(f), 1.0, f)
        out[n] = {1: f, -1: f.reciprocal()}
    return out


def _rebalance(program: StepProgram, inputs: StepTensors, read: ReadOut, held: list[_Held],
               factors_by_batch: dict[int, dict[int, Tensor]], masked: bool) -> None:
    """Apply the factors of :func:`_pair_factors` to the held values and write them."""
    by_role = {program.tensors[h.batch].rebalance: h for h in held}
    for n, sides in factors_by_batch.items():
        for r, role in enumerate(program.neurons[n].roles):
            h = by_role[(n, r)]
            tensor_batch, tensors = program.tensors[h.batch], inputs.tensors[h.batch]
            factor = _on_axis(sides[role.side], role.axis, len(tensor_batch.shape), tensor_batch.shard)
            dead = functools.reduce(torch.logical_or, read.dead[h.batch]) if masked and read.dead[h.batch] else None
            old = _old_values(tensor_batch, tensors, read, h.batch)
            if h.mean is None and dead is None and not torch.compiler.is_compiling() and \
                    old.dtype == tensor_batch.param_dtype and tensor_batch.members > 1:
                for value, f, p in zip(h.value.unbind(0), factor.unbind(0), tensors.params):
                    torch.mul(value, f, out=p)  # the rebalanced value written straight into the parameter
                continue
            value = h.value * factor if torch.compiler.is_compiling() else h.value.mul_(factor)
            _finish(tensor_batch, tensors, old, value, h.mean, dead)


# --------------------------------------------------------------------------------------------------
# Compiling the phases
# --------------------------------------------------------------------------------------------------


class _CompiledPhase:
    """``torch.compile`` of a phase, per program (and flag) a function with a code object of its own,
    so each gets its own graph cache (torch keeps at most ``recompile_limit`` graphs per code object,
    past which it runs the function eagerly). A phase has no graph break, so the whole phase is one
    graph in that cache. Graphs are compiled for static shapes; the numbers a scheduler changes are
    tensor inputs, so a new learning rate or beta does not recompile."""

    def __init__(self, phase: Callable):
        self.phase = phase
        self.kernels: dict[Any, Callable] = {}
        self._last: tuple[StepProgram, tuple, Callable] | None = None  # spares hashing the program each step
        functools.update_wrapper(self, phase)

    def __call__(self, program: StepProgram, *args: Any, **flags: Any):
        key = tuple(sorted(flags.items()))
        if self._last is not None and self._last[0] is program and self._last[1] == key:
            return self._last[2](*args, **flags)
        kernel = self.kernels.get((program, key))
        if kernel is None:
            kernel = self.kernels[(program, key)] = torch.compile(_bound(self.phase, program), dynamic=False)
        self._last = (program, key, kernel)
        return kernel(*args, **flags)


def _bound(phase: Callable, program: StepProgram) -> Callable:
    """``phase`` with ``program`` bound, as a function with a code object of its own: torch keys its
    graph caches (and their recompile limit) on the code object of the function it compiles, so every
    program gets a cache. (A ``functools.partial`` would be compiled through one shared wrapper.)"""
    def bound(*args: Any, **flags: Any):
        return phase(program, *args, **flags)
    return types.FunctionType(bound.__code__.replace(), bound.__globals__, f"{phase.__name__}_bound", None,
                              bound.__closure__)


@functools.cache
def compiled_phase(phase: Callable) -> Callable:
    """``phase`` (:func:`read_phase`, or a part of :func:`write_phase`) compiled by ``torch.compile``."""
    return _CompiledPhase(phase)


# --------------------------------------------------------------------------------------------------
# Stacked state
# --------------------------------------------------------------------------------------------------


class StackedState:
    """A batch's rule state as stacked buffers whose slices are the members' entries in the
    optimizer's ``state``: the buffers are what the write phase updates, and ``state[p][key]`` stays
    the parameter's own tensor (a view), so ``state_dict``, checkpoints and schedulers see ordinary
    state. The members' step counts are mirrored on the host, so the bias corrections of a step are
    host numbers, not device work; the mirror is read again whenever the count tensors were written
    by anyone but the step (their version counter moved: ``load_state_dict``,
    ``torch.distributed.checkpoint`` loading in place).

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


# --------------------------------------------------------------------------------------------------
# Building the program from param groups
# --------------------------------------------------------------------------------------------------


def _is_active(p: Tensor) -> bool:
    return p.grad is not None and p.requires_grad


def _roles(f: ScalingFrame) -> list[tuple[Any, int]]:
    """A neuron family's tensors in role order: multiplied refs (side +1), then divided (side -1)."""
    return [(r, 1) for r in f.multiplied] + [(r, -1) for r in f.divided]


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


@dataclass
class StepLayout:
    """A :class:`StepProgram` with the tensors it steps: :meth:`inputs` lays out a step's
    :class:`StepTensors`, :meth:`for_writing` adds the state and this step's numbers."""

    program: StepProgram
    tensor_params: list[list[Tensor]]
    tensor_groups: list[int]
    tensor_gains: list[list[list[str]]]  # per batch, per norm-scaled axis, the members' gain names
    tensor_channels: list[Tensor | None]  # per batch, each member's row in the channel-factor table
    norm_families: list[list[ScalingFrame]]
    norm_groups: list[int]
    neuron_families: list[list[str]]  # per batch, the families' names
    neuron_roles: list[list[list[str]]]  # per batch, per role, the members' tensor names
    neuron_gains: list[list[list[list[str]]]]  # per batch, per role, per gain factor, the members' gains
    checked: list[list[Tensor]]
    views: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # name -> frame shape, where not its own
    norm_gains: list[list[Tensor]] = field(default_factory=list)  # per norm batch, the gain parameters

    def inputs(self, lookup: Mapping[str, Tensor], whole: Mapping[str, Tensor] = {},
               collectives: Collectives = LOCAL) -> StepTensors:
        """This step's parameters, gradients and gains (``lookup``: name -> tensor to read), each
        parameter and gradient in its batch's frame shape (a view where that is not its own). On
        row shards every tensor is this rank's rows, but the norm gains read as frames, which are
        ``whole[name]``, and ``collectives`` sums over the ranks."""
        program = self.program

        def framed(ts: list[Tensor], shape: tuple[int, ...]) -> list[Tensor]:
            ts = [local_tensor(t) for t in ts]
            return [t if t.shape == shape else t.view(shape) for t in ts]

        def read(name: str) -> Tensor:
            t = local_tensor(lookup[name])
            return t if name not in self.views else t.view(self.views[name])

        def gain(name: str) -> Tensor:
            return whole[name] if name in whole else lookup[name]

        def grads(ts: list[Tensor]) -> list[Tensor]:
            return [local_tensor(t.grad) for t in ts]

        tensors = [TensorInputs(framed(params, program.tensors[b].shape),
                                framed([p.grad for p in params], program.tensors[b].shape),
                                [[gain(n) for n in names] for names in self.tensor_gains[b]],
                                self.tensor_channels[b], {}, None)
                   for b, params in enumerate(self.tensor_params)]
        norms = []
        for batch, families in zip(program.norms, self.norm_families):
            gains = [lookup[f.gain] for f in families]
            biases = [lookup[f.bias] for f in families] if batch.bias else []
            norms.append(NormInputs([gain(f.gain) for f in families], grads(gains),
                                    [local_tensor(b) for b in biases], grads(biases), {}, None))
        neurons = [NeuronInputs([[read(n) for n in names] for names in self.neuron_roles[k]],
                                [[[gain(n) for n in gains] for gains in role] for role in self.neuron_gains[k]])
                   for k in range(len(program.neurons))]
        return StepTensors(tensors, norms, neurons, [grads(ps) for ps in self.checked], collectives)

    def for_writing(self, inputs: StepTensors, groups: Sequence[Mapping[str, Any]], state: Mapping,
                    stacked: StackedState) -> StepTensors:
        """``inputs`` with every batch's state buffers (made, or stacked again, where needed) and this
        step's numbers: ``lr, 1 - lr weight_decay`` and the rule's scalars (norm batches: ``lr`` and
        the channel Adam's), as tensors in the batch's compute dtype on its device."""
        tensors = []
        for b, (batch, t) in enumerate(zip(self.program.tensors, inputs.tensors)):
            # state is kept per parameter (the layout's own tensors, not the frame views) in its own shape
            buffers = stacked.buffers(state, ("tensor", b), self.tensor_params[b], batch.rule.state_keys)
            steps = stacked.advance(("tensor", b)) if "step" in buffers else []
            group = groups[self.tensor_groups[b]]
            lr = float(group["lr"])
            values = [lr, 1 - lr * float(group["weight_decay"]), *batch.rule.scalars(group, steps)]
            scalars = torch.tensor(values, dtype=batch.dtype, device=t.params[0].device)
            tensors.append(t._replace(state=buffers, scalars=scalars))
        norms = []
        for n, (batch, t) in enumerate(zip(self.program.norms, inputs.norms)):
            buffers = stacked.buffers(state, ("norm", n), self.norm_gains[n], CHANNEL_STATE)
            group = groups[self.norm_groups[n]]
            values = [float(group["lr"]), *CHANNEL_ADAM.scalars(group, stacked.advance(("norm", n)))]
            norms.append(t._replace(state=buffers, scalars=torch.tensor(values, dtype=batch.dtype,
                                                                        device=t.gains[0].device)))
        return inputs._replace(tensors=tensors, norms=norms)


def build_program(groups: Sequence[Mapping[str, Any]], names: Mapping[int, str], lookup: Mapping[str, Tensor],
                  plan: FramePlan, rules: Sequence[Rule], *, channel_step: bool, edge_scale: float,
                  stack: bool = True, ranks: tuple[int, int] | None = None) -> StepLayout:
    """Sort the parameters with gradients into batches (module docstring).

    ``names`` maps ``id(parameter)`` to its name in ``plan``'s model (parameters without a name have no
    frame); ``lookup`` maps names to the tensors frames read (the model's parameters or stand-ins);
    ``rules[g]`` is group ``g``'s base rule; ``channel_step`` enables the norm channel-scale step;
    ``edge_scale`` is the section constant ``c`` of the neuron frames.
    ``stack=False`` makes every batch a single tensor (a single family): what a compiled step wants,
    since ``torch.compile`` fuses each tensor's chain of elementwise maps into one loop when it does
    not have to materialise a stack first (the eager step stacks to dispatch fewer operations).
    ``ranks``: ``(rank, world)`` when every tensor is sharded on dim 0 over ``world`` ranks (FSDP2):
    the program then steps this rank's rows (:class:`~gaugeopt.optim.shards.RowShard`).
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
    return StepLayout(program, [m for _, m in tensor.batches], tensor.groups, tensor.gains, tensor.channels,
                      [fs for _, fs in norm.batches], norm.groups, neuron.families, neuron.roles, neuron.gains,
                      tensor.checked, views, [[lookup[f.gain] for f in fs] for _, fs in norm.batches])


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
    families: list[list[str]]
    roles: list[list[list[str]]]
    gains: list[list[list[list[str]]]]
    batch_of: dict[str, int]  # family -> batch
    role_of: dict[str, tuple[int, int]]  # tensor of an isolated family -> (batch, role)
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
    out = _Neurons([], [], [], [], batch_of, {}, set())
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
                if scaled.kind == "norm":
                    factors.append((axis, "gain", -1))
                    gains.append([plan.scalings[plan.frame(n).scale_on(axis).family].gain for n in names])
                else:
                    factors.append((axis, "u" if side > 0 else "v", batch_of[scaled.family]))
            roles.append(NeuronRole(ref.axis, side, tuple(factors), frame.centered and ref.axis != 0,
                                    shards(ref.name, lookup[ref.name]).shard))
            role_names.append(names)
            role_gains.append(gains)
        rebalance = first.isolated and all(active.get(n, False) for names in role_names for n in names)
        out.batches.append(NeuronBatch(len(families), first.units, compute_dtype(lookup[first.members[0]]),
                                       tuple(roles), rebalance))
        out.families.append([f.name for f in families])
        out.roles.append(role_names)
        out.gains.append(role_gains)
        for r, names in enumerate(role_names):
            for name in names:
                if first.isolated:
                    out.role_of[name] = (k, r)
                else:
                    out.chain_members.add(name)
    return out


@dataclass
class _Norms:
    batches: list[tuple[NormBatch, list[ScalingFrame]]]
    groups: list[int]
    row: dict[str, int]  # norm family -> its row in the channel-factor table of its width
    rows: dict[int, int]  # width -> rows of that table before its row of ones


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
    out = _Norms([], [], {}, {})
    for (units, dtype, _, group, bias, _), families in sorted_.items():
        shard = RowShard.of(units, *ranks) if ranks is not None else None
        out.batches.append((NormBatch(len(families), units, compute_dtype(lookup[families[0].gain]), bias, shard),
                            families))
        out.groups.append(group)
        for f in families:
            out.row[f.name] = out.rows.get(units, 0)
            out.rows[units] = out.row[f.name] + 1
    return out


@dataclass
class _Tensors:
    batches: list[tuple[TensorBatch, list[Tensor]]]
    groups: list[int]
    gains: list[list[list[str]]]
    channels: list[Tensor | None]
    checked: list[list[Tensor]]


def _sort_tensors(groups: Sequence[Mapping[str, Any]], names: Mapping[int, str], plan: FramePlan,
                  rules: Sequence[Rule], neuron: _Neurons, norm: _Norms, stack: bool,
                  shards: Callable[[str | None, Tensor], _Shapes]) -> _Tensors:
    """Parameters with gradients into batches: pair roles by their neuron batch (in its member
    order), chain members one by one, the rest by group, frame and shape. Gains are frames, never
    stepped: their gradients are only checked, or read by the channel-scale step."""
    stepped_gains = {f.gain for _, families in norm.batches for f in families}
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
                key = ("role", *neuron.role_of[name])
            elif name in neuron.chain_members:
                key = ("single", name)
            else:
                key = ("batch", g, frame.signature() if frame is not None else (), tuple(p.shape), p.dtype, p.device,
                       None if stack else id(p))
            sorted_.setdefault(key, []).append((name, p, g))
    out = _Tensors([], [], [], [], list(checked.values()))
    for key, members in sorted_.items():
        if key[0] == "role":
            order = {n: i for i, n in enumerate(neuron.roles[key[1]][key[2]])}
            members.sort(key=lambda member: order[member[0]])
        member_names = [n for n, _, _ in members]
        params = [p for _, p, _ in members]
        first, group = params[0], members[0][2]
        frame = plan.frame(member_names[0]) if member_names[0] is not None else None
        scaled, gains, channel, channel_index = [], [], -1, None
        for axis, action in (frame.scaled if frame is not None else ()):
            if action.kind == "neuron":
                scaled.append((axis, action.side, "neuron", neuron.batch_of[action.family]))
                continue
            scaled.append((axis, action.side, "norm", -1))
            families = [plan.frame(n).scale_on(axis).family for n in member_names]
            gains.append([plan.scalings[f].gain for f in families])
            if action.side < 0 and any(f in norm.row for f in families):
                rows = [norm.row.get(f, norm.rows[first.shape[axis]]) for f in families]
                channel, channel_index = axis, torch.tensor(rows, device=first.device)
        role = (key[1], key[2]) if key[0] == "role" else None
        rebalance = role if role is not None and neuron.batches[role[0]].rebalance else None
        centered = frame is not None and frame.centered
        dtype = compute_dtype(first)
        stacked = centered or rebalance is not None or dtype != first.dtype
        shapes = shards(member_names[0], first)
        residual = Residual(frame.shared, frame.heads, shapes.own_shard) if frame is not None \
            else Residual(rows=shapes.own_shard)
        batch = TensorBatch(len(params), shapes.frame, dtype, first.dtype, rules[group], tuple(scaled),
                            channel, centered, residual, stacked, rebalance, role if stacked else None,
                            shapes.own if shapes.frame != shapes.own else None, shapes.shard)
        out.batches.append((batch, params))
        out.groups.append(group)
        out.gains.append(gains)
        out.channels.append(channel_index)
    return out
