"""Gauge frames: canonical coordinates in which a base optimizer rule cannot see the gauges.

A *frame* maps a parameter and its gradient to canonical coordinates that are invariant under the
model's gauge groups (or transform by a residual orthogonal group the rule respects), computed from
the parameters alone; the rule steps the canonical tensor; the *lift* maps the step back with the
same frame. Training from ``g . theta`` then sees the same canonical numbers as training from
``theta``, so the lift returns ``g . theta'``: the optimizer is equivariant (docs/ddc.md).

Per family (``W`` a parameter, ``G`` its gradient, rows = outputs):

* **Positive diagonal scalings** (norm scale and neuron scale). A scaling family ``F`` multiplies
  slices of some tensors by ``a_i > 0`` (its *multiplied* side) and divides slices of others (its
  *divided* side). Its frame is a covariant vector ``s_F`` (``s_F -> a s_F``). On an axis carried
  by ``F`` on side ``sigma`` (+1 multiplied, -1 divided) the canonical tensor is ``W s_F^(-sigma)``,
  the canonical gradient ``G~ = G gamma`` and the lift of a canonical step ``D`` is ``D gamma``,
  with the *gradient factor* ``gamma = s_F^sigma`` (products over the axes of a tensor).

  - Norm scale: ``s = g``, the gain itself: the gain is the frame of its channels and is never
    stepped (canonical gain 1), consumers are worked on merged ``W~ = C diag(g)``, a LayerNorm bias
    as ``beta / g``.
  - Neuron scale: ``s_F = u_F / |w~_in|`` (:func:`neuron_frames`) from two closed-form recursions
    over the chain of neuron families (a deep ReLU MLP, a SwiGLU stack): from the input side
    ``u_F[i] = |multiplied slices i, their other axes times u_A (upstream families) or merged with a
    norm gain|`` and from the output side ``v_F[i] = |divided slices i, their other axes times v_B
    (downstream families), centred where a translation acts|``. Under the gauges ``u_F -> a u_F``
    and ``v_F -> v_F / a``, so the unit's size ``l = sqrt(u_F v_F)`` is invariant and ``s_F`` is
    covariant; ``|w~_in|`` is the section point of ``l`` (:func:`~gaugeopt.gauges.unit_section`):
    the balanced point ``sqrt(u v)`` for ``l`` well above the section constant ``c``, and ``c`` where the
    divided side is zero, so the frame is regular there. For an *isolated* pair (no upstream or
    downstream family: a transformer's MLP units) ``u`` and ``v`` are the two side norms.

* **Blocks of an axis.** A scaling whose unit owns a block of ``inner`` consecutive indices of an
  axis (:class:`~gaugeopt.gauges.AxisRef` with ``inner > 1``: a conv channel's columns in the Linear
  after ``flatten(1)``) is framed on a view of the parameter that splits that axis into
  ``(units, inner)``; every action on the parameter is then read on the view's axes
  (:attr:`TensorFrame.shape`), and the rules see the parameter's own shape.

* **Translation** (logit / router shift ``W -> W + 1 a^T``): the gradient, the weight decay and the
  step act on the horizontal part ``W - 1 mean_row(W)``; the mean row is held.

* **Rotation** (per-head query/key and value/output): no canonical map; the tensor keeps a residual
  orthogonal symmetry on blocks of one axis (:class:`~gaugeopt.optim.symmetry.SharedAxis`), which a rule must respect (Adam
  shares its second moments over each block; Newton-Schulz commutes with it).

:func:`build_frame_plan` reads a :class:`~gaugeopt.gauges.GaugeSet` into a :class:`FramePlan`: for
every parameter the action on each axis, for every scaling family its place in the chains. It
refuses (:class:`FrameConflictError`) only what no frame here makes exact: two families on one axis,
a tensor on the multiplied (or divided) side of two neuron families, a cycle of neuron families.
The maps at the bottom are pure functions on stacked tensors (a leading batch axis of same-shape
tensors), used by :mod:`gaugeopt.optim.step`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from ..gauges.families import (
    AxisRef,
    GaugeFamily,
    HeadRotation,
    LogitShift,
    NeuronScaling,
    NormScaling,
    unit_section,
)
from ..gauges.gaugeset import GaugeSet
from .symmetry import Scaling, SharedAxis, Side, block_layout

__all__ = [
    "FrameConflictError",
    "ScaledAxis",
    "TensorFrame",
    "ScalingFrame",
    "FramePlan",
    "build_frame_plan",
    "compatible_gauges",
    "unit_square_sums",
    "unit_inner_products",
    "UnitFrames",
    "neuron_frames",
    "finite_nonnegative",
    "frozen_gains",
]


class FrameConflictError(ValueError):
    """Gauge families act on a parameter in a way no frame here makes exact."""


# --------------------------------------------------------------------------------------------------
# The plan: what acts on which axis of which parameter
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaledAxis:
    """A positive diagonal scaling family's action on one axis: its ``side`` (multiplied or divided
    by ``a``) and ``kind`` (a norm, whose frame is the gain, or neuron units)."""

    family: str
    side: Side
    kind: Scaling


@dataclass(frozen=True)
class TensorFrame:
    """The frame of one parameter: at most one action per axis.

    ``shape`` is the shape the frame reads the parameter in: its own, or a view of it with each
    blocked axis split into ``(units, inner)`` (module docstring); every axis below is an axis of
    that shape. ``scaled``: ``(axis, ScaledAxis)`` pairs; ``centered``: a translation moves every slice along
    axis 0 by one vector (logit or router shift); ``shared``: ``(axis, SharedAxis)`` pairs;
    ``gain``: the parameter is a norm gain (the frame of its channels, never stepped);
    ``heads``: for query/key/value and output weights of a rotation family, ``(axis, index)`` with
    ``index[h]`` the indices of head ``h`` along ``axis`` (head-wise orthogonalisation).
    """

    name: str
    shape: tuple[int, ...]
    scaled: tuple[tuple[int, ScaledAxis], ...] = ()
    centered: bool = False
    shared: tuple[tuple[int, SharedAxis], ...] = ()
    gain: bool = False
    heads: tuple[int, tuple[tuple[int, ...], ...]] | None = None

    def scale_on(self, axis: int) -> ScaledAxis | None:
        return next((s for a, s in self.scaled if a == axis), None)

    def signature(self) -> tuple:
        """What the batched step needs to know about the frame, without names: tensors whose
        frames share a signature (and shape) are stepped as one batch."""
        return (self.shape, tuple((a, s.side, s.kind) for a, s in self.scaled), self.centered,
                tuple((a, s.groups, s.layout) for a, s in self.shared), self.gain)


@dataclass(frozen=True)
class ScalingFrame:
    """One positive diagonal scaling family as a frame source (module docstring).

    ``upstream``: neuron families that divide another axis of one of the multiplied tensors (their
    ``u`` enters this family's ``u``); ``downstream``: neuron families that multiply another axis of
    one of the divided tensors (their ``v`` enters this family's ``v``).
    """

    name: str
    kind: Scaling
    units: int
    multiplied: tuple[AxisRef, ...]
    divided: tuple[AxisRef, ...]
    gain: str | None = None
    bias: str | None = None
    consumers: tuple[str, ...] = ()
    upstream: tuple[str, ...] = ()
    downstream: tuple[str, ...] = ()

    @property
    def isolated(self) -> bool:
        """A neuron family linked to no other: its canonical point is the orbit's balanced point and
        the step holds its orbit coordinates (docs/ddc.md)."""
        return self.kind is Scaling.NEURON and not self.upstream and not self.downstream

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.name for r in (*self.multiplied, *self.divided)))


@dataclass(frozen=True)
class FramePlan:
    """Frames of every gauge-carrying parameter of a model (by name) and the scaling families in
    dependency order (norm families first, then neuron families upstream before downstream)."""

    tensors: Mapping[str, TensorFrame]
    scalings: Mapping[str, ScalingFrame]

    def frame(self, name: str) -> TensorFrame | None:
        return self.tensors.get(name)

    @property
    def norms(self) -> tuple[ScalingFrame, ...]:
        return tuple(f for f in self.scalings.values() if f.kind is Scaling.NORM)

    @property
    def neurons(self) -> tuple[ScalingFrame, ...]:
        return tuple(f for f in self.scalings.values() if f.kind is Scaling.NEURON)


@dataclass
class _Frame:
    """A frame under construction."""

    name: str
    shape: tuple[int, ...]
    actions: dict[int, tuple[str, object]] = field(default_factory=dict)  # axis -> (family, action)
    gain: bool = False
    heads: tuple[int, tuple[tuple[int, ...], ...]] | None = None

    def freeze(self) -> TensorFrame:
        scaled = tuple((a, x) for a, (_, x) in sorted(self.actions.items()) if isinstance(x, ScaledAxis))
        shared = tuple((a, x) for a, (_, x) in sorted(self.actions.items()) if isinstance(x, SharedAxis))
        centered = any(x == "center" for _, x in self.actions.values())
        return TensorFrame(self.name, self.shape, scaled, centered, shared, self.gain, self.heads)


def _block_groups(size: int, blocks: list[list[int]]) -> tuple[int, ...]:
    """Group id per index along an axis of length ``size``: one id per block, singletons elsewhere."""
    groups = [-1] * size
    for gid, index in enumerate(blocks):
        for i in index:
            if groups[i] >= 0:
                raise FrameConflictError("rotation blocks overlap on one axis")
            groups[i] = gid
    next_id = len(blocks)
    for i in range(size):
        if groups[i] < 0:
            groups[i], next_id = next_id, next_id + 1
    return tuple(groups)


def _rotation_actions(family: HeadRotation, shapes: Mapping[str, tuple[int, ...]]):
    blocks = family.blocks
    for weight, bias, rows, _ in family.left:
        row_blocks = [rows[h][list(b)].tolist() for h in range(rows.shape[0]) for b in blocks]
        heads = (0, tuple(tuple(r) for r in rows.tolist()))
        for name in (weight, bias):
            if name is not None:
                groups = _block_groups(shapes[name][0], row_blocks)
                yield name, 0, SharedAxis(family.name, groups, block_layout(torch.tensor(groups))), \
                    heads if name == weight else None
    for weight, cols in family.right:
        col_blocks = [cols[h][list(b)].tolist() for h in range(cols.shape[0]) for b in blocks]
        groups = _block_groups(shapes[weight][1], col_blocks)
        yield weight, 1, SharedAxis(family.name, groups, block_layout(torch.tensor(groups))), \
            (1, tuple(tuple(c) for c in cols.tolist()))


def _actions(family: GaugeFamily, shapes: Mapping[str, tuple[int, ...]]):
    """``(parameter, axis, action, heads)`` for every axis the family acts on."""
    if isinstance(family, (NormScaling, NeuronScaling)):
        kind = Scaling.NORM if isinstance(family, NormScaling) else Scaling.NEURON
        for side, refs in ((Side.MULTIPLIED, family.multiplied), (Side.DIVIDED, family.divided)):
            for ref in refs:
                if kind is Scaling.NORM and ref.name == family.gain:
                    continue  # the gain is the frame itself
                yield ref.name, ref.axis, ScaledAxis(family.name, side, kind), None
    elif isinstance(family, LogitShift):
        for name in family.parameters:
            yield name, 0, "center", None
    elif isinstance(family, HeadRotation):
        yield from _rotation_actions(family, shapes)
    else:
        raise TypeError(f"no frame for gauge family {family.name!r} of type {type(family).__name__}")


class _AxisViews:
    """Per parameter, the axes that scaling families split into ``(units, inner)`` blocks, and the
    map from the parameter's axes to the axes of that view (module docstring, blocks of an axis)."""

    def __init__(self, gauges: GaugeSet, shapes: Mapping[str, tuple[int, ...]]):
        self.split: dict[str, dict[int, int]] = {}
        for f in gauges:
            if isinstance(f, (NormScaling, NeuronScaling)):
                for ref in (*f.multiplied, *f.divided):
                    if ref.inner > 1:
                        axes = self.split.setdefault(ref.name, {})
                        if axes.get(ref.axis, ref.inner) != ref.inner:
                            raise FrameConflictError(
                                f"parameter {ref.name!r}: axis {ref.axis} is cut into blocks of {axes[ref.axis]} and of "
                                f"{ref.inner} entries by two families; no gauge frame makes that exact")
                        axes[ref.axis] = ref.inner
        self.shapes = shapes

    def axis(self, name: str, axis: int) -> int:
        """The view axis of parameter axis ``axis`` (of a split axis: the units' axis)."""
        return axis + sum(1 for a in self.split.get(name, ()) if a < axis)

    def shape(self, name: str) -> tuple[int, ...]:
        shape, split = self.shapes[name], self.split.get(name, {})
        out: list[int] = []
        for a, size in enumerate(shape):
            out += [size // split[a], split[a]] if a in split else [size]
        return tuple(out)

    def ref(self, ref: AxisRef) -> AxisRef:
        """``ref`` read on the view: the units' axis of the view, one index per unit."""
        return AxisRef(ref.name, self.axis(ref.name, ref.axis))


def build_frame_plan(gauges: GaugeSet) -> FramePlan:
    """The frames of ``gauges``' parameters, or :class:`FrameConflictError` naming the parameter."""
    shapes = {n: tuple(p.shape) for n, p in gauges.params().items()}
    views = _AxisViews(gauges, shapes)
    frames: dict[str, _Frame] = {}

    def conflict(name: str, what: str, first: str, second: str) -> FrameConflictError:
        return FrameConflictError(
            f"parameter {name!r}: {what} ({first} and {second}); no gauge frame makes that exact. Drop one "
            f"of the families, e.g. with gaugeopt.optim.frames.compatible_gauges(gauges).")

    norm_parameters: dict[str, str] = {}
    for f in gauges:
        if isinstance(f, NormScaling):
            for name in (f.gain, f.bias):
                if name is None:
                    continue
                if name in norm_parameters:
                    raise conflict(name, "is a norm parameter of two families", norm_parameters[name], f.name)
                norm_parameters[name] = f.name
            frames[f.gain] = _Frame(f.gain, views.shape(f.gain), gain=True)
    for f in gauges:
        for name, axis, action, heads in _actions(f, shapes):
            frame = frames.setdefault(name, _Frame(name, views.shape(name)))
            if frame.gain:
                raise conflict(name, "is a norm gain (the frame of its channels) and is also acted on",
                               norm_parameters[name], f.name)
            if name in norm_parameters and norm_parameters[name] != f.name:
                raise conflict(name, "is a norm bias and is also acted on", norm_parameters[name], f.name)
            if isinstance(action, SharedAxis) and name in views.split:
                raise FrameConflictError(f"parameter {name!r}: a rotation ({f.name}) acts on a parameter whose axis "
                                         f"is cut into channel blocks; no gauge frame here makes that exact")
            axis = views.axis(name, axis)
            if axis in frame.actions:
                raise conflict(name, f"two families act on axis {axis}", frame.actions[axis][0], f.name)
            if isinstance(action, ScaledAxis) and action.kind is Scaling.NEURON:
                for other_axis, (other_family, other) in frame.actions.items():
                    if isinstance(other, ScaledAxis) and other.kind is Scaling.NEURON and other.side == action.side:
                        side = action.side.name.lower()
                        raise conflict(name, f"is on the {side} side of two neuron scalings", other_family, f.name)
            frame.actions[axis] = (f.name, action)
            if heads is not None:
                frame.heads = heads
    tensors = {name: frame.freeze() for name, frame in frames.items()}
    return FramePlan(tensors, _scaling_frames(gauges, tensors, views))


def _scaling_frames(gauges: GaugeSet, tensors: Mapping[str, TensorFrame], views: _AxisViews
                    ) -> dict[str, ScalingFrame]:
    """The scaling families with their chain links, norms first, then neurons in dependency order;
    their slices are read on the frames' views (one index per unit)."""
    def on_views(refs: Iterable[AxisRef]) -> tuple[AxisRef, ...]:
        return tuple(views.ref(r) for r in refs)

    norms = {f.name: ScalingFrame(f.name, Scaling.NORM, f.units, on_views(f.multiplied), on_views(f.divided), f.gain,
                                  f.bias, f.consumers)
             for f in gauges if isinstance(f, NormScaling)}
    neurons = [f for f in gauges if isinstance(f, NeuronScaling)]

    def linked(refs: Iterable[AxisRef], side: Side) -> tuple[str, ...]:
        found = []
        for ref in refs:
            for axis, scaled in tensors[ref.name].scaled:
                if axis != ref.axis and scaled.kind is Scaling.NEURON and scaled.side == side:
                    found.append(scaled.family)
        return tuple(dict.fromkeys(found))

    frames = {f.name: ScalingFrame(f.name, Scaling.NEURON, f.units, on_views(f.multiplied), on_views(f.divided),
                                   upstream=linked(on_views(f.multiplied), Side.DIVIDED),
                                   downstream=linked(on_views(f.divided), Side.MULTIPLIED))
              for f in neurons}
    ordered: list[str] = []
    remaining = {name: set(frame.upstream) for name, frame in frames.items()}
    while remaining:
        ready = [name for name, deps in remaining.items() if not deps - set(ordered)]
        if not ready:
            raise FrameConflictError(f"neuron scalings {sorted(remaining)} form a cycle; no gauge frame makes "
                                     f"that exact")
        for name in ready:
            ordered.append(name)
            del remaining[name]
    return {**norms, **{name: frames[name] for name in ordered}}


def compatible_gauges(gauges: GaugeSet, *, verbose: bool = True) -> tuple[GaugeSet, list[str]]:
    """The largest prefix-greedy subset of ``gauges`` that :func:`build_frame_plan` accepts.

    Families are kept in order; one that conflicts with those kept is dropped (and printed when
    ``verbose``). Returns a tuple: the reduced :class:`GaugeSet` (bound to the same model) and the
    names of the dropped families. An optimizer built on it is exact for the kept families only.
    """
    kept: list[GaugeFamily] = []
    dropped: list[str] = []
    for f in gauges:
        try:
            build_frame_plan(gauges.with_families([*kept, f]))
        except FrameConflictError as err:
            dropped.append(f.name)
            if verbose:
                print(f"compatible_gauges: dropping {f.name}: {err}")
            continue
        kept.append(f)
    return gauges.with_families(kept), dropped


# --------------------------------------------------------------------------------------------------
# Pure maps on stacked tensors (leading axis: the members of a batch)
# --------------------------------------------------------------------------------------------------


def unit_square_sums(t: Tensor, unit_axis: int, factors: Mapping[int, Tensor] = {}, *,
                     workspace: Tensor | None = None) -> Tensor:
    """Per unit, the sum of squares of the slices of stacked tensors ``t`` (batch axis 0) along
    ``unit_axis``, after multiplying each other axis ``a`` by ``factors[a]`` (shape ``(batch, size)``).
    Returns shape ``(batch, units)``. ``workspace`` (at least ``t.numel()`` elements of ``t``'s dtype)
    holds the weighted or squared entries when given, instead of a new tensor."""
    other = [a for a in range(1, t.dim()) if a != unit_axis]
    if not other and not factors:
        return t.square()
    scratch = workspace.view(-1)[:t.numel()].view(t.shape) if workspace is not None else None
    weighted, owned = t, False
    for axis, factor in factors.items():
        shape = [1] * t.dim()
        shape[0], shape[axis] = factor.shape[0], factor.shape[1]
        if owned:
            weighted = weighted.mul_(factor.reshape(shape))
        else:
            weighted = torch.mul(weighted, factor.reshape(shape), out=scratch) if scratch is not None \
                else weighted * factor.reshape(shape)
            owned = True
    if not other:
        return weighted.square_() if owned else weighted.square()
    if other == list(range(unit_axis + 1, t.dim())):  # reduced axes contiguous in memory: one pass
        return torch.linalg.vector_norm(weighted, dim=other).square()
    if owned:
        square = weighted.square_()
    else:
        square = torch.square(weighted, out=scratch) if scratch is not None else weighted.square()
    return square.sum(dim=other)  # a strided vector norm is several times slower on CPUs


def unit_inner_products(a: Tensor, b: Tensor, unit_axis: int, *, workspace: Tensor | None = None) -> Tensor:
    """Per unit, the inner product of the slices of stacked tensors ``a`` and ``b`` (batch axis 0)
    along ``unit_axis``: shape ``(batch, units)``. ``workspace`` (at least ``a.numel()`` elements of
    ``a``'s dtype) holds the products instead of a new tensor."""
    other = [axis for axis in range(1, a.dim()) if axis != unit_axis]
    if not other:
        return a * b
    # a product and a sum: on CPUs twice as fast as a batched matrix-vector product or vecdot
    scratch = workspace.view(-1)[:a.numel()].view(a.shape) if workspace is not None else None
    product = torch.mul(a, b, out=scratch) if scratch is not None else a * b
    return product.sum(dim=other)


class UnitFrames(NamedTuple):
    """The frames of a batch of neuron units (stacked ``(members, units)``, :func:`neuron_frames`)."""

    scale: Tensor  # s = u / |w~_in|, the frame (0 where frozen)
    incoming: Tensor  # |w~_in|^2, the canonical incoming side's squared norm
    outgoing: Tensor  # |w~_out|^2 = l^4 / |w~_in|^2
    frozen: Tensor  # the incoming side is zero (or not finite): no frame carries a step


def neuron_frames(forward_squares: Tensor, backward_squares: Tensor, edge_scale: float) -> UnitFrames:
    """The neuron frame ``s = u / |w~_in|`` from ``u^2`` (input side) and ``v^2`` (output side), with
    ``|w~_in|`` the section point of the unit's size ``l = sqrt(u v)``
    (:func:`~gaugeopt.gauges.unit_section`, constant ``edge_scale``).

    Under the gauge ``u -> a u``, ``v -> v / a``, so ``l`` is invariant and ``s -> a s``: the canonical
    sides ``u / s = |w~_in|`` and ``v s = |w~_out|`` are invariant. The frame is regular wherever
    ``u > 0``, a zero output side included (``s = u / c``); ``u = 0`` (or ``u^2`` not a normal float, or a
    non-finite side) is frozen, with ``s = 0``.
    """
    tiny = torch.finfo(forward_squares.dtype).tiny
    frozen = ~((forward_squares >= tiny) & finite_nonnegative(forward_squares) & finite_nonnegative(backward_squares))
    u2 = torch.where(frozen, 1.0, forward_squares)
    v2 = torch.where(frozen, 0.0, backward_squares)
    size = torch.sqrt(u2) * torch.sqrt(v2)  # l^2 = u v, without squaring u^2 v^2
    incoming, outgoing = unit_section(size, edge_scale)
    scale = torch.sqrt(u2 / incoming).masked_fill_(frozen, 0.0)
    return UnitFrames(scale, incoming, outgoing, frozen)


def frozen_gains(gains: Tensor) -> Tensor:
    """Norm channels whose gain cannot be a frame: zero (or below the smallest normal float, whose
    reciprocal overflows) or not finite. Zero is a property of the channel, not of where it lies on
    its orbit; any other gain, however small, is a valid frame."""
    magnitudes = gains.abs()
    return ~((magnitudes >= torch.finfo(gains.dtype).tiny) & finite_nonnegative(magnitudes))


def finite_nonnegative(values: Tensor) -> Tensor:
    """Where ``values`` that are ``>= 0`` or nan (norms, sums of squares, square roots) are finite:
    ``values <= the dtype's largest value``, false for inf and nan. One comparison where
    ``torch.isfinite`` dispatches four (``x == x``, ``|x|``, ``!= inf`` and their product), each a
    kernel launch on an accelerator."""
    return values <= torch.finfo(values.dtype).max
