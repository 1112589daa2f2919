"""DDCAdam's gauge-carrying updates as whole pure functions, for ``DDCAdam(fused=True)``.

The eager step (:class:`~gaugeopt.optim.DDCAdam`) runs each frame map, moment update and retraction
as its own pass over memory: a neuron pair costs some thirty passes where AdamW's multi-tensor step
costs about ten. Here each gauge-carrying tensor outside a pair is stepped by *one* function from the
raw parameter, gradient and state to the written parameter (:func:`framed_adam_update_`), and each
neuron pair by three passes over each member tensor (:func:`pair_adam_update_`), built from the same
pure maps as the eager step (:func:`~gaugeopt.optim.gauge_frames.enter_frame`,
:func:`~gaugeopt.optim.gauge_frames.chart_scalars`,
:func:`~gaugeopt.optim.gauge_frames.retract_coefficients`,
:func:`~gaugeopt.optim.gauge_frames.leave_frame`, :func:`~gaugeopt.optim.gauge_frames.adam_moments_`).
``torch.compile`` turns each into one or a few fused loops (:func:`compiled`); run eagerly they give
the same numbers as the eager step up to rounding (tests/test_ddc_adam_fused.py checks both).

Scalars that change between steps (learning rate, decay, bias corrections) are 0-d tensors
(:class:`AdamScalars`), graph inputs of the compiled functions: a scheduler changing them does not
recompile. The structure (frame roles, axes, betas, thresholds, tensor shapes) is made of constants;
each new structure compiles one graph with static shapes (:func:`compiled`).
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .gauge_frames import (
    PairFrame,
    adam_moments_,
    center_rows,
    chart_scalars,
    enter_frame,
    from_unit_slices,
    leave_frame,
    retract_coefficients,
    scale_columns,
    unit_slices,
)

__all__ = ["AdamScalars", "PairMember", "framed_adam_update_", "pair_entry_sums", "pair_adam_update_",
           "column_inner", "unit_inner", "compiled"]


class AdamScalars(NamedTuple):
    """Per-tensor scalars of one Adam step at step count ``t``, as 0-d tensors (so that a compiled
    update takes them as inputs and a new value does not recompile it): ``lr``; ``decay = 1 - lr wd``;
    ``denominator_scale = c1 / sqrt(c2)`` and ``denominator_shift = eps c1`` with ``c1 = 1 - b1^t``,
    ``c2 = 1 - b2^t``, so that the Adam direction is ``m / (sqrt(v) denominator_scale +
    denominator_shift)`` = ``(m / c1) / (sqrt(v / c2) + eps)``."""

    lr: Tensor
    decay: Tensor
    denominator_scale: Tensor
    denominator_shift: Tensor

    @classmethod
    def at(cls, step: float, lr: float, weight_decay: float, beta1: float, beta2: float, eps: float, *,
           device: torch.device) -> AdamScalars:
        c1 = 1 - beta1**step
        values = (lr, 1 - lr * weight_decay, c1 / math.sqrt(1 - beta2**step), eps * c1)
        return cls(*torch.tensor(values, dtype=torch.float64, device=device).unbind())

    def direction(self, exp_avg: Tensor, exp_avg_sq: Tensor) -> Tensor:
        """The bias-corrected Adam direction ``m / (sqrt(v) denominator_scale + denominator_shift)``."""
        return exp_avg / (exp_avg_sq.sqrt() * self.denominator_scale + self.denominator_shift)


def _adam_direction_(x: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, betas: tuple[float, float],
                     scalars: AdamScalars, shared_axes: Sequence = ()) -> Tensor:
    """Advance ``m, v`` on ``x`` in place (second moments shared over ``shared_axes``); return
    ``m / (sqrt(v) c1 / sqrt(c2) + eps c1)``."""
    adam_moments_(x, exp_avg, exp_avg_sq, betas[0], betas[1], shared_axes)
    return scalars.direction(exp_avg, exp_avg_sq)


def column_inner(param: Tensor, grad: Tensor, *, centered: bool, dtype: torch.dtype) -> Tensor:
    """Per column, ``sum_i G_ij C_ij`` of a norm gain's consumer ``C`` (less ``(sum_i G_ij)(sum_i C_ij) /
    rows`` when its rows are centered): the norm-scale step's input ``h_j = sum_i G~_ij W~_ij`` in the
    frame, up to the factor ``decay`` and zeros on dead channels (the gain cancels: ``G~ W~ = decay G C``
    entrywise, and the centered gradient sums to zero over rows, so only the mean row's share drops).

    Eager column sums: one pass over ``G`` and ``C``, where a compiled column reduction walks the
    matrix at a stride. A non-finite gradient entry makes its column's sum non-finite."""
    p, g = param.detach().to(dtype), grad.to(dtype)
    h = torch.linalg.vecdot(g, p, dim=0)
    if centered:
        h = h - g.sum(dim=0) * p.sum(dim=0) / p.shape[0]
    return h


def framed_adam_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, gain: Tensor | None,
                        channel_factors: Tensor | None, scalars: AdamScalars, *, role: str, merged: bool,
                        centered: bool, shared_axes: tuple, betas: tuple[float, float], threshold: float) -> None:
    """One DDCAdam step of a gauge-carrying tensor outside any neuron pair, in place.

    In the frame (:func:`~gaugeopt.optim.gauge_frames.enter_frame`): ``W~ <- W~ - lr A(G~)`` with the
    Adam direction ``A`` centered over rows for a translation gauge and its second moments shared
    over the rotated blocks of ``shared_axes``; then the merged columns are multiplied by the norm
    channels' ``channel_factors`` (``exp(-lr r)``, or ``None``) and the result is lifted back."""
    entry = enter_frame(param, grad, gain, role=role, merged=merged, centered=centered, decay=scalars.decay,
                        threshold=threshold, dtype=exp_avg.dtype)
    direction = _adam_direction_(entry.grad, exp_avg, exp_avg_sq, betas, scalars, shared_axes)
    if centered:
        direction = center_rows(direction)
    value = entry.value - scalars.lr * direction
    if channel_factors is not None:
        value = value.mul_(channel_factors.reshape(1, -1))
    leave_frame(param, value, entry)


class PairMember(NamedTuple):
    """One tensor of a neuron pair: its unit ``axis``, whether its columns are merged with a norm gain
    and whether its rows are centered (a translation gauge on the other axis)."""

    axis: int
    merged: bool
    centered: bool = False


#: Rows summed per block when per-unit sums run down the columns of a matrix (:func:`unit_inner`).
COLUMN_BLOCK = 64


def unit_inner(a: Tensor, b: Tensor, axis: int) -> Tensor:
    """Per index along ``axis`` (a unit), the sum of ``a * b`` over every other axis.

    Along axis 0 this is a row dot product. Along axis 1 of a matrix (a consumer's columns) it is a
    column sum, which a compiled CPU loop walking one column block down all rows does at a large
    stride; summing blocks of :data:`COLUMN_BLOCK` rows first keeps the walk short (about 2x faster
    measured on a 2048 x 512 matrix). Same sums, in another order."""
    if axis == 1 and a.dim() == 2:
        rows, cols = a.shape
        product = a * b
        if rows % COLUMN_BLOCK == 0 and rows > COLUMN_BLOCK:
            return product.view(rows // COLUMN_BLOCK, COLUMN_BLOCK, cols).sum(1).sum(0)
        return product.sum(0)
    return torch.linalg.vecdot(unit_slices(a, axis), unit_slices(b, axis), dim=1)


def pair_entry_sums(param: Tensor, grad: Tensor, gain: Tensor | None, decay: Tensor, *, axis: int, merged: bool,
                    centered: bool, threshold: float, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1 over a pair member (read only): per unit ``|P|^2`` and ``<G, P>`` in the frame, and
    whether the raw gradient is finite (the step's guard reads it here rather than in a pass of its own)."""
    entry = enter_frame(param, grad, gain, role="tensor", merged=merged, centered=centered, decay=decay,
                        threshold=threshold, dtype=dtype)
    P, G = entry.value, entry.grad
    return unit_inner(P, P, axis), unit_inner(G, P, axis), torch.isfinite(grad).all()


def _pair_moments_(param: Tensor, grad: Tensor, gain: Tensor | None, exp_avg: Tensor, exp_avg_sq: Tensor,
                   grad_coefficient: Tensor, value_coefficient: Tensor, factors: Tensor | None, scalars: AdamScalars,
                   *, axis: int, merged: bool, centered: bool, betas: tuple[float, float],
                   threshold: float) -> tuple[Tensor, ...]:
    """Pass 2: the member's moments advance on its tangential input ``x = a G + b P`` (per-unit
    coefficients); returns per unit ``<u, P>`` and ``|u|^2`` of its Adam direction ``u`` (and
    ``<u f^2, P>``, ``<u f^2, u>``, ``|P f|^2`` with channel ``factors`` f)."""
    entry = enter_frame(param, grad, gain, role="tensor", merged=merged, centered=centered, decay=scalars.decay,
                        threshold=threshold, dtype=exp_avg.dtype)
    P, G = unit_slices(entry.value, axis), unit_slices(entry.grad, axis)
    x = G * grad_coefficient.unsqueeze(1) + P * value_coefficient.unsqueeze(1)
    direction = _adam_direction_(from_unit_slices(x, axis, entry.value.shape), exp_avg, exp_avg_sq, betas, scalars)
    if centered:
        direction = center_rows(direction)
    value = entry.value
    sums = (unit_inner(direction, value, axis), unit_inner(direction, direction, axis))
    if factors is None:
        return sums
    squares = factors * factors
    weighted = scale_columns(direction, squares)
    return (*sums, unit_inner(weighted, value, axis), unit_inner(weighted, direction, axis),
            unit_inner(scale_columns(value, squares), value, axis))


def _pair_write_(param: Tensor, gain: Tensor | None, exp_avg: Tensor, exp_avg_sq: Tensor, value_coefficient: Tensor,
                 direction_coefficient: Tensor, factors: Tensor | None, dead: Tensor, scalars: AdamScalars, *,
                 axis: int, merged: bool, centered: bool, threshold: float) -> None:
    """Pass 3: ``P <- alpha P + beta u`` per unit (then times the channel ``factors``), lifted back
    into ``param``; dead units and channels are left as they were."""
    entry = enter_frame(param, None, gain, role="tensor", merged=merged, centered=centered, decay=scalars.decay,
                        threshold=threshold, dtype=exp_avg.dtype)
    direction = scalars.direction(exp_avg, exp_avg_sq)
    if centered:
        direction = center_rows(direction)
    new = (unit_slices(entry.value, axis) * value_coefficient.unsqueeze(1)
           + unit_slices(direction, axis) * direction_coefficient.unsqueeze(1))
    value = from_unit_slices(new, axis, entry.value.shape)
    if factors is not None:
        value = scale_columns(value, factors)
    frozen = from_unit_slices(dead.unsqueeze(1).expand_as(new), axis, entry.value.shape)
    leave_frame(param, value, entry, frozen)


def pair_adam_update_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                      gains: list[Tensor | None], channel_factors: list[Tensor | None], scalars: list[AdamScalars],
                      radial_exp_avg: Tensor, radial_exp_avg_sq: Tensor, radial_scalars: AdamScalars, *,
                      members: tuple[PairMember, ...], n_multiplied: int, betas: tuple[float, float],
                      threshold: float, frame: PairFrame, hold_ratio: bool,
                      firsts: list[tuple[Tensor, ...]] | None = None,
                      kernel: Callable[[Callable], Callable] | None = None) -> Tensor:
    """One DDCAdam step of a neuron pair family (all its units at once), in place; returns the dead units.

    The first ``n_multiplied`` members form side 1 (``P1``: producer rows and bias), the rest side 2
    (``P2``: consumer columns), each in its frame (a norm merge, centered rows). The step is the eager one
    (:func:`~gaugeopt.optim.gauge_frames.pair_chart`, per-coordinate Adam on the tangential inputs, a
    scalar Adam per unit on the radial input with state ``radial_exp_avg[_sq]`` bias-corrected by
    ``radial_scalars``, :func:`~gaugeopt.optim.gauge_frames.pair_retract`, the merged columns times
    their ``channel_factors``, and with ``hold_ratio`` the neuron gauge element that puts
    ``log(|P1| / |P2|)`` back to its value at entry), computed in three passes over each member:

    1. per unit ``|P_k|^2``, ``<G_k, P_k>`` (:func:`pair_entry_sums`): the chart's scalars
       (:func:`~gaugeopt.optim.gauge_frames.chart_scalars`);
    2. the moments advance on ``x_k``; per unit ``<u_k, P_k>``, ``|u_k|^2``: the retraction's
       coefficients (:func:`~gaugeopt.optim.gauge_frames.retract_coefficients`), and the new side
       norms in closed form, ``|alpha P + beta u|^2 = alpha^2 |P|^2 + 2 alpha beta <u, P> + beta^2 |u|^2``
       (with the factors f weighting the columns), which gives the held ratio's correction;
    3. ``P_k <- alpha_k P_k + beta_k u_k`` written back.

    Each pass is a function of one member that ``kernel`` (default :func:`compiled`; the identity
    runs it eagerly) turns into one fused loop; the per-unit algebra between passes is eager. ``firsts``
    are the members' pass-1 results (:func:`pair_entry_sums`) when the caller has them already.
    """
    kernel = compiled if kernel is None else kernel
    dtype = exp_avgs[0].dtype
    sides = (range(0, n_multiplied), range(n_multiplied, len(members)))
    factors = [f if hold_ratio else None for f in channel_factors]  # weights of the closed-form side norms
    if firsts is None:
        firsts = [kernel(pair_entry_sums)(p, g, gain, s.decay, **m._asdict(), threshold=threshold, dtype=dtype)
                  for p, g, gain, s, m in zip(params, grads, gains, scalars, members)]

    def total(sums: list[tuple[Tensor, ...]], k: int, side: range) -> Tensor:
        return sum(sums[i][k] for i in side)

    chart = chart_scalars(total(firsts, 0, sides[0]), total(firsts, 0, sides[1]), total(firsts, 1, sides[0]),
                          total(firsts, 1, sides[1]), threshold, frame)
    radial_input, _ = chart.radial_vertical()
    adam_moments_(radial_input, radial_exp_avg, radial_exp_avg_sq, betas[0], betas[1])
    radial = radial_scalars.direction(radial_exp_avg, radial_exp_avg_sq)
    coefficients = (chart.tangent_coefficients(1), chart.tangent_coefficients(2))
    seconds = [kernel(_pair_moments_)(p, g, gain, m, v, *coefficients[0 if i < n_multiplied else 1], f, s,
                                      **member._asdict(), betas=betas, threshold=threshold)
               for i, (p, g, gain, m, v, f, s, member) in enumerate(zip(params, grads, gains, exp_avgs, exp_avg_sqs,
                                                                          factors, scalars, members))]
    to_direction = (chart.live / chart.safe1, chart.live / chart.safe2)  # d_k = P_k * to_direction_k
    (d1, t1), (d2, t2) = retract_coefficients(
        chart.rho1, chart.rho2, chart.live, chart.length, radial, scalars[0].lr,
        total(seconds, 0, sides[0]) * to_direction[0], total(seconds, 1, sides[0]),
        total(seconds, 0, sides[1]) * to_direction[1], total(seconds, 1, sides[1]))
    alphas, betas_ = [d1 * to_direction[0], d2 * to_direction[1]], [t1, t2]
    if hold_ratio:
        def new_square(k: int) -> Tensor:  # |alpha P f + beta u f|^2 summed over the side's members
            alpha, beta = alphas[k], betas_[k]
            parts = []
            for i in sides[k]:
                weighted = factors[i] is not None
                PP = seconds[i][4] if weighted else firsts[i][0]
                uP, uu = seconds[i][2 if weighted else 0], seconds[i][3 if weighted else 1]
                parts.append(alpha * alpha * PP + 2 * alpha * beta * uP + beta * beta * uu)
            return sum(parts)

        held = torch.log(chart.rho1) - torch.log(chart.rho2)
        correction = torch.exp(0.5 * held - 0.25 * (torch.log(new_square(0)) - torch.log(new_square(1))))
        correction = torch.where(torch.isfinite(correction), correction, torch.ones_like(correction))
        alphas, betas_ = [alphas[0] * correction, alphas[1] / correction], [betas_[0] * correction, betas_[1] / correction]
    for i, (p, gain, m, v, f, s, member) in enumerate(zip(params, gains, exp_avgs, exp_avg_sqs, channel_factors,
                                                          scalars, members)):
        k = 0 if i < n_multiplied else 1
        kernel(_pair_write_)(p, gain, m, v, alphas[k], betas_[k], f, chart.dead, s, **member._asdict(),
                             threshold=threshold)
    return chart.dead


def _structure(value: Any) -> Hashable:
    """The constant part of an argument: a tensor (a graph input) reduces to its shape, dtype and
    device; ``None`` and other constants stay."""
    if isinstance(value, Tensor):
        return tuple(value.shape), value.dtype, value.device.type
    if isinstance(value, (tuple, list)):
        return tuple(_structure(v) for v in value)
    return value


class _CompiledUpdate:
    """``torch.compile`` of an update, with one copy of its code per call structure.

    A structure is the constant keyword arguments, which positional arguments are ``None`` and the
    shapes, dtypes and devices of the tensors. Each gets its own copy of the code, hence its own graph
    cache, compiled for static shapes: dynamic-shape kernels measured 20 to 30 % slower here, and torch
    keeps at most ``recompile_limit`` (8) graphs per code object, past which it would run the function
    eagerly; a model has more structures than that. torch's global configuration is left alone."""

    def __init__(self, update: Callable):
        self.update = update
        self.kernels: dict[Hashable, Callable] = {}
        functools.update_wrapper(self, update)

    def __call__(self, *args, **kwargs):
        key = (tuple(a is None for a in args), tuple((k, _structure(v)) for k, v in sorted(kwargs.items())))
        kernel = self.kernels.get(key)
        if kernel is None:
            f = self.update
            copy = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
            copy.__kwdefaults__ = f.__kwdefaults__
            kernel = self.kernels[key] = torch.compile(copy, dynamic=False)
        return kernel(*args, **kwargs)


@functools.cache
def compiled(update: Callable) -> Callable:
    """``update`` compiled by ``torch.compile``: one graph per call structure, made once per process."""
    return _CompiledUpdate(update)
