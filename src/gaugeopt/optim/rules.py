"""Base rules: the optimizers' updates on canonical tensors, written once and shared by every path.

A *rule* turns a stack of canonical gradients ``G~`` (shape ``(L, *shape)``: ``L`` same-shape tensors
stepped together) and its state into a canonical *direction* ``D``; the step around it is the same for
every rule (:mod:`gaugeopt.optim.step`)::

    p~ <- (1 - lr wd) p~ - lr D          (decoupled weight decay, in the frame)

A *map* (:mod:`gaugeopt.optim.layerwise`) is not a rule: it is a stateless matrix function ``Phi`` that
the rule :class:`MomentumMap` applies to the momentum (and :class:`Muon` its own, the ``muon`` map).

Rules are small frozen objects whose settings are static structure. The numbers a step needs that a
scheduler may change (betas, momentum, eps) and those that depend on the step count (Adam's bias
corrections) are computed on the host by :meth:`Rule.scalars` and reach :meth:`Rule.direction` as
one tensor, so a compiled step never recompiles for a new value. Every rule is equivariant under
coordinate permutations; a frame may leave a residual orthogonal symmetry on blocks of an axis
(:class:`~gaugeopt.optim.symmetry.Residual`), which a rule must respect: :class:`Adam` shares its second moments over each
block, :class:`Muon` commutes with it (Newton-Schulz is equivariant under orthogonal maps).

* :class:`Adam`: ``m <- b1 m + (1 - b1) G~``, ``v <- b2 v + (1 - b2) S(G~ * G~)``, with every entry of
  ``G~`` clipped to :func:`square_safe` (1.8e16 in float32) by the step so that neither moment overflows;
  ``D = (m / c1) / (sqrt(v / c2) + eps)`` with ``c_k = 1 - b_k^t``; ``S`` averages over the blocks of
  the residual symmetry (the identity without one).
* :class:`Muon`: ``B <- mu B + (1 - mu) G~``, ``U = (1 - mu) G~ + mu B`` (nesterov) or ``B``,
  ``D = s NS(U)`` (:func:`~gaugeopt.optim.layerwise.muon_update`: Newton-Schulz per matrix or per
  head block, times the shape factor ``s``, which the step applies with the learning rate:
  :meth:`Rule.rate_factor`).
* :class:`MomentumMap`: ``B <- beta B + (1 - beta) G~``, ``D = Phi(B)`` (or of the nesterov mix) for a
  symmetry-compatible map ``Phi`` of :data:`gaugeopt.optim.layerwise.MAPS`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from .layerwise import apply_map, get_map, muon_lr_scale, muon_update
from .matrix_functions import MUON_NS_COEFFICIENTS, Quintic
from .shards import LOCAL, Collectives, RowShard
from .symmetry import Residual, SharedAxis, blocked, group_mean

__all__ = ["Rule", "Adam", "AdamScalars", "Muon", "MomentumMap", "adam_scalars", "adam_direction_", "shared_row_mean",
           "square_safe"]


class Rule(Protocol):
    """What the batched step asks of a base rule."""

    #: Names of the per-parameter state tensors the rule keeps (each shaped like the parameter,
    #: except ``"step"``: a 0-d count the step increments).
    state_keys: tuple[str, ...]
    #: Whether the direction is made of matrix products (Newton-Schulz): a compiled step stacks such
    #: a batch across layers too, one batched product per shape, where it leaves an elementwise
    #: rule's tensors to inductor one by one (their chains fuse into one loop each).
    matrix_products: bool

    def scalars(self, group: Mapping[str, Any], steps: Sequence[int]) -> Sequence[Any]:
        """The host-side numbers of this step for a batch whose members reach step counts ``steps``:
        a sequence (a named tuple, for a reader) of numbers or of per-member lists of numbers."""

    #: Whether an eager step may hand :meth:`direction` the members' canonical gradients as a list
    #: (its passes over them are elementwise until it stacks them itself, into the dtype its matrix
    #: products run in) instead of a stack in the step's compute dtype.
    member_gradients: bool

    def rate_factor(self, shape: tuple[int, ...], residual: Residual) -> float:
        """The factor the step applies to :meth:`direction` with the learning rate, for members of
        ``shape`` (as the rule sees them): Muon's shape factor, 1 for the others."""

    def direction(self, grad: Tensor | list[Tensor], state: Mapping[str, Tensor], scalars: Sequence[Any],
                  residual: Residual, collectives: Collectives = LOCAL) -> Tensor:
        """Advance ``state`` (stacked, in place) on the canonical gradients ``grad`` and return the
        canonical direction, a new stack shaped like ``grad``, in the state's compute dtype or a
        narrower one (:class:`Muon`'s iteration dtype). ``grad`` is the step's own stack, which
        the rule may overwrite, and ``scalars`` is :meth:`scalars` with every number a 0-d tensor and
        every list a 1-d one; or, for a rule with :attr:`member_gradients`, the members' list, which
        the rule only reads, and ``scalars`` is :meth:`scalars` itself (host numbers). On a row shard
        (``residual.rows``) ``grad`` and the state are this rank's rows, and what is not elementwise
        goes through ``collectives`` (:mod:`gaugeopt.optim.shards`)."""


def square_safe(dtype: torch.dtype) -> float:
    """The largest gradient entry whose square, summed over a block of up to 2^20 entries, is finite in
    ``dtype`` (1.8e16 in float32, 1.3e151 in float64). A finite gradient above ``sqrt(max)`` would
    square to inf, and ``v = lerp(v, inf)`` then give ``inf - inf`` on the next step; clipped here,
    ``m`` and ``v`` stay finite and the direction stays about ``sign(G)``."""
    return math.sqrt(torch.finfo(dtype).max / 2**20)


def _per_member(values: Tensor, ndim: int) -> Tensor:
    """``(L,)`` values shaped to broadcast over an ``(L, ...)`` stack with ``ndim`` member dims."""
    return values.reshape(-1, *([1] * ndim))


class AdamScalars(NamedTuple):
    """Adam's numbers for one step of a batch (host floats from :meth:`Adam.scalars`, tensors in the
    step): the moments' weights ``1 - b1`` and ``1 - b2``, and per member the denominator's ``shift``
    ``eps c1`` and ``scale`` ``c1 / sqrt(c2)`` at the member's step ``t`` (``c_k = 1 - b_k^t``), so
    that the direction is ``m / (sqrt(v) scale + shift)``."""

    one_minus_beta1: Any
    one_minus_beta2: Any
    shift: Any
    scale: Any


def adam_scalars(beta1: float, beta2: float, eps: float, steps: Sequence[int]) -> AdamScalars:
    """:class:`AdamScalars` of members at step counts ``steps``."""
    return AdamScalars(1 - beta1, 1 - beta2, [eps * (1 - beta1**t) for t in steps],
                       [(1 - beta1**t) / math.sqrt(1 - beta2**t) for t in steps])


def adam_direction_(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, scalars: AdamScalars,
                    shared: tuple[tuple[int, SharedAxis], ...] = (), rows: RowShard | None = None,
                    collectives: Collectives = LOCAL) -> Tensor:
    """Advance Adam's moments in place and return ``(m / c1) / (sqrt(v / c2) + eps)``.

    ``grad`` must be bounded by :func:`square_safe` (the step clips canonical gradients that are
    not), so that neither moment overflows. All tensors are stacks ``(L, ...)``; ``scalars`` are
    :class:`AdamScalars` as tensors (``shift`` and ``scale`` of length ``L``). With ``shared`` the
    squared gradient is averaged over each block of those (member) axes before it enters ``v``, so
    ``v`` is invariant under the blocks' rotations and the direction rotates with them (on a row
    shard ``rows``, blocks of the row axis cut by a shard boundary are summed over the ranks:
    :func:`shared_row_mean`). ``grad`` is overwritten (it ends up holding the direction, which is
    returned): the step allocates nothing the size of ``grad``.
    """
    ndim = grad.dim() - 1
    exp_avg.lerp_(grad, scalars.one_minus_beta1)
    square = grad.square_()
    if rows is not None and any(axis == 0 for axis, _ in shared):
        for axis, blocks in shared:
            square = shared_row_mean(square, blocks, rows, collectives) if axis == 0 else \
                group_mean(square, blocks, axis + 1)
        exp_avg_sq.lerp_(square, scalars.one_minus_beta2)
    elif len(shared) == 1 and shared[0][1].layout is not None:
        # regular blocks: the block means broadcast into a blocked view of v (nothing the size of v is
        # allocated; compiled, the same loop as the general path). v is then constant over each block,
        # so its denominators are taken once per block and broadcast into the division.
        axis, blocks = shared[0]
        means = blocked(square, blocks, axis + 1).mean(dim=axis + 2, keepdim=True)
        second = blocked(exp_avg_sq, blocks, axis + 1).lerp_(means, scalars.one_minus_beta2)
        shift, scale = (_per_member(t, ndim + 2) for t in (scalars.shift, scalars.scale))
        denominator = torch.addcmul(shift, second.narrow(axis + 2, 0, 1).sqrt(), scale)
        direction = torch.div(blocked(exp_avg, blocks, axis + 1), denominator, out=blocked(grad, blocks, axis + 1))
        return direction.view(grad.shape)
    else:
        for axis, blocks in shared:
            square = group_mean(square, blocks, axis + 1)
        exp_avg_sq.lerp_(square, scalars.one_minus_beta2)
    shift, scale = (_per_member(t, ndim) for t in (scalars.shift, scalars.scale))
    denominator = torch.addcmul(shift, torch.sqrt(exp_avg_sq, out=grad), scale, out=grad)
    return torch.div(exp_avg, denominator, out=denominator)


def shared_row_mean(values: Tensor, blocks: SharedAxis, rows: RowShard, collectives: Collectives) -> Tensor:
    """:func:`~gaugeopt.optim.frames.group_mean` over the row axis (stacked axis 1) of a row shard:
    each block's sum over this rank's rows, the blocks that a shard boundary cuts summed over the
    ranks (one round, only those blocks' sums), divided by the block's size."""
    groups = torch.tensor(blocks.groups).to(values.device, non_blocking=True)
    here = groups[rows.start:rows.stop]
    ids, local = torch.unique(here, return_inverse=True)
    sums = values.new_zeros(values.shape[0], len(ids), *values.shape[2:]).index_add_(1, local, values)
    cut = _cut_blocks(blocks.groups, rows)
    if cut:
        position = {int(g): i for i, g in enumerate(ids.tolist())}
        shared = values.new_zeros(values.shape[0], len(cut), *values.shape[2:])
        mine = [(j, position[g]) for j, g in enumerate(cut) if g in position]
        if mine:
            shared[:, [j for j, _ in mine]] = sums[:, [i for _, i in mine]]
        (shared,) = collectives.sum([shared])
        if mine:
            sums[:, [i for _, i in mine]] = shared[:, [j for j, _ in mine]]
    counts = torch.bincount(groups)[ids].to(values.dtype)
    means = sums / counts.reshape(1, -1, *([1] * (values.dim() - 2)))
    return means.index_select(1, local)


@functools.cache
def _cut_blocks(groups: tuple[int, ...], rows: RowShard) -> list[int]:
    """The blocks whose rows lie on more than one rank (the same list on every rank)."""
    holders: dict[int, set[int]] = {}
    for rank in range(len(rows.bounds) - 1):
        for g in groups[rows.bounds[rank]:rows.bounds[rank + 1]]:
            holders.setdefault(g, set()).add(rank)
    return sorted(g for g, ranks in holders.items() if len(ranks) > 1)


@dataclass(frozen=True)
class Adam:
    """Adam's direction (module docstring); ``betas_key`` and ``eps_key`` name the group settings it
    reads (``"betas"``/``"eps"`` in DDCAdam and DDCMuon's Adam part, ``"adam_betas"``/``"adam_eps"``
    in SymmetryCompatible)."""

    betas_key: str = "betas"
    eps_key: str = "eps"
    state_keys: tuple[str, ...] = ("step", "exp_avg", "exp_avg_sq")
    matrix_products: bool = False
    member_gradients: bool = False  # eager, the fused kernel takes the members (gaugeopt.optim.step)

    def rate_factor(self, shape: tuple[int, ...], residual: Residual) -> float:
        return 1.0

    def scalars(self, group: Mapping[str, Any], steps: Sequence[int]) -> AdamScalars:
        beta1, beta2 = (float(b) for b in group[self.betas_key])
        return adam_scalars(beta1, beta2, float(group[self.eps_key]), steps)

    def direction(self, grad: Tensor, state: Mapping[str, Tensor], scalars: AdamScalars, residual: Residual,
                  collectives: Collectives = LOCAL) -> Tensor:
        return adam_direction_(grad, state["exp_avg"], state["exp_avg_sq"], scalars, residual.shared,
                               residual.rows, collectives)


def _momentum_input(grad: Tensor | list[Tensor], buffer: Tensor, scalars: Sequence[Any], nesterov: bool,
                    dtype: torch.dtype | None = None) -> Tensor:
    """``B <- mu B + (1 - mu) G`` in place; the map's input ``(1 - mu) G + mu B`` (nesterov) or ``B``,
    stacked. ``scalars`` holds ``(1 - mu, mu)``. ``grad`` is a stack (the nesterov input is formed in
    its memory) or the members' list, which is only read: then the nesterov input is stacked into a
    new tensor of ``dtype`` (``None``: ``B``'s), the dtype the map works in, so the conversion is the
    stacking pass itself."""
    if isinstance(grad, Tensor):
        buffer.lerp_(grad, scalars[0])
        return grad.lerp_(buffer, scalars[1]) if nesterov else buffer
    members = list(buffer.unbind(0))
    torch._foreach_lerp_(members, grad, scalars[0])
    if not nesterov:
        return buffer
    return torch.stack(torch._foreach_lerp(grad, members, scalars[1]),
                       out=buffer.new_empty(buffer.shape, dtype=dtype or buffer.dtype))


def _momentum_scalars(momentum: float) -> list[float]:
    return [1 - momentum, momentum]


@dataclass(frozen=True)
class Muon:
    """Momentum, then Newton-Schulz times Muon's shape factor (``torch.optim.Muon``'s update).

    ``head_blocks``: ``None`` (whole matrices), ``"frame"`` (the attention heads of the rotation
    families, from the frame's :class:`Residual`) or an int ``H`` (``H`` equal blocks along
    ``head_axis``, ``"row"`` or ``"col"``). ``block_scale``: the shape factor of a head-wise update
    uses the block's shape (``True``) or the whole matrix's (``False``, as DDCMuon).
    ``ns_coefficients``: one quintic ``(a, b, c)`` or one per step (the optimizers resolve a group's
    setting, a name such as ``"polar_express"`` included, with
    :func:`~gaugeopt.optim.matrix_functions.ns_coefficient_schedule`). ``ns_dtype``: the iteration's
    dtype (``None``: the gradient's). ``momentum_key`` names the group setting: a number, or a pair
    whose first entry is the momentum (DDCMuon's ``betas``).
    ``flatten``: a member of more than two dimensions is orthogonalised as its matricisation
    ``(shape[0], prod(shape[1:]))`` (a conv kernel ``(out, in, *kernel)``, as Keller Jordan's Muon
    does) instead of as a batch of matrices over its leading axes (MoE experts ``(E, rows, cols)``).
    """

    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: tuple[Quintic, ...] | Quintic = MUON_NS_COEFFICIENTS
    ns_eps: float = 1e-7
    ns_dtype: torch.dtype | None = None
    adjust_lr: str = "original"
    head_blocks: str | int | None = None
    head_axis: str = "row"
    block_scale: bool = False
    momentum_key: str = "momentum"
    flatten: bool = False
    state_keys: tuple[str, ...] = ("momentum_buffer",)
    matrix_products: bool = True
    member_gradients: bool = True

    def scalars(self, group: Mapping[str, Any], steps: Sequence[int]) -> list[float]:
        momentum = group[self.momentum_key]
        return _momentum_scalars(float(momentum[0] if isinstance(momentum, (tuple, list)) else momentum))

    def rate_factor(self, shape: tuple[int, ...], residual: Residual) -> float:
        """The shape factor ``s`` of the members' matrices (or head blocks, with ``block_scale``),
        which the step applies with the learning rate; on a row shard 1: there :meth:`direction`
        applies it to the whole matrices itself."""
        if residual.rows is not None:
            return 1.0
        rows, cols = (shape[0], math.prod(shape[1:])) if self.flatten and len(shape) > 2 else tuple(shape[-2:])
        if self.block_scale and self.head_blocks == "frame" and residual.heads is not None:
            on_rows, count = residual.heads[0] == 0, len(residual.heads[1])
        elif self.block_scale and isinstance(self.head_blocks, int):
            on_rows, count = self.head_axis == "row", self.head_blocks
        else:
            on_rows, count = True, 1
        return muon_lr_scale((rows // count, cols) if on_rows else (rows, cols // count), self.adjust_lr)

    def direction(self, grad: Tensor | list[Tensor], state: Mapping[str, Tensor], scalars: Sequence[Any],
                  residual: Residual, collectives: Collectives = LOCAL) -> Tensor:
        """``NS(U)`` in the iteration dtype, the shape factor left to the step (:meth:`rate_factor`),
        so nothing converts or scales the result before the step reads it. The momentum is
        elementwise (this rank's rows on a shard); Newton-Schulz needs whole matrices
        (``collectives.whole``: each gathered to one rank; there the result is scaled and in the
        compute dtype, as each rank reads its rows back). Given the members' list, the nesterov input
        is stacked straight into the iteration dtype."""
        buffer = state["momentum_buffer"]
        update = _momentum_input(grad, buffer, scalars, self.nesterov, self.ns_dtype)
        scratch, shape = update is not buffer, update.shape
        sharded = residual.rows is not None
        out_dtype = buffer.dtype if sharded else (self.ns_dtype or buffer.dtype)
        flat = self.flatten and update.dim() > 3  # (L, rows, *rest): each member as its (rows, prod(rest)) matrix
        matrices = update.reshape(shape[0], shape[1], -1) if flat else update
        direction = collectives.whole(matrices, residual.rows, lambda whole: self.direction_of_matrices(
            whole, residual, out_dtype, scratch, scaled=sharded), out_dtype)
        return direction.reshape(shape) if flat else direction

    def direction_of_matrices(self, update: Tensor, residual: Residual, out_dtype: torch.dtype | None = None,
                              overwrite: bool = False, scaled: bool = True) -> Tensor:
        """``s NS(update)`` (``NS(update)`` unless ``scaled``) per matrix (or per head block) of a
        stack ``(..., rows, cols)``, in ``out_dtype`` (``None``: ``update``'s); ``overwrite``:
        ``update`` is scratch the iteration may start in."""
        options = dict(ns_steps=self.ns_steps, ns_eps=self.ns_eps, ns_coefficients=self.ns_coefficients,
                       adjust_lr=self.adjust_lr if scaled else "none", dtype=self.ns_dtype,
                       block_scale=self.block_scale, out_dtype=out_dtype, overwrite=overwrite)
        if self.head_blocks == "frame" and residual.heads is not None:
            axis, index = residual.heads
            return muon_update(update, head_axis="row" if axis == 0 else "col", head_index=index, **options)
        if isinstance(self.head_blocks, int):
            return muon_update(update, heads=self.head_blocks, head_axis=self.head_axis, **options)
        return muon_update(update, **options)


@dataclass(frozen=True)
class MomentumMap:
    """EMA momentum, then a symmetry-compatible map ``Phi`` of :data:`gaugeopt.optim.layerwise.MAPS`
    (``map`` names it; ``orientation`` and ``options`` are its settings)."""

    map: str
    orientation: str = "row"
    options: tuple[tuple[str, Any], ...] = ()
    nesterov: bool = False
    momentum_key: str = "beta"
    state_keys: tuple[str, ...] = ("momentum_buffer",)
    member_gradients: bool = False

    def rate_factor(self, shape: tuple[int, ...], residual: Residual) -> float:
        return 1.0  # a map's own scale is part of its value

    @property
    def matrix_products(self) -> bool:
        return get_map(self.map).matrix_products

    def scalars(self, group: Mapping[str, Any], steps: Sequence[int]) -> list[float]:
        return _momentum_scalars(float(group[self.momentum_key]))

    def direction(self, grad: Tensor, state: Mapping[str, Tensor], scalars: Tensor, residual: Residual,
                  collectives: Collectives = LOCAL) -> Tensor:
        """The momentum is elementwise; the map is applied to whole matrices (``collectives.whole``)."""
        update = _momentum_input(grad, state["momentum_buffer"], scalars, self.nesterov)
        return collectives.whole(update, residual.rows,
                                 lambda whole: apply_map(self.map, whole, self.orientation, **dict(self.options)))
