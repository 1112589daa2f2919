"""Test helpers users can run on their own models and optimizers.

:func:`check_equivariance` measures how far an optimizer is from gauge equivariance (ddc.md R2):
it trains a copy of the model from ``theta_0`` and another from ``g . theta_0`` on the same batches,
and compares ``g . theta_t`` with the second trajectory at every step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .gauges.gaugeset import GaugeSet, GroupElement
from .optim.distributed import full_tensor

__all__ = ["EquivarianceResult", "check_equivariance", "check_equivariance_per_family", "relative_error"]

MakeOptimizer = Callable[[nn.Module, GaugeSet], torch.optim.Optimizer]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
Prepare = Callable[[nn.Module], Any]


@dataclass(frozen=True)
class EquivarianceResult:
    """Outcome of :func:`check_equivariance`.

    ``error``: the largest over steps of ``|g.theta_t - theta'_t| / |theta'_t|``, all parameters
    taken as one vector (:func:`relative_error`); ``per_step``: that error after each step;
    ``worst_step``: where the maximum was reached, ``worst_parameter``: the tensor contributing most
    to it there; ``displacement``: the same measure between
    ``theta_0`` and ``g . theta_0`` (how far the element moves the start: a check that it is not the
    identity); ``element``: the group element used. ``float(result)`` is ``error``.
    """

    error: float
    per_step: tuple[float, ...]
    worst_parameter: str
    worst_step: int
    displacement: float
    element: GroupElement

    def __float__(self) -> float:
        return self.error


def relative_error(a: nn.Module | dict[str, torch.Tensor], b: nn.Module | dict[str, torch.Tensor]) -> tuple[float, str]:
    """``|a - b| / |b|`` over all parameters taken as one vector (0 when both are zero), and the name
    of the parameter contributing most to ``|a - b|``.

    One vector rather than a maximum over tensors: a tensor the loss does not see (a key bias under a
    softmax, a pure gauge direction) has an exactly zero gradient, so Adam-type optimizers move it by
    rounding noise; its own relative error is meaningless while its share of the whole is not.
    Sharded (FSDP2 ``DTensor``) parameters are gathered first (a collective: call it on every rank).
    """
    pa = dict(a.named_parameters()) if isinstance(a, nn.Module) else a
    pb = dict(b.named_parameters()) if isinstance(b, nn.Module) else b
    pa, pb = ({n: full_tensor(p) for n, p in params.items()} for params in (pa, pb))
    names = list(pa)
    if not names:
        return 0.0, ""
    with torch.no_grad():
        diffs = torch.stack([torch.linalg.vector_norm(pa[n] - pb[n]).double() for n in names])
        refs = torch.stack([torch.linalg.vector_norm(pb[n]).double() for n in names])
        diff, ref = diffs.norm().item(), refs.norm().item()
        where = names[int(torch.nan_to_num(diffs, nan=float("inf")).argmax())]
    if ref == 0.0:
        return (0.0 if diff == 0.0 else float("inf")), where
    return diff / ref, where


def _batch_source(batches: Sequence | Iterable, steps: int) -> Callable[[int], Any]:
    if isinstance(batches, Sequence) and not isinstance(batches, (str, bytes)):
        if len(batches) == 0:
            raise ValueError("batches is empty")
        return lambda t: batches[t % len(batches)]
    iterator: Iterator = iter(batches)

    def next_batch(t: int) -> Any:
        try:
            return next(iterator)
        except StopIteration:
            raise ValueError(f"batches ran out after {t} of {steps} steps; pass a sequence (it is cycled)") from None

    return next_batch


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, batch: Any, seed: int) -> float:
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # identical randomness (dropout masks) in both runs
        loss = loss_fn(model, batch)
    if not torch.is_tensor(loss) or loss.dim() != 0:
        raise TypeError("loss_fn(model, batch) must return a scalar tensor")
    loss.backward()
    optimizer.step()
    return loss.item()


def check_equivariance(
    make_optimizer: MakeOptimizer,
    model: nn.Module,
    gauges: GaugeSet,
    batches: Sequence | Iterable,
    loss_fn: LossFn,
    steps: int = 50,
    element: GroupElement | None = None,
    *,
    families: str | Iterable[str] | None = None,
    seed: int = 0,
    spread: float = 0.5,
    prepare: Prepare | None = None,
) -> EquivarianceResult:
    """How far ``make_optimizer``'s optimizer is from equivariance under ``gauges`` (ddc.md R2).

    Two deep copies of ``model`` are trained for ``steps`` steps on the same batches: the reference
    from ``model``'s parameters theta_0, the other from ``g . theta_0`` (``gauges.apply`` with the
    group element ``element``). After every step the reference is mapped through g and compared with
    the other run, over all parameters (see :class:`EquivarianceResult`). ``model`` is not changed.

    Args:
        make_optimizer: ``make_optimizer(model, gauges) -> torch.optim.Optimizer``, called once per
            copy with that copy and ``gauges`` re-bound to it (``gauges.bind(copy)``); e.g.
            ``lambda m, g: gaugeopt.DDCAdam(m.parameters(), g, lr=1e-3, weight_decay=0.1)`` or
            ``lambda m, g: torch.optim.AdamW(m.parameters(), lr=1e-3)``.
        model: the model (use float64 for a tight measurement; put it in the mode you train in: any
            randomness in ``loss_fn`` is seeded identically in both runs).
        gauges: its :class:`~gaugeopt.gauges.GaugeSet` (``gaugeopt.find_gauges(model, ...)``).
        batches: a sequence (cycled) or an iterable of at least ``steps`` batches.
        loss_fn: ``loss_fn(model, batch) -> scalar loss tensor``.
        steps: optimizer steps per run.
        element: the group element ``{family name: element}``; by default a random one from
            ``gauges.sample`` over ``families`` (default: all, i.e. their product) with ``seed`` and
            ``spread``.
        prepare: called on each trained copy (after the element is applied, before its optimizer
            is made), e.g. ``lambda m: fully_shard(m, mesh=mesh)`` to run the check under FSDP2 on
            every rank (``loss_fn`` then sees the rank's own part of each batch).

    Returns:
        :class:`EquivarianceResult`; ``result.error`` (or ``float(result)``) is the relative error.
    """
    if element is None:
        element = gauges.sample(torch.Generator().manual_seed(seed), families=families, spread=spread)
    elif families is not None:
        raise ValueError("pass either element or families, not both")
    return _run_lockstep(make_optimizer, model, gauges, batches, loss_fn, steps, {"element": element}, seed,
                         prepare)["element"]


def check_equivariance_per_family(
    make_optimizer: MakeOptimizer,
    model: nn.Module,
    gauges: GaugeSet,
    batches: Sequence | Iterable,
    loss_fn: LossFn,
    steps: int = 50,
    *,
    kinds: Iterable[str] | None = None,
    product: bool = True,
    seed: int = 0,
    spread: float = 0.5,
    prepare: Prepare | None = None,
) -> dict[str, EquivarianceResult]:
    """:func:`check_equivariance` for a random element of every gauge kind of ``gauges`` (all families
    of that kind at once) and, with ``product``, of the product of all families (key ``"product"``).

    The reference run is shared: one reference and one transformed run per element, trained in
    lockstep. Arguments as in :func:`check_equivariance`; returns ``{kind or "product": result}``.
    """
    chosen = list(gauges.kinds if kinds is None else kinds)
    generator = torch.Generator().manual_seed(seed)
    elements = {kind: gauges.sample(generator, families=kind, spread=spread) for kind in chosen}
    if product:
        elements["product"] = gauges.sample(generator, spread=spread)
    if not elements:
        raise ValueError("no gauge kinds to check: the GaugeSet is empty and product=False")
    return _run_lockstep(make_optimizer, model, gauges, batches, loss_fn, steps, elements, seed, prepare)


def _run_lockstep(make_optimizer: MakeOptimizer, model: nn.Module, gauges: GaugeSet, batches, loss_fn: LossFn,
                  steps: int, elements: dict[str, GroupElement], seed: int,
                  prepare: Prepare | None = None) -> dict[str, EquivarianceResult]:
    """Train a reference copy and one transformed copy per element on the same batches; compare."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    gauges = gauges.bind(model) if gauges.model is not model else gauges
    for element in elements.values():
        unknown = set(element) - {f.name for f in gauges}
        if unknown:
            raise ValueError(f"element names families the GaugeSet does not have: {sorted(unknown)}")

    prepare = prepare or (lambda m: None)
    reference, mapped = copy.deepcopy(model), copy.deepcopy(model)
    runs = {}
    for label, element in elements.items():
        transformed = copy.deepcopy(model)
        gauges.apply(transformed, element)
        prepare(transformed)
        runs[label] = (transformed, make_optimizer(transformed, gauges.bind(transformed)))
    prepare(reference)
    reference_optimizer = make_optimizer(reference, gauges.bind(reference))
    displacement = {label: relative_error(reference, m)[0] for label, (m, _) in runs.items()}
    next_batch = _batch_source(batches, steps)
    mapped_params = dict(mapped.named_parameters())

    per_step: dict[str, list[float]] = {label: [] for label in runs}
    worst = {label: (-1.0, "", 0) for label in runs}
    for t in range(steps):
        batch = next_batch(t)
        step_seed = seed * 1_000_003 + t
        _train_step(reference, reference_optimizer, loss_fn, batch, step_seed)
        for label, (transformed, optimizer) in runs.items():
            _train_step(transformed, optimizer, loss_fn, batch, step_seed)
            with torch.no_grad():
                for name, p in reference.named_parameters():
                    mapped_params[name].copy_(full_tensor(p))
                gauges.apply(mapped, elements[label])
            err, name = relative_error(mapped, transformed)
            per_step[label].append(err)
            if not err <= worst[label][0]:
                worst[label] = (err, name, t + 1)
    return {
        label: EquivarianceResult(worst[label][0], tuple(per_step[label]), worst[label][1], worst[label][2],
                                  displacement[label], elements[label])
        for label in runs
    }
