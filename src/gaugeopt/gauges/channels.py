"""Channel scalings of convolutional networks (one analysis of :mod:`.discovery`).

A *channel producer* writes the channels of a feature map ``(N, C, *spatial)`` (channel axis 1):
a convolution (output channel ``o``: row ``o`` of its weight and its bias entry) or an affine
channel norm (BatchNorm, GroupNorm, InstanceNorm: gain ``gamma_c`` and bias ``beta_c``, since
``y_c = gamma_c xhat_c + beta_c`` in train and eval mode alike). Multiplying producer channel ``c``
by ``a_c > 0`` multiplies channel ``c`` of the map by ``a_c``. The scaling is followed forward
through maps that commute with a positive per-channel factor,

    relu(a x) = a relu(x),  leaky_relu(a x) = a leaky_relu(x),  dropout, identity,
    maxpool(a x) = a maxpool(x),  avgpool / adaptive avgpool / sums and means over spatial axes,
    multiplication by a factor that does not depend on the scaled maps,

through reshapes that keep the channel axis (``flatten(1)`` turns channel ``c`` of ``(N, C, *S)``
into the block of columns ``c * prod(S) ... (c + 1) * prod(S) - 1``), and it must end in the layers
that absorb it, whose weights are divided by ``a_c``:

    a convolution reading the map: input channel ``c`` is column ``c`` (axis 1) of its weight
    (``groups == 1``); a Linear reading the flattened map: channel ``c``'s block of columns.

**Residual adds.** ``x + y`` carries the scaling only if both operands carry the same one: the
other operand is followed *backwards* (through the same maps) to its producers, which join the
family (their channels are multiplied by the same ``a``), and everything they feed is followed
forward in turn. A family is thus the closure of producers and consumers that a residual stream
ties together (all blocks of a ResNet stage, with the stem or the shortcut's norm). If any branch
cannot carry the scaling (a model input, a map that does not commute with it) nothing of the
closure is claimed, and the reason is recorded.

**Left out, with the reason** (``GaugeSet.skipped``): a producer that feeds a BatchNorm or
InstanceNorm (the norm divides the scale out only up to ``eps`` in train mode, and not at all in
eval mode, which uses the running statistics: an approximate invariance, not a gauge) or a
GroupNorm (whose statistics mix the channels of a group); maps that are not positively homogeneous
(ReLU6 clips at 6, GELU, SiLU, sigmoid, ...); a concatenation along the channel axis (the consumer's
columns for one input are a sub-range of an axis shared with the other inputs, which the
optimizers' frames do not represent); grouped convolutions as consumers (input channel ``c`` is read
by the rows of its group only, not by a slice of one axis; a depthwise conv's slice is its own
output row, which carries its own output scaling); reshapes that move the channel axis; model outputs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .families import AxisRef, NeuronScaling
from .gaugeset import Skipped

__all__ = ["CONVOLUTIONS", "CHANNEL_NORMS", "channel_families", "is_channel_layer", "norm_absorption_reason"]

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVOLUTIONS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
KIND = "channel_scale"

_ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_, F.leaky_relu, F.leaky_relu_, F.dropout,
                          F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout}
_ELEMENTWISE_METHODS = {"relu", "relu_", "contiguous", "clone"}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                   F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_CLIPPING_MODULES = (nn.ReLU6, nn.Hardtanh)
_CLIPPING_FUNCTIONS = {F.relu6, F.hardtanh}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten}
_REDUCTION_METHODS = {"mean", "sum", "amax"}
_REDUCTION_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
_SUMS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_SUM_METHODS = {"add", "add_", "sub", "sub_"}
_PRODUCTS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
_PRODUCT_METHODS = {"mul", "mul_", "div", "div_"}


def is_channel_layer(module: nn.Module | None) -> bool:
    """A convolution or a channel norm: the layers this analysis (not the last-axis one) handles."""
    return isinstance(module, (*CONVOLUTIONS, *TRANSPOSED_CONVOLUTIONS, *CHANNEL_NORMS))


def norm_absorption_reason(module: nn.Module, site: str) -> str:
    """Why a positive per-channel scale entering the channel norm ``module`` is not a gauge."""
    if isinstance(module, nn.GroupNorm) and module.num_groups != module.num_channels:
        return (f"it feeds the GroupNorm {site}, whose statistics mix the {module.num_channels // module.num_groups} "
                "channels of each group: a per-channel scale is not divided out")
    name = type(module).__name__
    return (f"it feeds the {name} {site}, which divides a channel's scale out only up to eps in train mode "
            f"(x / sqrt(var + eps)) and not at all in eval mode (running statistics): approximately scale "
            f"invariant, not a gauge, so it is not claimed (AdamP/SGDP exploit this invariance)")


@dataclass(frozen=True)
class _Layout:
    """Where the channels of a scaled tensor are: axis 1 of an ``ndim``-dimensional map; for a 2-D
    tensor, channel ``c`` owns columns ``c * inner ... (c + 1) * inner - 1``."""

    ndim: int
    inner: int = 1


class _Unclaimed(Exception):
    """The closure cannot be claimed; the message says why."""


def _describe(n: fx.Node) -> str:
    return f"{n.op} {getattr(n.target, '__name__', str(n.target))} ({n.name})"


def _normalized_dims(dim: Any, ndim: int) -> list[int] | None:
    if dim is None:
        return None
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return [d + ndim if d < 0 else d for d in dims]


def _is_input(n: fx.Node) -> bool:
    """A placeholder, or an entry of one (the tracer passes inputs as one ``*args`` tuple)."""
    while n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n.op == "placeholder"


@dataclass
class _Closure:
    """A family under construction: producers, scaled nodes with their layouts, consumers."""

    graph: Any  # discovery._Graph
    producers: list[fx.Node] = field(default_factory=list)
    scaled: dict[fx.Node, _Layout] = field(default_factory=dict)
    sinks: list[tuple[fx.Node, AxisRef]] = field(default_factory=list)
    factors: list[fx.Node] = field(default_factory=list)
    forward: list[fx.Node] = field(default_factory=list)

    # --- what a node is ----------------------------------------------------------------------------
    def shape(self, n: fx.Node) -> tuple[int, ...]:
        shape = self.graph.shape(n)
        if shape is None:
            raise _Unclaimed(f"{_describe(n)}: shapes are needed to follow the channel axis")
        return shape

    def producer_refs(self, n: fx.Node) -> tuple[AxisRef, ...]:
        """The slices a producer's channel scale multiplies; raises if ``n`` cannot be one."""
        g, mod = self.graph, self.graph.module(n)
        if g.calls[n.target] != 1:
            raise _Unclaimed(f"{n.target} is called {g.calls[n.target]} times")
        weight, bias = g.param(n.target, "weight"), g.param(n.target, "bias")
        if isinstance(mod, CHANNEL_NORMS):
            if weight is None:
                raise _Unclaimed(f"the norm {n.target} has no affine gain")
            axis = 0
        elif isinstance(mod, TRANSPOSED_CONVOLUTIONS):
            if mod.groups != 1:
                raise _Unclaimed(f"the transposed convolution {n.target} has groups={mod.groups}: its output channels "
                                 "are not the slices of one weight axis")
            axis = 1
        else:
            axis = 0
        return (AxisRef(weight, axis),) + ((AxisRef(bias, 0),) if bias is not None else ())

    def is_producer(self, n: fx.Node) -> bool:
        mod = self.graph.module(n)
        return isinstance(mod, (*CONVOLUTIONS, *TRANSPOSED_CONVOLUTIONS, *CHANNEL_NORMS))

    # --- growing the closure -------------------------------------------------------------------------
    def add_producer(self, n: fx.Node) -> None:
        self.producer_refs(n)  # raises if it cannot be one
        shape = self.shape(n)
        if len(shape) < 2:
            raise _Unclaimed(f"{n.target} writes an unbatched map of shape {shape}")
        self.producers.append(n)
        self.mark(n, _Layout(len(shape)))

    def mark(self, n: fx.Node, layout: _Layout) -> None:
        self.scaled[n] = layout
        self.forward.append(n)

    def grow(self) -> None:
        while self.forward:
            n = self.forward.pop()
            for u in self.graph.value_users(n):
                if u not in self.scaled:
                    self.visit(u, n)

    def visit(self, u: fx.Node, n: fx.Node) -> None:
        """``u`` reads the scaled ``n``: record it as a consumer, carry the scaling through it, or raise."""
        g, mod, layout = self.graph, self.graph.module(u), self.scaled[n]
        if u.op == "output":
            raise _Unclaimed(f"the scaled map {n.name} is a model output")
        if isinstance(mod, (*CONVOLUTIONS, *TRANSPOSED_CONVOLUTIONS)):
            self.add_convolution_sink(u, n, mod, layout)
            return
        if g.is_linear(u):
            if u.args[0] is not n or len(u.all_input_nodes) != 1:
                raise _Unclaimed(f"{u.target} uses the scaled map other than as its input")
            if layout.ndim != 2:
                raise _Unclaimed(f"the Linear {u.target} reads the last axis of a {layout.ndim}-D map, "
                                 "a spatial axis, not the channels")
            self.sinks.append((u, AxisRef(g.param(u.target, "weight"), g.in_axis(u), layout.inner)))
            return
        if isinstance(mod, CHANNEL_NORMS):
            raise _Unclaimed(norm_absorption_reason(mod, u.target))
        if g.is_norm(u):
            raise _Unclaimed(f"it feeds the norm {u.target}, which is not homogeneous per channel")
        if isinstance(mod, _CLIPPING_MODULES) or (u.op == "call_function" and u.target in _CLIPPING_FUNCTIONS):
            raise _Unclaimed(f"{_describe(u)} clips at a fixed value (ReLU6: min(max(x, 0), 6)), so it is not "
                             "positively homogeneous: f(a x) != a f(x)")
        if self.elementwise(u) or self.pooling(u):
            if u.args[0] is not n:
                raise _Unclaimed(f"{_describe(u)} takes the scaled map as a parameter")
            if u.kwargs.get("return_indices") or getattr(mod, "return_indices", False):
                raise _Unclaimed(f"{_describe(u)} returns pooling indices")
            self.mark(u, layout if self.elementwise(u) else _Layout(len(self.shape(u))))
            return
        reshaped = self.reshape(u, n, layout)
        if reshaped is not None:
            self.mark(u, reshaped)
            return
        if self.is_sum(u):
            self.carry_sum(u, n, layout)
            return
        if self.is_product(u):
            self.carry_product(u, n, layout)
            return
        if u.op == "call_function" and u.target is torch.cat:
            self.carry_concatenation(u, layout)
            return
        raise _Unclaimed(f"{_describe(u)} is not known to commute with a positive per-channel scale")

    def add_convolution_sink(self, u: fx.Node, n: fx.Node, mod: nn.Module, layout: _Layout) -> None:
        if u.args[0] is not n or len(u.all_input_nodes) != 1:
            raise _Unclaimed(f"{u.target} uses the scaled map other than as its input")
        if layout.ndim != mod.weight.dim():
            raise _Unclaimed(f"{u.target} reads a {layout.ndim}-D map: channels are followed on batched inputs")
        if mod.groups != 1:
            if mod.groups == mod.in_channels:
                raise _Unclaimed(f"{u.target} is depthwise (groups={mod.groups}): input channel c is read by its own "
                                 "output rows, which carry that conv's own output scaling, and a frame takes one "
                                 "family per axis")
            raise _Unclaimed(f"{u.target} is a grouped convolution (groups={mod.groups}): input channel c is read by "
                             "the rows of its group only, not by a slice of one weight axis")
        axis = 0 if isinstance(mod, TRANSPOSED_CONVOLUTIONS) else 1
        self.sinks.append((u, AxisRef(self.graph.param(u.target, "weight"), axis)))

    def elementwise(self, u: fx.Node) -> bool:
        mod = self.graph.module(u)
        return isinstance(mod, _ELEMENTWISE_MODULES) or (u.op == "call_function" and u.target in _ELEMENTWISE_FUNCTIONS) \
            or (u.op == "call_method" and u.target in _ELEMENTWISE_METHODS)

    def pooling(self, u: fx.Node) -> bool:
        return isinstance(self.graph.module(u), _POOL_MODULES) or (u.op == "call_function" and u.target in _POOL_FUNCTIONS)

    @staticmethod
    def is_sum(u: fx.Node) -> bool:
        return (u.op == "call_function" and u.target in _SUMS) or (u.op == "call_method" and u.target in _SUM_METHODS)

    @staticmethod
    def is_product(u: fx.Node) -> bool:
        return (u.op == "call_function" and u.target in _PRODUCTS) or (u.op == "call_method" and u.target in _PRODUCT_METHODS)

    def reshape(self, u: fx.Node, n: fx.Node, layout: _Layout) -> _Layout | None:
        """The layout after a reshape or a spatial reduction of ``n``; None if ``u`` is neither;
        raises if it moves or mixes the channel axis."""
        is_flatten = isinstance(self.graph.module(u), nn.Flatten)
        is_reshape = (u.op == "call_method" and u.target in _RESHAPE_METHODS) or \
            (u.op == "call_function" and u.target in _RESHAPE_FUNCTIONS) or is_flatten
        is_reduction = (u.op == "call_method" and u.target in _REDUCTION_METHODS) or \
            (u.op == "call_function" and u.target in _REDUCTION_FUNCTIONS)
        if not (is_reshape or is_reduction):
            return None
        if u.args[0] is not n:
            raise _Unclaimed(f"{_describe(u)} takes the scaled map as a parameter")
        before, after = self.shape(n), self.shape(u)
        if is_reduction:
            dims = _normalized_dims(u.args[1] if len(u.args) > 1 else u.kwargs.get("dim"), len(before))
            if dims is None or any(d < 2 for d in dims) or layout.ndim == 2:
                raise _Unclaimed(f"{_describe(u)} reduces over the batch or channel axis")
            return _Layout(len(after))
        if len(after) >= 2 and after[:2] == before[:2]:
            return _Layout(len(after), layout.inner if len(after) == 2 else 1)
        if len(after) == 2 and after[0] == before[0] and layout.ndim > 2:
            spatial = after[1] // before[1]
            if spatial * before[1] == after[1]:
                return _Layout(2, spatial)
        raise _Unclaimed(f"{_describe(u)} reshapes {before} to {after}, which does not keep each channel in one "
                         "block of columns (only flatten(1) and views keeping (N, C) are followed)")

    def carry_sum(self, u: fx.Node, n: fx.Node, layout: _Layout) -> None:
        others = [a for a in u.args if a is not n] + [v for k, v in u.kwargs.items() if k != "alpha"]
        for other in others:
            if not isinstance(other, fx.Node):
                raise _Unclaimed(f"{_describe(u)} adds the constant {other!r}, which the scale would change")
            if self.shape(other) != self.shape(u):
                raise _Unclaimed(f"{_describe(u)} adds {other.name} of another shape (broadcast)")
            reason = self.join(other)
            if reason is not None:
                raise _Unclaimed(f"the residual add {u.name} sums it with {other.name}, a branch that does not carry "
                                 f"the same scaling: {reason}")
        self.mark(u, layout)

    def carry_product(self, u: fx.Node, n: fx.Node, layout: _Layout) -> None:
        args = list(u.args)
        divides = u.target in (operator.truediv, operator.itruediv, torch.div, "div", "div_")
        if len(args) != 2 or n not in args or (divides and args[0] is not n) or u.kwargs.get("rounding_mode") is not None:
            raise _Unclaimed(f"{_describe(u)} is not a product of the scaled map with a factor")
        other = args[1] if args[0] is n else args[0]
        if other is n:
            raise _Unclaimed(f"{u.name} multiplies the scaled map by itself")
        if isinstance(other, fx.Node):
            if self.shape(u) != self.shape(n):
                raise _Unclaimed(f"{u.name} broadcasts the scaled map against a larger factor")
            self.factors.append(other)
        self.mark(u, layout)

    def carry_concatenation(self, u: fx.Node, layout: _Layout) -> None:
        tensors = u.args[0]
        dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
        if (dim + layout.ndim if dim < 0 else dim) == 1:
            raise _Unclaimed(f"the channel concatenation {u.name} puts these channels in a sub-range of its "
                             "consumers' input axis, shared with the other inputs, which the optimizers' frames do "
                             "not represent")
        for other in tensors:
            reason = self.join(other)
            if reason is not None:
                raise _Unclaimed(f"{u.name} concatenates it with {getattr(other, 'name', other)}, which does not carry "
                                 f"the same scaling: {reason}")
        self.mark(u, layout)

    def join(self, m: Any) -> str | None:
        """Make the branch ``m`` carry the family's scaling by following it backwards to producers;
        None on success, else why it cannot."""
        if not isinstance(m, fx.Node):
            return f"{m!r} is a constant"
        if m in self.scaled:
            return None
        if _is_input(m):
            return f"{m.name} is a model input, which no parameter scales"
        if self.is_producer(m):
            try:
                self.add_producer(m)
            except _Unclaimed as err:
                return str(err)
            return None
        if self.elementwise(m) or self.pooling(m):
            source = m.args[0]
            reason = self.join(source)
            if reason is not None:
                return reason
            self.mark(m, _Layout(len(self.shape(m))))
            return None
        if self.is_sum(m):
            for a in (*m.args, *m.kwargs.values()):
                reason = self.join(a)
                if reason is not None:
                    return reason
            self.mark(m, _Layout(len(self.shape(m))))
            return None
        return f"{_describe(m)} is neither a channel layer nor a map that commutes with the scaling"


def channel_families(g: Any, needs_examples: str) -> tuple[list[NeuronScaling], list[Skipped], set[fx.Node]]:
    """The channel-scaling families of the traced graph ``g`` (a ``discovery._Graph``), the candidates
    left out with reasons, and every producer node looked at."""
    families: list[NeuronScaling] = []
    skipped: list[Skipped] = []
    done: set[fx.Node] = set()
    for n in g.nodes:
        mod = g.module(n)
        if n in done or not isinstance(mod, (*CONVOLUTIONS, *TRANSPOSED_CONVOLUTIONS, *CHANNEL_NORMS)):
            continue
        if isinstance(mod, CHANNEL_NORMS) and getattr(mod, "weight", None) is None:
            skipped.append(Skipped(n.target, KIND, "the norm has no affine gain and bias to scale"))
            done.add(n)
            continue
        if g.example_inputs is None:
            skipped.append(Skipped(n.target, KIND, f"{needs_examples} (shapes) to follow the channel axis"))
            done.add(n)
            continue
        closure = _Closure(g)
        try:
            closure.add_producer(n)
            closure.grow()
            family = _family(g, closure)
        except _Unclaimed as err:
            sites = [p.target for p in closure.producers] or [n.target]
            skipped.append(Skipped(", ".join(sites), KIND, str(err)))
            done.update(closure.producers or [n])
            continue
        done.update(closure.producers)
        families.append(family)
    return families, skipped, done


def _family(g: Any, closure: _Closure) -> NeuronScaling:
    """The family of a grown closure, after the checks that need all of it."""
    if not closure.sinks:
        raise _Unclaimed("no layer absorbs the scaling (no consumer)")
    for node, _ in closure.sinks:
        if g.calls[node.target] != 1:
            raise _Unclaimed(f"the consumer {node.target} is called {g.calls[node.target]} times")
    for factor in closure.factors:
        if any(s in g.ancestors(factor) or s is factor for s in closure.scaled):
            raise _Unclaimed(f"{factor.name} multiplies the scaled map by a factor that depends on it")
    widths = {closure.shape(p)[1] for p in closure.producers}
    if len(widths) != 1:
        raise _Unclaimed(f"the producers {[p.target for p in closure.producers]} write different widths {sorted(widths)}")
    multiplied = tuple(ref for p in closure.producers for ref in closure.producer_refs(p))
    divided = tuple(ref for _, ref in closure.sinks)
    names = [p.target for p in closure.producers]
    return NeuronScaling(f"{KIND}:{names[0]}", widths.pop(), multiplied, divided, producer=", ".join(names), kind=KIND)

