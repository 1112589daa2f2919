"""The vocabulary the frames, the rules and the step share: sides, scalings, blocks of an axis.

A gauge family acts on an axis of a parameter in one of three ways, and what it leaves for a base
rule to respect is a residual symmetry:

* a positive diagonal **scaling** (:class:`Scaling`: a norm's gain or a neuron's scale) multiplies the
  slices of the axis on one :class:`Side` and divides them on the other;
* a **translation** moves every slice along axis 0 by one vector: the horizontal part
  (:func:`center_rows`) is what the rule sees;
* a **rotation** mixes the indices of each block of an axis (:class:`SharedAxis`); the rule must
  commute with it (:class:`Residual`), e.g. by sharing Adam's second moments over each block
  (:func:`group_mean`).

Everything here is a pure function of tensors or a frozen record; nothing depends on the optimizer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .shards import RowShard

__all__ = ["Side", "Scaling", "SharedAxis", "Residual", "block_layout", "blocked", "group_mean", "center_rows"]


class Side(enum.IntEnum):
    """The side of a positive diagonal scaling ``a`` that a tensor's axis is on: its slices are
    multiplied (``+1``: a unit's incoming weights) or divided (``-1``: its outgoing weights) by ``a``.
    As a number it is the exponent: the frame factor of an axis on side ``sigma`` is ``s^sigma``."""

    MULTIPLIED = 1
    DIVIDED = -1

    @property
    def other(self) -> Side:
        return Side(-self)


class Scaling(str, enum.Enum):
    """Which family provides a scaled axis's frame: a norm (the gain itself) or neuron units (the
    scales ``s`` of :func:`~gaugeopt.optim.frames.neuron_frames`)."""

    NORM = "norm"
    NEURON = "neuron"


@dataclass(frozen=True)
class SharedAxis:
    """A residual orthogonal symmetry: orthogonal maps mix the indices of each block of one axis
    (``groups[i]`` = block of index i; indices no rotation touches are their own block).
    ``layout`` is :func:`block_layout` of the groups when they are regular blocks."""

    family: str
    groups: tuple[int, ...]
    layout: tuple[int, int, int] | None


class Residual(NamedTuple):
    """The orthogonal symmetry a frame leaves on a batch's canonical tensors (member axes, without
    the stacking axis): ``shared`` blocks per axis; ``heads``: ``(axis, index)`` with ``index[h]`` the
    indices of attention head ``h`` (for head-wise orthogonalisation). ``rows``: the rows (member axis
    0) of the tensors the rule sees that this rank holds, when they are a row shard."""

    shared: tuple[tuple[int, SharedAxis], ...] = ()
    heads: tuple[int, tuple[tuple[int, ...], ...]] | None = None
    rows: RowShard | None = None


def block_layout(groups: Tensor) -> tuple[int, int, int] | None:
    """``(outer, block, inner)`` when the groups are regular blocks of one axis, else ``None``.

    Regular means: with the axis viewed as ``(outer, block, inner)`` (index
    ``i = (o * block + b) * inner + c``), the group of ``i`` depends on ``(o, c)`` only and differs for
    every ``(o, c)``; each group is then the ``block`` indices along the middle axis. Contiguous head
    blocks are ``(heads, head_dim, 1)``; RoPE planes ``(i, i + half)`` in each head are
    ``(heads, 2, half)``. Found by trying every factorisation (once, when the plan is built).
    """
    n = groups.numel()
    if n == 0:
        return None
    n_groups = int(torch.unique(groups).numel())
    if n % n_groups:
        return None
    block = n // n_groups
    for inner in (d for d in range(1, n // block + 1) if (n // block) % d == 0):
        view = groups.reshape(n // (block * inner), block, inner)
        if torch.equal(view, view[:, :1].expand_as(view)) and torch.unique(view[:, 0]).numel() == n_groups:
            return n // (block * inner), block, inner
    return None


def blocked(t: Tensor, shared: SharedAxis, axis: int) -> Tensor:
    """``t`` viewed with ``axis`` split into the regular layout ``(outer, block, inner)`` of ``shared``
    (``shared.layout`` must be set): the indices of one block then run along ``axis + 1``."""
    return t.view(*t.shape[:axis], *shared.layout, *t.shape[axis + 1:])


def group_mean(values: Tensor, shared: SharedAxis, axis: int) -> Tensor:
    """Every entry replaced by the mean over its block of ``shared`` along ``axis`` (a reshape and a
    mean for a regular :func:`block_layout`, a scatter otherwise)."""
    if shared.layout is not None:
        means = blocked(values.contiguous(), shared, axis).mean(dim=axis + 1, keepdim=True)
        return means.expand(*values.shape[:axis], *shared.layout, *values.shape[axis + 1:]).reshape(values.shape)
    groups = torch.tensor(shared.groups, device=values.device)
    moved = values.movedim(axis, 0)
    sums = moved.new_zeros(moved.shape).index_add_(0, groups, moved)
    counts = moved.new_zeros(moved.shape[0]).index_add_(0, groups, torch.ones_like(groups, dtype=moved.dtype))
    means = sums / counts.clamp_min(1).reshape(-1, *([1] * (moved.dim() - 1)))
    return means[groups].movedim(0, axis)


def center_rows(t: Tensor, axis: int = -2) -> Tensor:
    """The horizontal part ``t - 1 mean(t)^T`` over ``axis`` (the translated axis)."""
    return t - t.mean(dim=axis, keepdim=True)
