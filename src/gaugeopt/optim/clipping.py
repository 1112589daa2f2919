"""Gradient clipping by a gauge-invariant norm.

``torch.nn.utils.clip_grad_norm_`` scales every gradient by ``max_norm / |G|`` when the global norm
``|G|`` exceeds ``max_norm``. That norm is not gauge invariant: rescaling a neuron (``a`` on its input
weights, ``1 / a`` on its output weights) multiplies the two gradients by ``1 / a`` and ``a``, so two
models that compute the same function clip by different factors, and an equivariant optimizer fed
clipped gradients is no longer equivariant.

:func:`clip_grad_norm_` measures the gradients in the frames of the optimizers instead
(:mod:`gaugeopt.optim.frames`): the canonical gradient ``G~ = P(G gamma)`` of every tensor (``gamma``
its gradient factor, ``P`` the centring of translated rows), and ``g dL/dg`` for a norm gain. Under
any gauge these are invariant or rotate (head rotations), so their norm is invariant; one common
factor ``min(1, max_norm / (norm + 1e-6))`` scales every raw gradient, as torch's does. Training with
it stays exactly equivariant. On FSDP2 shards each rank measures its own rows (the frames' sums
over the rows all-reduced, as in the optimizers' sharded step) and the ranks' norms are combined.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor

from ..gauges.families import EDGE_SCALE
from ..gauges.gaugeset import GaugeSet
from .distributed import sharded_parameters, whole_by_name
from .frames import FramePlan, build_frame_plan
from .program import build_program
from .shards import LOCAL, local_tensor
from .step import read_frames, step_inputs

__all__ = ["clip_grad_norm_", "gauge_invariant_grad_norm"]

_PLANS: weakref.WeakKeyDictionary[GaugeSet, FramePlan] = weakref.WeakKeyDictionary()


def _plan(gauges: GaugeSet | None) -> FramePlan:
    if gauges is None:
        return FramePlan({}, {})
    plan = _PLANS.get(gauges)
    if plan is None:
        plan = _PLANS[gauges] = build_frame_plan(gauges)
    return plan


def _check_gauges(gauges) -> None:
    if gauges is not None and not isinstance(gauges, GaugeSet):
        hint = (" (norm_type is the fourth argument: clip_grad_norm_(parameters, max_norm, gauges, norm_type), or "
                "pass it by keyword)") if isinstance(gauges, (int, float)) else ""
        raise TypeError(f"gauges must be a GaugeSet (from gaugeopt.find_gauges) or None, got "
                        f"{type(gauges).__name__} {gauges!r}{hint}")


@torch.no_grad()
def gauge_invariant_grad_norm(parameters: Tensor | Iterable[Tensor], gauges: GaugeSet | None = None,
                              norm_type: float = 2.0) -> Tensor:
    """The ``norm_type``-norm of the canonical gradients of ``parameters`` (module docstring); those
    without a gradient are left out. ``gauges=None`` gives the plain norm of the gradients."""
    _check_gauges(gauges)
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    lookup = gauges.params() if gauges is not None else {}
    names = {id(p): n for n, p in lookup.items()}
    plan = _plan(gauges)
    shards = sharded_parameters(params)  # FSDP2: each rank measures its rows; the gains are read whole
    whole = whole_by_name([f.gain for f in plan.norms], lookup, shards)
    collectives = shards.collectives if shards is not None else LOCAL
    layout = build_program([{"params": params}], names, lookup, plan, [None], channel_step=True,
                           edge_scale=EDGE_SCALE, ranks=shards.ranks if shards is not None else None)
    frames = read_frames(layout.program, step_inputs(layout, lookup, whole, collectives))
    parts = [t for canonical in frames.canonical for t in (canonical if isinstance(canonical, list) else [canonical])]
    parts += frames.scale_inputs
    parts += [local_tensor(p.detach()) * local_tensor(p.grad) for ps in layout.checked for p in ps]  # gains of
    # norms whose consumers have no gradient
    device = local_tensor(params[0].grad).device
    norms = [torch.linalg.vector_norm(t, norm_type).to(device=device, dtype=torch.float64) for t in parts if t.numel()]
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type) if norms else torch.zeros((), device=device,
                                                                                              dtype=torch.float64)
    if shards is not None:  # the ranks' norms of disjoint rows combined (a max for the inf-norm)
        if math.isinf(norm_type):
            (each,) = collectives.sum([torch.zeros(shards.world, dtype=total.dtype, device=device)
                                       .index_fill_(0, torch.tensor([shards.rank], device=device), total)])
            total = each.max()
        else:
            (power,) = collectives.sum([total.pow(norm_type).reshape(1)])
            total = power[0].pow(1.0 / norm_type)
    return total


@torch.no_grad()
def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float, gauges: GaugeSet | None = None,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: bool | None = None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with the gauge-invariant norm of the gradients of ``gauges``'
    model: scale every gradient by ``min(1, max_norm / (norm + 1e-6))``; return that norm.

    Torch's signature with ``gauges`` third, so ``gaugeopt.clip_grad_norm_(model.parameters(), 1.0,
    gauges)`` replaces ``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)``.

    Args:
        parameters: the tensors whose gradients are clipped (a tensor or an iterable).
        max_norm: the largest norm the canonical gradients may have.
        gauges: the model's :class:`~gaugeopt.gauges.GaugeSet` (the one the optimizer was given);
            ``None`` (default) clips by the plain norm, like torch.
        norm_type: the p of the p-norm (``float("inf")`` for the largest entry).
        error_if_nonfinite: raise ``RuntimeError`` when the norm is NaN or infinite (else those
            gradients are scaled by a NaN factor, as torch does).
        foreach: scale the gradients with torch's foreach kernels, as torch: ``None`` where the
            device supports them, ``True`` always (``RuntimeError`` where it cannot), ``False`` one
            by one. Under FSDP2 each rank scales its own rows.

    Returns:
        The norm of the canonical gradients before clipping, a float64 scalar tensor.
    """
    max_norm = float(max_norm)
    if not max_norm >= 0:
        raise ValueError(f"max_norm must be a number >= 0, got {max_norm}")
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    total = gauge_invariant_grad_norm(params, gauges, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the canonical gradients is non-finite, so they "
                           f"cannot be clipped; pass error_if_nonfinite=False to scale them anyway")
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach)  # torch's scaling (FSDP2: each rank's rows)
    return total
