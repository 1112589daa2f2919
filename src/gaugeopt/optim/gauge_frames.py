"""Gauge frames: the pure-function core shared by the gauge-equivariant optimizers (ddc.md section 4).

An optimizer is *equivariant* under a gauge group G when training from ``g . theta_0`` gives exactly
``g . theta_t``. The construction here feeds the base optimizer (Adam, Muon) only quantities that
are *invariant* under G, so its state never needs transport, and maps its output back through a
*frame* that transforms with G (a covariant lift). Per family:

* **Norm scale (merge).** A norm gain g is its own frame and stays fixed. Consumer weights are
  worked on as ``W~ = C diag(g)`` with gradient ``G~ = G_C diag(1/g)``, LayerNorm biases as
  ``beta^ = beta / g`` with gradient ``g * G_beta``; all invariant. The lift is ``C = W~ diag(1/g)``,
  ``beta = g * beta^``. Channels with ``|g_j| <= threshold`` are dead: frozen.
* **Translation (center).** ``W -> W + 1 a^T`` (and ``b -> b + c``) leaves the gradient unchanged. The
  mean row is the orbit coordinate and stays fixed: gradients, weight decay and updates act on the
  centered (horizontal) part ``W - 1 mean(W)^T`` only.
* **Rotation (shared second moments).** For an orthogonal R acting on blocks of rows (or columns),
  ``sum_{i in block} (R G)_ij^2`` is invariant. Second moments are averaged over each rotated block
  (per column for row blocks, per row for column blocks); first moments rotate with the gauge, so
  ``m / sqrt(v)`` is covariant.
* **Neuron scale (pair chart).** Unit i couples ``P1`` (producer row and bias, times a_i) with ``P2``
  (consumer columns, divided by a_i). With ``rho_k = |P_k|``, ``h_k = <G_k, P_k>`` and the tangential
  input ``x_k = rho_k G_k - (h_k / rho_k) P_k``, every one of ``h_1, h_2, x_1, x_2`` and the unit
  directions ``P_k / rho_k`` is invariant. The radial mode ``(h_1 + h_2) / sqrt 2`` drives a scalar
  Adam per unit; the gauge mode ``(h_1 - h_2) / sqrt 2`` (zero for an exact symmetry) is not stepped.
  See :func:`pair_chart` and :func:`pair_retract` for the lift, which holds ``log(rho_1 / rho_2)``
  exactly.

:func:`build_frame_plan` reads a :class:`~gaugeopt.gauges.GaugeSet` into a :class:`FramePlan`: for
every parameter, what each family does along each of its axes, refusing combinations the frames do
not make exact (a neuron scaling on both axes of one matrix, ddc.md section 6).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ..gauges.families import GaugeFamily, HeadRotation, LogitShift, NeuronScaling, NormScaling
from ..gauges.gaugeset import GaugeSet

__all__ = [
    "AxisAction",
    "TensorFrame",
    "FramePlan",
    "FrameConflictError",
    "build_frame_plan",
    "compatible_gauges",
    "unit_slices",
    "from_unit_slices",
    "scale_columns",
    "center_rows",
    "group_mean",
    "adam_moments_",
    "FrameEntry",
    "enter_frame",
    "leave_frame",
    "block_layout",
    "PairChart",
    "PairFrame",
    "ChartScalars",
    "chart_scalars",
    "pair_chart",
    "retract_coefficients",
    "pair_retract",
    "dead_units",
]

ActionKind = Literal["merge", "center", "share", "pair"]


class FrameConflictError(ValueError):
    """Two gauge families act on one axis of a parameter in a way no frame here makes exact."""


# --------------------------------------------------------------------------------------------------
# The plan: what acts on which axis of which parameter
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisAction:
    """One family's action along one axis of one parameter.

    kind "merge": the axis' slices are scaled by a norm gain (``gain``), "center": a translation moves
    every slice along it by the same vector, "share": orthogonal blocks mix it (``groups[i]`` = block
    of index i, unrotated indices get their own block; ``layout`` is its :func:`block_layout`, found
    once here so that the step averages over blocks with a reshape), "pair": it is the unit axis of a
    neuron pair.
    """

    kind: ActionKind
    family: str
    gain: str | None = None
    groups: Tensor | None = None
    layout: tuple[int, int, int] | None = None


@dataclass
class TensorFrame:
    """The frame of one parameter: its role and the action along each axis (at most one per axis)."""

    name: str
    role: Literal["tensor", "gain", "norm_bias"] = "tensor"
    gain: str | None = None  # for role "norm_bias": the gain it is divided by
    norm_family: str | None = None  # for roles "gain" / "norm_bias"
    axes: dict[int, AxisAction] = field(default_factory=dict)

    @property
    def merge(self) -> AxisAction | None:
        return next((a for a in self.axes.values() if a.kind == "merge"), None)

    @property
    def centered(self) -> bool:
        return any(a.kind == "center" for a in self.axes.values())

    @property
    def pair(self) -> tuple[int, AxisAction] | None:
        return next(((axis, a) for axis, a in self.axes.items() if a.kind == "pair"), None)

    def shared_axes(self) -> list[tuple[int, Tensor, tuple[int, int, int] | None]]:
        """``(axis, groups, layout)`` of every axis whose second moments are shared over blocks."""
        return [(axis, a.groups, a.layout) for axis, a in sorted(self.axes.items()) if a.kind == "share"]


@dataclass(frozen=True)
class FramePlan:
    """Frames of every gauge-carrying parameter of a model, and the neuron pairs to chart."""

    tensors: dict[str, TensorFrame]
    norms: tuple[NormScaling, ...]
    pairs: tuple[NeuronScaling, ...]

    def frame(self, name: str) -> TensorFrame | None:
        return self.tensors.get(name)


def _block_groups(size: int, blocks: list[Tensor]) -> Tensor:
    """Group id per index along an axis of length ``size``: one id per block, singletons elsewhere."""
    groups = torch.full((size,), -1, dtype=torch.long)
    for gid, index in enumerate(blocks):
        if (groups[index] >= 0).any():
            raise ValueError("rotation blocks overlap on one axis")
        groups[index] = gid
    rest = (groups < 0).nonzero().flatten()
    groups[rest] = torch.arange(len(blocks), len(blocks) + len(rest))
    return groups


def _rotation_claims(family: HeadRotation, params: Mapping[str, Tensor]) -> list[tuple[str, int, AxisAction]]:
    claims = []
    blocks = family.blocks
    for weight, bias, rows, _ in family.left:
        row_blocks = [rows[h][list(b)] for h in range(rows.shape[0]) for b in blocks]
        for name in (weight, bias):
            if name is not None:
                groups = _block_groups(params[name].shape[0], row_blocks)
                claims.append((name, 0, AxisAction("share", family.name, groups=groups,
                                                   layout=block_layout(groups))))
    for weight, cols in family.right:
        col_blocks = [cols[h][list(b)] for h in range(cols.shape[0]) for b in blocks]
        groups = _block_groups(params[weight].shape[1], col_blocks)
        claims.append((weight, 1, AxisAction("share", family.name, groups=groups, layout=block_layout(groups))))
    return claims


def _claims(family: GaugeFamily, params: Mapping[str, Tensor]) -> list[tuple[str, int, AxisAction]]:
    if isinstance(family, NormScaling):
        return [(c, 1, AxisAction("merge", family.name, gain=family.gain)) for c in family.consumers]
    if isinstance(family, LogitShift):
        names = [family.weight] + ([family.bias] if family.bias else [])
        return [(n, 0, AxisAction("center", family.name)) for n in names]
    if isinstance(family, NeuronScaling):
        return [(r.name, r.axis, AxisAction("pair", family.name)) for r in (*family.multiplied, *family.divided)]
    if isinstance(family, HeadRotation):
        return _rotation_claims(family, params)
    raise TypeError(f"no frame for gauge family {family.name!r} of type {type(family).__name__}")


def build_frame_plan(gauges: GaugeSet) -> FramePlan:
    """The frames of ``gauges``' parameters, or :class:`FrameConflictError` naming the parameter.

    Rules: every axis of a parameter carries at most one action; a parameter is in at most one neuron
    pair (a neuron scaling on both axes, as in a deep plain ReLU MLP, is refused: ddc.md section 6);
    a norm gain or norm bias is touched by its norm family only.
    """
    params = gauges.params()
    tensors: dict[str, TensorFrame] = {}

    def frame(name: str) -> TensorFrame:
        return tensors.setdefault(name, TensorFrame(name))

    def conflict(name: str, what: str, first: str, second: str) -> FrameConflictError:
        return FrameConflictError(
            f"parameter {name!r}: {what} ({first} and {second}); no gauge frame makes that exact. "
            f"Drop one of the families, e.g. with gaugeopt.optim.gauge_frames.compatible_gauges(gauges).")

    norms = [f for f in gauges if isinstance(f, NormScaling)]
    for f in norms:
        for name, role in ((f.gain, "gain"), (f.bias, "norm_bias")):
            if name is None:
                continue
            if name in tensors:
                raise conflict(name, "is a norm parameter of two families", tensors[name].norm_family or "?", f.name)
            tensors[name] = TensorFrame(name, role=role, gain=f.gain if role == "norm_bias" else None,
                                        norm_family=f.name)
    for f in gauges:
        for name, axis, action in _claims(f, params):
            t = frame(name)
            if t.role != "tensor":
                raise conflict(name, f"is a norm {t.role.replace('_', ' ')} and is also acted on",
                               t.norm_family or "?", f.name)
            if axis in t.axes:
                raise conflict(name, f"two families act on axis {axis}", t.axes[axis].family, action.family)
            if action.kind == "pair" and t.pair is not None:
                raise conflict(name, "is in two neuron pairs (a neuron scaling on both axes)",
                               t.pair[1].family, action.family)
            t.axes[axis] = action
    pairs = tuple(f for f in gauges if isinstance(f, NeuronScaling))
    return FramePlan(tensors, tuple(norms), pairs)


def compatible_gauges(gauges: GaugeSet, *, verbose: bool = True) -> tuple[GaugeSet, list[str]]:
    """The largest prefix-greedy subset of ``gauges`` that :func:`build_frame_plan` accepts.

    Families are kept in order; one that conflicts with those kept is dropped (and printed when
    ``verbose``). Returns the reduced :class:`GaugeSet` (bound to the same model) and the dropped names.
    An optimizer built on the result is exact for the kept families only.
    """
    kept: list[GaugeFamily] = []
    dropped: list[str] = []
    for f in gauges:
        try:
            build_frame_plan(GaugeSet([*kept, f], (), gauges.model))
        except FrameConflictError as err:
            dropped.append(f.name)
            if verbose:
                print(f"compatible_gauges: dropping {f.name}: {err}")
            continue
        kept.append(f)
    return GaugeSet(kept, gauges.skipped, gauges.model), dropped


# --------------------------------------------------------------------------------------------------
# Pure tensor maps
# --------------------------------------------------------------------------------------------------


def unit_slices(t: Tensor, axis: int) -> Tensor:
    """``t`` with ``axis`` moved first and the rest flattened: (units, -1)."""
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def from_unit_slices(slices: Tensor, axis: int, shape: torch.Size) -> Tensor:
    """Inverse of :func:`unit_slices` for a tensor of ``shape``."""
    moved = [shape[axis]] + [s for i, s in enumerate(shape) if i != axis]
    return slices.reshape(moved).movedim(0, axis)


def scale_columns(t: Tensor, factors: Tensor) -> Tensor:
    """``t diag(factors)`` for a matrix (columns = axis 1)."""
    return t * factors.reshape(1, -1)


def center_rows(t: Tensor) -> Tensor:
    """The horizontal part ``t - 1 mean_rows(t)^T`` for a translation gauge along axis 0."""
    return t - t.mean(dim=0, keepdim=True)


def block_layout(groups: Tensor) -> tuple[int, int, int] | None:
    """``(outer, block, inner)`` when the groups are regular blocks of one axis, else ``None``.

    Regular means: with the axis viewed as ``(outer, block, inner)`` (index
    ``i = (o * block + b) * inner + c``), the group of ``i`` depends on ``(o, c)`` only and differs for
    every ``(o, c)``; each group is then the ``block`` indices along the middle axis. Contiguous head
    blocks are ``(heads, head_dim, 1)``; RoPE planes ``(i, i + half)`` in each head are
    ``(heads, 2, half)``. Found by trying every factorisation (once, when the frame plan is built).
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


def group_mean(values: Tensor, groups: Tensor, axis: int, layout: tuple[int, int, int] | None = None) -> Tensor:
    """Replace every entry by the mean over its group along ``axis`` (``groups[i]`` = group of i).

    ``layout``, the groups' :func:`block_layout` when they have one, turns the gather/scatter into a
    reshape and a mean over the block axis (same result up to summation order)."""
    if layout is not None:
        blocked = (*values.shape[:axis], *layout, *values.shape[axis + 1:])
        means = values.reshape(blocked).mean(dim=axis + 1, keepdim=True)
        return means.expand(blocked).reshape(values.shape)
    moved = values.movedim(axis, 0)
    groups = groups.to(values.device)
    # One slot per index along the axis (group ids are below its length): no size read from the data,
    # so a compiled caller needs no graph break. Unused slots stay 0 / 1.
    sums = moved.new_zeros(moved.shape).index_add_(0, groups, moved)
    counts = moved.new_zeros(moved.shape[0]).index_add_(0, groups, torch.ones_like(groups, dtype=moved.dtype))
    means = sums / counts.clamp_min(1).reshape(-1, *([1] * (moved.dim() - 1)))
    return means[groups].movedim(0, axis)


def adam_moments_(x: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float,
                  shared_axes: Iterable[tuple[int, Tensor, tuple[int, int, int] | None]] = ()) -> None:
    """``m <- b1 m + (1-b1) x`` and ``v <- b2 v + (1-b2) S(x*x)`` in place; ``S`` averages over the
    groups of each ``(axis, groups, layout)`` in ``shared_axes`` (the identity when there are none;
    ``layout`` as in :func:`~gaugeopt.optim.gauge_frames.group_mean`)."""
    exp_avg.lerp_(x, 1 - beta1)
    shared_axes = list(shared_axes)
    if not shared_axes:
        exp_avg_sq.mul_(beta2).addcmul_(x, x, value=1 - beta2)
        return
    square = x * x
    if len(shared_axes) == 1 and shared_axes[0][2] is not None:  # regular blocks: a broadcast, no gather
        axis, _, layout = shared_axes[0]
        blocked = (*x.shape[:axis], *layout, *x.shape[axis + 1:])
        means = square.view(blocked).mean(dim=axis + 1, keepdim=True)
        exp_avg_sq.view(blocked).mul_(beta2).add_(means, alpha=1 - beta2)
        return
    for axis, groups, layout in shared_axes:
        square = group_mean(square, groups, axis, layout)
    exp_avg_sq.mul_(beta2).add_(square, alpha=1 - beta2)


def _eager() -> bool:
    """Whether this runs eagerly (not traced by ``torch.compile``): eager code may skip a pass after
    a data-dependent test, a compiled kernel fuses that pass at no cost instead of branching."""
    return not torch.compiler.is_compiling()


class FrameEntry(NamedTuple):
    """A parameter in its frame (:func:`enter_frame`): ``value`` (merged, centered, decayed) and
    ``grad`` (merged, centered) are what the base update sees; ``mean_row`` is the held translation
    coordinate, ``frozen`` the entries to write back unchanged, ``lift`` the factor of the covariant
    lift (``1 / g`` per column of a merged consumer, ``g`` for a norm bias)."""

    value: Tensor
    grad: Tensor
    mean_row: Tensor | None
    frozen: Tensor | None
    lift: Tensor | None


def enter_frame(param: Tensor, grad: Tensor | None, gain: Tensor | None, *, role: str, merged: bool,
                centered: bool, decay: float | Tensor, threshold: float, dtype: torch.dtype) -> FrameEntry:
    """Merge with the norm gain, center translations, freeze dead channels, apply weight decay.

    ``role`` is the frame's role ("tensor" or "norm_bias"); ``merged`` says the columns are scaled by
    ``gain`` (a norm gain, read only); ``decay = 1 - lr wd``. A merged consumer enters as
    ``W~ = C diag(g) decay`` with gradient ``G_C diag(1/g)``, a norm bias as ``beta / g`` with gradient
    ``g G_beta``; channels with ``|g| <= threshold`` are dead (zero in the frame, frozen). A centered
    tensor loses its mean row (held) before decay acts on the rest. Computed in ``dtype``.

    ``value`` and ``grad`` are new tensors where a map applies and ``param``'s own storage (read only)
    where none does; ``value`` is new whenever weight decay acts. ``grad=None`` enters the value only
    (the entry's ``grad`` is then ``None``)."""
    value, frozen, lift = param.detach(), None, None
    has_grad = grad is not None
    converted = dtype != param.dtype
    if converted:
        value, grad = value.to(dtype), grad.to(dtype) if has_grad else None
    decays = not (_eager() and decay == 1.0)
    decayed = not centered  # fold the decay into the merge (one pass less) unless centering comes between
    if role == "norm_bias" or merged:
        if gain is None:
            raise ValueError(f"a {'norm bias' if role == 'norm_bias' else 'merged'} frame needs its gain")
        gain = gain.detach().to(dtype)
        dead = gain.abs() <= threshold
        live = torch.where(dead, torch.ones_like(gain), gain)
        factor = decay if decayed and decays else 1.0
        if role == "norm_bias":
            value, lift = value * (factor / live), live
            grad = grad * live if has_grad else None
        else:
            value, lift = scale_columns(value, live * factor), 1 / live.reshape(1, -1)
            grad = scale_columns(grad, 1 / live) if has_grad else None
            dead = dead.reshape(1, -1).expand_as(value)
        if not _eager() or dead.any():
            frozen = dead
            value = value.masked_fill_(frozen, 0.0)  # new here, as is grad
            grad = grad.masked_fill_(frozen, 0.0) if has_grad else None
    else:
        decayed = False
    mean_row = None
    if centered:
        mean_row = value.mean(dim=0, keepdim=True)
        value = value - mean_row
        grad = center_rows(grad) if has_grad else None
    if decays and not decayed:
        mapped = converted or centered  # value is a new tensor: decay it in place
        value = value.mul_(decay) if mapped else value * decay
    return FrameEntry(value, grad, mean_row, frozen, lift)


def leave_frame(param: Tensor, value: Tensor, entry: FrameEntry, frozen: Tensor | None = None) -> None:
    """Write ``value`` (the stepped frame value of ``param``, a tensor the caller owns) back through
    the frame of ``entry``: add the held mean row, apply the lift, keep frozen entries (``entry``'s and
    ``frozen``'s) as they were. Writes into ``param`` (cast to its dtype)."""
    if entry.mean_row is not None:
        value = value.add_(entry.mean_row)
    if entry.frozen is not None:
        frozen = entry.frozen if frozen is None else entry.frozen | frozen
    if frozen is not None:
        param.copy_(torch.where(frozen, param, value if entry.lift is None else value * entry.lift))
    elif entry.lift is None:
        param.copy_(value)
    elif _eager():
        torch.mul(value, entry.lift, out=param)  # one pass
    else:
        param.copy_(value * entry.lift)


PairFrame = Literal["radius", "balanced"]


@dataclass(frozen=True)
class PairChart:
    """Invariant coordinates of a batch of unit pairs (one row per unit), measured in units of an
    invariant length ``l`` per unit (``length``; None means 1).

    ``rho1``, ``rho2``: side norms (covariant: times a, divided by a). ``direction1/2``: ``P_k / rho_k``
    (invariant). ``radial``: ``(h1 + h2) / (sqrt 2 l)``; ``vertical``: ``(h1 - h2) / (sqrt 2 l)`` (the
    gauge mode, zero for an exact symmetry); ``tangent1/2``: ``x_k = (rho_k G_k - (h_k / rho_k) P_k) / l``.
    ``dead`` marks units whose pair is numerically degenerate; their entries are zero.
    """

    rho1: Tensor
    rho2: Tensor
    direction1: Tensor
    direction2: Tensor
    radial: Tensor
    vertical: Tensor
    tangent1: Tensor
    tangent2: Tensor
    dead: Tensor
    length: Tensor | None = None


def dead_units(rho1: Tensor, rho2: Tensor, threshold: float) -> Tensor:
    """Units whose pair cannot be charted: ``sqrt(rho1 rho2) <= threshold`` (a gauge-invariant
    scale), or a side so small that its square is not a normal float."""
    tiny = math.sqrt(torch.finfo(rho1.dtype).tiny)
    return (torch.sqrt(rho1) * torch.sqrt(rho2) <= threshold) | (rho1 <= tiny) | (rho2 <= tiny)


class ChartScalars(NamedTuple):
    """Per-unit scalars of the pair chart, from the sums ``|P_k|^2`` and ``<G_k, P_k>``: radii
    ``rho1, rho2``; ``dead`` units and ``live = 1 - dead``; ``safe1, safe2`` the radii with 1 on dead
    units; ``length`` the invariant unit length (``None``: 1); ``h1, h2`` the live radial inner products."""

    rho1: Tensor
    rho2: Tensor
    dead: Tensor
    live: Tensor
    safe1: Tensor
    safe2: Tensor
    length: Tensor | None
    h1: Tensor
    h2: Tensor

    def tangent_coefficients(self, side: int) -> tuple[Tensor, Tensor]:
        """``(a, b)`` with the tangential input ``x_k = a G_k + b P_k`` of side ``side`` (1 or 2):
        ``a = live rho_k / l``, ``b = -h_k / (rho_k l)``."""
        safe, h = (self.safe1, self.h1) if side == 1 else (self.safe2, self.h2)
        scale = torch.ones_like(safe) if self.length is None else self.length
        return safe * self.live / scale, -h / (safe * scale)

    def radial_vertical(self) -> tuple[Tensor, Tensor]:
        """``((h1 + h2) / (sqrt 2 l), (h1 - h2) / (sqrt 2 l))``."""
        radial, vertical = (self.h1 + self.h2) / math.sqrt(2), (self.h1 - self.h2) / math.sqrt(2)
        if self.length is not None:
            radial, vertical = radial / self.length, vertical / self.length
        return radial, vertical


def chart_scalars(square1: Tensor, square2: Tensor, inner1: Tensor, inner2: Tensor, threshold: float,
                  frame: PairFrame) -> ChartScalars:
    """:class:`ChartScalars` from ``square_k = |P_k|^2`` and ``inner_k = <G_k, P_k>`` per unit."""
    if frame not in ("radius", "balanced"):
        raise ValueError(f"frame must be 'radius' or 'balanced', got {frame!r}")
    rho1, rho2 = square1.sqrt(), square2.sqrt()
    dead = dead_units(rho1, rho2, threshold)
    live = (~dead).to(rho1.dtype)
    safe1 = torch.where(dead, torch.ones_like(rho1), rho1)
    safe2 = torch.where(dead, torch.ones_like(rho2), rho2)
    length = torch.sqrt(safe1) * torch.sqrt(safe2) if frame == "balanced" else None
    return ChartScalars(rho1, rho2, dead, live, safe1, safe2, length, inner1 * live, inner2 * live)


def pair_chart(P1: Tensor, G1: Tensor, P2: Tensor, G2: Tensor, threshold: float = 0.0, *,
               frame: PairFrame = "radius") -> PairChart:
    """Chart of unit pairs ``P1`` (units, n1), ``P2`` (units, n2) with gradients ``G1``, ``G2``.

    ``frame`` picks the invariant length ``l`` of each unit: ``"radius"`` (``l = 1``, ddc.md section 4
    as written: the lift ``rho_k u_k`` makes ``lr`` a relative rate) or ``"balanced"``
    (``l = sqrt(rho1 rho2)``, the common radius of the balanced point of the orbit, where
    ``rho1 = rho2``: there the chart's inputs are the gradient's own radial and tangential parts and the
    lift ``(rho_k / l) u_k`` is Adam's absolute step, so ``lr`` means what it means for AdamW).
    """
    # Per-unit scalars first (one reduction per input), then each (units, n) output in two passes:
    # x_k = G_k (live rho_k / l) - P_k (live h_k / (rho_k l)), d_k = P_k (live / rho_k).
    s = chart_scalars(torch.linalg.vecdot(P1, P1, dim=1), torch.linalg.vecdot(P2, P2, dim=1),
                      torch.linalg.vecdot(G1, P1, dim=1), torch.linalg.vecdot(G2, P2, dim=1), threshold, frame)
    (a1, b1), (a2, b2) = s.tangent_coefficients(1), s.tangent_coefficients(2)
    x1 = torch.mul(G1, a1.unsqueeze(1)).addcmul_(P1, b1.unsqueeze(1))
    x2 = torch.mul(G2, a2.unsqueeze(1)).addcmul_(P2, b2.unsqueeze(1))
    radial, vertical = s.radial_vertical()
    direction1 = P1 * (s.live / s.safe1).unsqueeze(1)
    direction2 = P2 * (s.live / s.safe2).unsqueeze(1)
    return PairChart(s.rho1, s.rho2, direction1, direction2, radial, vertical, x1, x2, s.dead, s.length)


def retract_coefficients(rho1: Tensor, rho2: Tensor, live: Tensor, length: Tensor | None, radial_update: Tensor,
                         lr: float | Tensor, along1: Tensor, across1: Tensor, along2: Tensor,
                         across2: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Per-unit ``(c_d, c_t)`` of each side with the retracted side ``P_k <- c_d d_k + c_t t_k``
    (:func:`pair_retract`), from ``along_k = <t_k, d_k>`` and ``across_k = |t_k|^2`` of the tangential
    update ``t_k`` and the unit direction ``d_k`` (zero on dead units).

    With ``c = lr * radial_update / (sqrt 2 l)``, ``rate = lr / l`` and ``q_k = e^{-c} d_k - rate u_k``
    (``u_k`` = ``t_k`` projected orthogonal to ``d_k``): ``|q_k|^2 = e^{-2c} + rate^2 (|t_k|^2 -
    along_k^2)`` and ``P_k <- rho_k sqrt(|q_1| |q_2|) q_k / |q_k|``."""
    radial = radial_update if length is None else radial_update / length
    rate = torch.ones_like(radial) * lr if length is None else lr / length
    shrink = torch.exp(-lr * radial / math.sqrt(2))

    def norm(along: Tensor, across: Tensor) -> Tensor:
        turned = (across - along.square() * live).clamp_(min=0)
        n = torch.sqrt((shrink * shrink) * live + (rate * rate) * turned)
        return torch.where(n > 0, n, torch.ones_like(n))

    n1, n2 = norm(along1, across1), norm(along2, across2)
    common = torch.sqrt(n1) * torch.sqrt(n2) * live
    scale1, scale2 = rho1 * common / n1, rho2 * common / n2
    return ((scale1 * (shrink + rate * along1), -scale1 * rate), (scale2 * (shrink + rate * along2), -scale2 * rate))


def pair_retract(chart: PairChart, radial_update: Tensor, tangent1_update: Tensor, tangent2_update: Tensor,
                 lr: float | Tensor) -> tuple[Tensor, Tensor]:
    """New pairs from base-optimizer outputs in the chart (ddc.md section 4), orbit coordinate held.

    With the unit length ``l`` of the chart, ``c = lr * radial_update / (sqrt 2 l)``, ``u_k`` the
    tangential update projected orthogonal to the direction ``d_k = P_k / rho_k`` and
    ``q_k = e^{-c} d_k - (lr / l) u_k``, the step of ddc.md section 4 is ``P_k <- rho_k q_k``. Its
    second-order norm change differs between the sides (``|q_1| != |q_2|``), which would move the
    orbit coordinate ``log(rho_1 / rho_2)`` by ``log(|q_1| / |q_2|)``. That vertical part is removed:

        P_k <- rho_k sqrt(|q_1| |q_2|) q_k / |q_k|

    so ``log(rho_1 / rho_2)`` is held exactly while the invariant scale ``rho_1 rho_2`` changes by
    ``|q_1| |q_2|``, as under the unprojected step. Every factor is invariant except ``rho_k``, so the
    map is covariant. Dead units come back as zero rows (the caller freezes them). The per-unit
    coefficients are :func:`retract_coefficients`; ``q_k`` is formed in two passes over the rows.
    """
    def sums(t: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        return torch.linalg.vecdot(t, d, dim=1), torch.linalg.vecdot(t, t, dim=1)

    live = (~chart.dead).to(chart.rho1.dtype)
    (d1, t1), (d2, t2) = retract_coefficients(chart.rho1, chart.rho2, live, chart.length, radial_update, lr,
                                              *sums(tangent1_update, chart.direction1),
                                              *sums(tangent2_update, chart.direction2))
    return (torch.mul(chart.direction1, d1.unsqueeze(1)).addcmul_(tangent1_update, t1.unsqueeze(1)),
            torch.mul(chart.direction2, d2.unsqueeze(1)).addcmul_(tangent2_update, t2.unsqueeze(1)))
