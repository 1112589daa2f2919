"""Discover gauge families by following a model's computation.

The model is traced with :mod:`torch.fx` (``nn.Linear``, ``nn.Embedding``, the norms and modules
shaped like them stay leaf calls; everything else is traced through; with example inputs by the
shadow-value tracer of :mod:`.tracing`, which follows library models), shapes are propagated with
the example inputs, and five analyses run on the graph. None of them looks at model classes: a
leaf counts as a norm or a linear layer only when measured to act as one.

1. **Logit / router shift.** A Linear's output carries ``+ c(x) 1`` along its last axis through
   ops that keep that axis (views, indexing of leading axes, transposes of leading axes), through
   multiplication or division by a factor constant along it (a number, a temperature) and through
   addition of a tensor (a bias), as long as factor and tensor do not depend on that Linear, until a
   softmax/log-softmax over that axis absorbs it (router shift) or it is the model output and the
   caller declared ``output="logits"`` (logit shift).
2. **Neuron scaling.** A Linear's output is scaled per channel by a_i > 0; the scaling must pass
   through positively homogeneous maps (ReLU, leaky ReLU, dropout, multiplication by a tensor that
   does not depend on it, reductions over leading axes, views keeping the last axis) and end only
   at inputs of Linear layers, whose columns absorb 1/a_i.
3. **Norm scaling.** The same propagation, started at the output of an affine LayerNorm/RMSNorm.
4. **Head rotations.** For every ``scaled_dot_product_attention`` call, the query/key/value
   projections are found, and the maps from each projection's output to the attention's inputs are
   *measured* by probing the traced graph with basis vectors: only the sub-graph from the
   projection to the attention input runs, on the values recorded on the example inputs, with the
   basis vectors vectorised. The maps must be linear and per position; they reveal the head layout,
   grouped-query sharing, and the positional map P_t (RoPE). The rotation algebra is the commutant
   {X in so(d): [P_m^T K_n, X] = 0 for all positions m, n}: all of so(d) without RoPE, one plane
   per distinct frequency with it. A layer whose random probe matches the maps of a layer analysed
   before (to rounding) reuses that layer's layout and algebra; any other is measured in full. The
   value path must be a pure head selection and the attention output must reach exactly one Linear
   through a pure permutation of channels (the output projection).

5. **Channel scaling** (:mod:`.channels`). Conv and affine channel-norm (BatchNorm, GroupNorm)
   channels, followed along axis 1 of ``(N, C, *spatial)`` maps through ReLU, pooling and flatten
   into the convs and Linears that absorb them; residual adds join the producers of every branch.

Anything that cannot be established is left out and recorded in ``GaugeSet.skipped`` with the reason.
The analysis runs in float64, on a copy when the model is in another precision (half-precision
rounding would decide what commutes), with the model in eval mode and on its own device.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import operator
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .channels import CONVOLUTIONS, channel_families, is_channel_layer, norm_absorption_reason
from .families import AxisRef, GaugeFamily, HeadRotation, LogitShift, NeuronScaling, full_rotation_algebra, norm_scaling
from .gaugeset import GaugeSet, Skipped, uncompiled
from .tracing import is_linear_like, is_norm_like, trace_with_examples

OutputKind = Literal["logits", "values"]

_NORMS = (nn.LayerNorm, nn.RMSNorm)
_METADATA_METHODS = {"size", "dim", "numel", "zeros_like", "ones_like", "new_zeros", "new_ones", "new_empty", "new_full"}
_METADATA_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}
_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.dropout, torch.nn.functional.dropout}
_HOMOGENEOUS_METHODS = {"relu", "contiguous", "clone"}
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Identity)
_SOFTMAXES = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
_ARITHMETIC_FUNCTIONS = {operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
                         operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub"}
_ARITHMETIC_METHODS = {"mul": "mul", "div": "div", "add": "add", "sub": "sub"}
_VIEWS = {"view", "reshape", "flatten"}
_CASTS = {"to", "float", "double", "half", "bfloat16", "type"}
_REDUCTIONS = {"mean", "sum"}
# how a skipped reason starts when the candidate could not be analysed for lack of example inputs
_NEEDS_EXAMPLES = "needs example_inputs"
# words with a digit ("layers.3.q_proj", "add_3", "2.7e+00"): reasons differing only in them are alike
_NAMES_AND_NUMBERS = re.compile(r"[\w.+-]*\d[\w.+-]*")
# Discovery computes in float64 (a model in another precision is analysed on a float64 copy).
# Relative error allowed in a probe measurement (linearity, per-position action, permutations):
_PROBE_TOL = 1e-9
# Commutation with the positional maps is decided far below it: slow RoPE frequencies (theta 1e6) over
# a short example leave generators that commute only to ~1e-9. A layer whose maps match an analysed
# layer's to 10x this tolerance has the same rotation algebra.
_COMMUTANT_TOL = 1e-12


class _StopProbe(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# Graph helpers
# --------------------------------------------------------------------------------------------------


class _Graph:
    """A traced model with the lookups the analyses need."""

    def __init__(self, model: nn.Module, example_inputs: tuple | None, keyword_inputs: dict[str, Any]):
        self.model = model
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.opaque: dict[str, str] = {}
        try:
            if example_inputs is None:
                concrete = {
                    name: p.default
                    for name, p in inspect.signature(model.forward).parameters.items()
                    if p.default is not inspect.Parameter.empty
                }
                self.gm = fx.symbolic_trace(model, concrete_args=concrete or None)
            else:
                self.gm, example_inputs, self.opaque = trace_with_examples(model, example_inputs, keyword_inputs)
        except Exception as err:  # noqa: BLE001 - report any tracing failure the same way
            remedy = ("pass example_inputs (tracing with them follows code that reads shapes or takes **kwargs), "
                      if example_inputs is None else "")
            raise ValueError(
                f"find_gauges could not trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}). "
                f"Gauges are discovered from the traced graph; {remedy}make forward traceable (no Python control "
                "flow on tensor values) or build a GaugeSet by hand."
            ) from err
        self.example_inputs = example_inputs
        # every node's value on the example inputs (eval mode): the probes start from them; and the
        # nodes whose value an in-place op changed after it was computed (a probe cannot reuse those)
        self.values: dict[fx.Node, Any] = {}
        self.overwritten: set[fx.Node] = set()
        if example_inputs is not None:
            with torch.no_grad():
                recorder = _Recorder(self.gm)
                recorder.propagate(*example_inputs)
            self.values = recorder.env
            self.overwritten = {n for n, version in recorder.versions.items()
                                if version is None or self.values[n]._version != version}
        self.modules = dict(self.gm.named_modules())
        self.nodes = list(self.gm.graph.nodes)
        self.output = next(n for n in self.nodes if n.op == "output")
        calls: dict[str, int] = {}
        for n in self.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        self.calls = calls
        self.param_names = {id(p): name for name, p in model.named_parameters()}
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        self.tied = {name for names in aliases.values() if len(names) > 1 for name in names}
        self._ancestors: dict[fx.Node, set[fx.Node]] = {}
        self._out_axis: dict[str, int | None] = {}
        self._gain_reason: dict[str, str | None] = {}
        self._sub_graphs: dict[tuple, list[fx.Node] | None] = {}
        self._interpreter = fx.Interpreter(self.gm, garbage_collect_values=False)

    # --- node predicates ---------------------------------------------------------------------
    def module(self, n: fx.Node) -> nn.Module | None:
        return self.modules.get(n.target) if n.op == "call_module" else None

    def out_axis(self, n: fx.Node) -> int | None:
        """For a call of a linear layer, the weight axis its outputs run along: 0 for ``nn.Linear``'s
        ``(out, in)``, 1 for a weight stored ``(in, out)`` (GPT-2's ``Conv1D``); None otherwise.
        Modules other than ``nn.Linear`` are accepted only if measured to compute ``x W^T + b`` or
        ``x W + b``."""
        mod = self.module(n)
        if mod is None:
            return None
        if n.target not in self._out_axis:
            self._out_axis[n.target] = 0 if isinstance(mod, nn.Linear) else _measure_out_axis(mod)
        return self._out_axis[n.target]

    def is_linear(self, n: fx.Node) -> bool:
        return self.out_axis(n) is not None

    def is_norm(self, n: fx.Node) -> bool:
        """A call of ``nn.LayerNorm``/``nn.RMSNorm`` or of a module shaped like one (``is_norm_like``)."""
        mod = self.module(n)
        return isinstance(mod, _NORMS) or (mod is not None and is_norm_like(mod))

    def in_axis(self, n: fx.Node) -> int:
        return 1 - self.out_axis(n)

    def gain_reason(self, n: fx.Node) -> str | None:
        """For a call of a norm-like module (``is_norm_like``): None if scaling its gain (and bias) by
        s > 0 per channel is measured to scale its output by s, else why not."""
        if n.target not in self._gain_reason:
            self._gain_reason[n.target] = _measure_gain_action(self.module(n), self.shape(n.args[0]))
        return self._gain_reason[n.target]

    @staticmethod
    def is_metadata(n: fx.Node) -> bool:
        """Ops whose result depends on a tensor's shape/dtype only, not on its values."""
        if n.op == "call_method" and n.target in _METADATA_METHODS:
            return True
        if n.op == "call_function" and n.target in _METADATA_FUNCTIONS:
            return True
        return n.op == "call_function" and n.target is getattr and n.args[1] in ("shape", "dtype", "device", "ndim")

    def value_users(self, n: fx.Node) -> list[fx.Node]:
        return [u for u in n.users if not self.is_metadata(u)]

    def upstream(self, n: fx.Node, stop: Callable[[fx.Node], bool] | None = None) -> set[fx.Node]:
        """Nodes whose values ``n`` depends on, walking inputs backwards; metadata edges are cut, and
        nodes for which ``stop`` holds are included but not walked past."""
        out: set[fx.Node] = set()
        stack = [n]
        while stack:
            cur = stack.pop()
            if self.is_metadata(cur) or (cur is not n and stop is not None and stop(cur)):
                continue
            for a in cur.all_input_nodes:
                if a not in out:
                    out.add(a)
                    stack.append(a)
        return out

    def ancestors(self, n: fx.Node) -> set[fx.Node]:
        """All nodes ``n``'s value depends on (cached)."""
        if n not in self._ancestors:
            self._ancestors[n] = self.upstream(n)
        return self._ancestors[n]

    @staticmethod
    def shape(n: Any) -> tuple[int, ...] | None:
        meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def param(self, module_name: str, attr: str) -> str | None:
        p = getattr(self.modules[module_name], attr, None)
        return None if p is None else self.param_names[id(p)]

    # --- probing (the model is in eval mode throughout the analysis, see find_gauges) -------------
    def probe(self, overrides: dict[fx.Node, torch.Tensor], watch: list[fx.Node]) -> list[torch.Tensor]:
        """The watched nodes' values (float64, on the model's device) when the nodes in ``overrides``
        take the given values (of their recorded shapes) and every other node keeps its value on the
        example inputs.

        Only the nodes between the overrides and the watched nodes run, on the recorded values of
        the rest: a probe costs that sub-graph (a few views and the positional map for an attention
        projection), not the model. When the sub-graph reads a recorded value that an in-place op
        changed (in it, or later in the model), the whole graph runs instead.
        """
        # copies: the model may write into a view of an overridden value (q.mul_(s)), not into the caller's
        overrides = {n: v.to(device=self.device, dtype=torch.float64, copy=True) for n, v in overrides.items()}
        nodes = self._sub_graph(tuple(overrides), tuple(watch))
        with torch.no_grad():
            if nodes is None:
                return self._run_whole(overrides, watch)
            env = {**self.values, **overrides}
            self._interpreter.env = env
            for n in nodes:
                env[n] = self._interpreter.run_node(n)
        return [env[w] for w in watch]

    def basis_responses(self, source: fx.Node, sink: fx.Node) -> torch.Tensor:
        """``resp[c]``: the value of ``sink`` when ``source`` holds the unit vector on channel ``c`` of
        its last axis at every other index (shape ``(channels, *sink_shape)``). The channels travel
        as one vectorised probe (``torch.func.vmap``, in chunks of at most 2^24 elements); a
        sub-graph that cannot be vectorised is probed one channel at a time."""
        shape = self.shape(source)
        channels = shape[-1]
        units = torch.eye(channels, dtype=torch.float64, device=self.device)
        units = units.reshape(channels, *[1] * (len(shape) - 1), channels).expand(channels, *shape)

        def respond(x: torch.Tensor) -> torch.Tensor:
            return self.probe({source: x}, [sink])[0]

        try:
            return torch.func.vmap(respond, chunk_size=max(1, 2**24 // math.prod(shape)))(units)
        except Exception:  # noqa: BLE001 - an op without a batching rule, or code that is not batch-agnostic
            return torch.stack([respond(u) for u in units])

    def _sub_graph(self, sources: tuple[fx.Node, ...], sinks: tuple[fx.Node, ...]) -> list[fx.Node] | None:
        """The nodes that depend on a source's value and feed a sink's, in graph order; None when one
        of them reads a tensor from outside them that an in-place op changed after it was computed
        (its recorded value is not the one read, and a probe writing into it would change the record;
        a write into it from inside is such a change too). Shapes, dtypes and devices read from the
        sources are those recorded: a probe keeps the recorded shapes."""
        key = (sources, sinks)
        if key not in self._sub_graphs:
            downstream, stack = set(), list(sources)
            while stack:
                for u in self.value_users(stack.pop()):
                    if u not in downstream:
                        downstream.add(u)
                        stack.append(u)
            upstream = set(sinks).union(*(self.ancestors(s) for s in sinks))
            nodes = [n for n in self.nodes if n in downstream and n in upstream]
            read = {a for n in nodes for a in n.all_input_nodes} - set(nodes) - set(sources)
            self._sub_graphs[key] = None if read & self.overwritten else nodes
        return self._sub_graphs[key]

    def _run_whole(self, overrides: dict[fx.Node, torch.Tensor], watch: list[fx.Node]) -> list[torch.Tensor]:
        """Run the whole graph on the example inputs with the overrides, up to the watched nodes."""
        seen: dict[fx.Node, torch.Tensor] = {}

        class Interp(fx.Interpreter):
            def run_node(self, n):
                value = super().run_node(n)
                if n in watch:
                    seen[n] = value
                    if len(seen) == len(watch):
                        raise _StopProbe
                return value

        try:
            Interp(self.gm).run(*self.example_inputs, initial_env=dict(overrides))
        except _StopProbe:
            pass
        return [overrides[w] if w in overrides else seen[w] for w in watch]


class _Recorder(ShapeProp):
    """Shape propagation that keeps every node's value (``env``) and the version counter of each
    tensor value when it was computed (``versions``): an in-place op on the tensor or a view of it
    later in the run moves the counter. Tensors without one (made under ``torch.inference_mode``)
    get None: their later values cannot be vouched for."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.garbage_collect_values = False
        self.versions: dict[fx.Node, int | None] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if isinstance(value, torch.Tensor):
            self.versions[n] = None if value.is_inference() else value._version
        return value


def _measure_out_axis(mod: nn.Module) -> int | None:
    """0 if ``mod(x) == x W^T + b``, 1 if ``mod(x) == x W + b`` on a random probe, else None."""
    if not is_linear_like(mod):
        return None
    weight, bias = mod.weight, getattr(mod, "bias", None)
    gen = torch.Generator().manual_seed(0)
    for axis in (0, 1):
        if bias is not None and bias.shape[0] != weight.shape[axis]:
            continue
        x = torch.randn(3, weight.shape[1 - axis], generator=gen, dtype=torch.float64).to(weight)
        expected = x @ (weight.T if axis == 0 else weight) + (0 if bias is None else bias)
        try:
            with torch.no_grad():
                got = mod(x)
        except Exception:  # noqa: BLE001 - the probe does not fit this layout
            continue
        if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item()):
            return axis
    return None


def _measure_gain_action(mod: nn.Module, in_shape: tuple[int, ...] | None) -> str | None:
    """None if multiplying the module's ``weight`` (and ``bias``) by s > 0 per channel multiplies its
    output by s along the last axis (measured on a random input), else the reason it does not."""
    if in_shape is None:
        return f"{_NEEDS_EXAMPLES} (shapes) to measure how the gain acts"
    params = dict(mod.named_parameters(recurse=False))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(in_shape, generator=gen, dtype=torch.float64).to(params["weight"])
    s = torch.exp(torch.randn(params["weight"].shape, generator=gen, dtype=torch.float64)).to(params["weight"])
    with torch.no_grad():
        y = mod(x)
        y_scaled = torch.func.functional_call(mod, {k: v * s for k, v in params.items()}, (x,))
    if y.shape[-1:] != s.shape or not torch.allclose(y_scaled, y * s, rtol=1e-4, atol=0):
        return "scaling its gain does not scale its output per channel (e.g. a (1 + w) gain)"
    return None


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _arg(n: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(n.args) > index:
        return n.args[index]
    return n.kwargs.get(name, default)


def _is_full_slice(index: Any) -> bool:
    return isinstance(index, slice) and index.start in (None, 0) and index.stop is None and index.step in (None, 1)


def _keeps_last_axis(g: _Graph, u: fx.Node, src: fx.Node) -> bool | None:
    """True if ``u`` (a view, transpose, indexing or reduction of ``src``) keeps src's last axis as
    its own last axis, element for element; None if ``u`` is not such an op."""
    in_shape, out_shape = g.shape(src), g.shape(u)
    if u.op == "call_method" and u.target in _VIEWS or u.op == "call_function" and u.target in (torch.reshape, torch.flatten):
        return in_shape is not None and out_shape is not None and in_shape[-1:] == out_shape[-1:]
    if u.op == "call_method" and u.target in ("transpose", "permute") or u.op == "call_function" and u.target is torch.transpose:
        if in_shape is None:
            return False
        nd = len(in_shape)
        dims = [a for a in u.args[1:] if isinstance(a, int)] if u.op == "call_method" else list(u.args[1:])
        if u.target == "permute":
            dims = list(u.args[1]) if len(u.args) == 2 and isinstance(u.args[1], (tuple, list)) else dims
            return _norm_dim(dims[-1], nd) == nd - 1
        return all(_norm_dim(d, nd) != nd - 1 for d in dims)
    if u.op == "call_function" and u.target is operator.getitem and u.args[0] is src:
        if in_shape is None:
            return False
        idx = u.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if Ellipsis in idx:
            return idx[-1] is Ellipsis or _is_full_slice(idx[-1])
        used = sum(1 for i in idx if i is not None)
        return used < len(in_shape) or (used == len(in_shape) and _is_full_slice(idx[-1]))
    if (u.op == "call_method" and u.target in _REDUCTIONS) or (u.op == "call_function" and u.target in (torch.mean, torch.sum)):
        if in_shape is None:
            return False
        dim = _arg(u, 1, "dim")
        if dim is None:
            return False
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        return all(_norm_dim(d, len(in_shape)) != len(in_shape) - 1 for d in dims)
    return None


def _arithmetic(u: fx.Node, n: fx.Node) -> tuple[str, Any] | None:
    """For ``u`` = ``n`` times, divided by, plus or minus one other operand: the op (``"mul"``,
    ``"div"``, ``"add"``, ``"sub"``) and that operand (``n`` itself for ``n * n``). None for any other
    op, for a quotient whose divisor is ``n``, and for a rounding division."""
    if u.op == "call_function":
        kind = _ARITHMETIC_FUNCTIONS.get(u.target)
    elif u.op == "call_method":
        kind = _ARITHMETIC_METHODS.get(u.target)
    else:
        kind = None
    if kind is None or len(u.args) != 2 or n not in u.args:
        return None
    if kind == "div" and (u.args[0] is not n or u.kwargs.get("rounding_mode") is not None):
        return None
    return kind, u.args[1] if u.args[0] is n else u.args[0]


# --------------------------------------------------------------------------------------------------
# Analyses
# --------------------------------------------------------------------------------------------------


def _describe_op(n: fx.Node) -> str:
    target = getattr(n.target, "__name__", str(n.target))
    return f"{n.op} {target}"


def _follow_channel_scaling(g: _Graph, start: fx.Node) -> tuple[list[fx.Node], str | None]:
    """Propagate a per-channel positive scaling of ``start``'s last axis; return the Linear nodes
    that absorb it in their columns, or a reason it cannot be absorbed."""
    sinks: list[fx.Node] = []
    scaled = {start}
    frontier = [start]
    while frontier:
        n = frontier.pop()
        for u in g.value_users(n):
            if u in scaled:
                continue
            mod = g.module(u)
            if g.is_linear(u):
                if u.args[0] is not n or len(u.all_input_nodes) != 1:
                    return [], f"{u.target} uses the scaled tensor other than as its input"
                sinks.append(u)
                continue
            if isinstance(mod, _HOMOGENEOUS_MODULES) or (u.op == "call_function" and u.target in _HOMOGENEOUS_FUNCTIONS) \
                    or (u.op == "call_method" and u.target in _HOMOGENEOUS_METHODS):
                if u.args[0] is not n:
                    return [], f"{_describe_op(u)} takes the scaled tensor as a parameter"
                scaled.add(u)
                frontier.append(u)
                continue
            keeps = _keeps_last_axis(g, u, n)
            if keeps is not None:
                if not keeps and (g.shape(n) is None or g.shape(u) is None):
                    return [], f"{_describe_op(u)} ({u.name}): {_NEEDS_EXAMPLES} (shapes) to show it keeps the axis"
                if not keeps:
                    return [], f"{_describe_op(u)} ({u.name}) mixes or cannot be shown to keep the channel axis"
                scaled.add(u)
                frontier.append(u)
                continue
            arithmetic = _arithmetic(u, n)
            if arithmetic is not None and arithmetic[0] in ("mul", "div"):
                other = arithmetic[1]
                if other is n:
                    return [], f"{u.name} multiplies the scaled tensor by itself"
                if isinstance(other, fx.Node) and (start in g.ancestors(other) or other is start):
                    return [], f"{u.name} multiplies the unit by a factor that depends on it"
                if isinstance(other, fx.Node):
                    s_in, s_out = g.shape(n), g.shape(u)
                    if s_in is None or s_out is None or s_in[-1] != s_out[-1]:
                        return [], f"{u.name}: {_NEEDS_EXAMPLES} (shapes) to show the product keeps the channel axis"
                scaled.add(u)
                frontier.append(u)
                continue
            if u.op == "output":
                return [], "the scaled tensor is a model output"
            if arithmetic is not None:  # a sum or difference
                return [], f"{u.name} adds it to a tensor that is not scaled alike (residual stream?)"
            if is_channel_layer(mod) and not isinstance(mod, CONVOLUTIONS):
                return [], norm_absorption_reason(mod, u.target)
            if g.is_norm(u):
                return [], f"it feeds the norm {u.target}, which is not homogeneous per channel"
            return [], f"{_describe_op(u)} ({u.name}) is not known to commute with a per-channel positive scaling"
    return sinks, None


def _shift_passes(g: _Graph, start: fx.Node, u: fx.Node, kind: str, other: Any) -> str | None:
    """None if ``u`` = (shifted tensor) ``kind`` ``other`` still carries a shift along the last axis,
    else why not. ``(z + c 1) s = z s + (c s) 1`` when the factor ``s`` is constant along that axis
    (a number, or a tensor of size 1 there: a temperature, Granite's ``logits_scaling``), and
    ``z + b + c 1`` is ``z + b`` shifted for any ``b``, provided ``s`` and ``b`` do not depend on the
    shifted Linear (its output or its parameters, which the shift moves). The sign of ``s`` does not
    matter: the shift stays a shift."""
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        return None
    if not isinstance(other, fx.Node):
        return f"{u.name} combines the shifted tensor with {other!r}"
    moved = {g.param(start.target, "weight"), g.param(start.target, "bias")} - {None}
    upstream = g.ancestors(other) | {other}
    if start in upstream or any(a.op == "get_attr" and a.target in moved for a in upstream):
        return f"{u.name} combines the shifted tensor with a tensor that depends on {start.target}"
    if kind in ("mul", "div"):
        shape = g.shape(other)
        if shape is None:
            return f"{u.name}: {_NEEDS_EXAMPLES} (shapes) to show the factor is constant along the last axis"
        if shape and shape[-1] != 1:
            return f"{u.name} scales the last axis entry by entry (factor of shape {tuple(shape)})"
    return None


def _follow_logit_shift(g: _Graph, start: fx.Node, output: OutputKind) -> tuple[str | None, str | None]:
    """Propagate ``+ c 1`` along the last axis; return (where it is absorbed, reason it is not)."""
    site = None
    frontier = [start]
    seen = {start}
    while frontier:
        n = frontier.pop()
        for u in g.value_users(n):
            if u in seen:
                continue
            if u.op == "output":
                if u.args[0] is not n:
                    return None, "the logits are returned inside a container"
                if output != "logits":
                    return None, "it is the model output; pass output='logits' if the output feeds a softmax/cross-entropy"
                site = site or "model output"
                continue
            is_softmax = (u.op == "call_function" and u.target in _SOFTMAXES) or (
                u.op == "call_method" and u.target in ("softmax", "log_softmax"))
            if is_softmax:
                shape = g.shape(n)
                dim = _arg(u, 1, "dim")
                if shape is None or dim is None or _norm_dim(dim, len(shape)) != len(shape) - 1:
                    return None, f"{u.name}: softmax not shown to act on the last axis"
                site = site if site and site != "model output" else u.name
                continue
            arithmetic = _arithmetic(u, n)
            if arithmetic is not None and arithmetic[1] is not n:
                reason = _shift_passes(g, start, u, *arithmetic)
                if reason is not None:
                    return None, reason
            else:
                keeps = _keeps_last_axis(g, u, n)
                if keeps is False and (g.shape(n) is None or g.shape(u) is None):
                    return None, f"{_describe_op(u)} ({u.name}): {_NEEDS_EXAMPLES} (shapes) to show it keeps the axis"
                if not keeps:
                    return None, f"{_describe_op(u)} ({u.name}) sees the shift"
            seen.add(u)
            frontier.append(u)
    return site, None


@dataclass(eq=False)
class _HeadLayout:
    """How a projection's output ``(..., T, C)`` reaches an attention input ``(..., H, T, d)``: head
    ``h`` reads channels ``heads[h]`` of the projection output, in that order, and maps them at
    position ``t`` by ``maps[t, h]`` (``d x d``). Compared by identity: the layers that share one
    share its analysis."""

    heads: list[list[int]]
    maps: torch.Tensor  # (positions, heads, d, d), float64 on the CPU

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The attention input for projection output ``x`` (..., T, C): (..., H, T, d)."""
        gathered = x[..., torch.tensor(self.heads)]  # (..., T, H, d)
        return torch.einsum("thij,...thj->...hti", self.maps, gathered)

    def repeated(self, n_query: int) -> _HeadLayout:
        """The layout of a key/value projection measured per kv head, seen per query head as
        grouped-query SDPA reads it (query head h reads kv head h // (n_query / n_kv))."""
        n_kv = self.maps.shape[1]
        if n_query % n_kv:
            raise ValueError(f"{n_query} query heads cannot share {n_kv} key/value heads evenly")
        rep = n_query // n_kv
        return _HeadLayout([self.heads[h // rep] for h in range(n_query)], self.maps.repeat_interleave(rep, dim=1))


@dataclass
class _AttentionMemo:
    """What the analysis of one attention site leaves for the next: the head layouts measured so far,
    by the shapes of projection output and attention input, and the query/key rotation algebra of
    each (query layout, key layout, query heads) triple. A layer of the same structure as one
    analysed before is confirmed by one random probe and reuses its layouts and algebra."""

    layouts: dict[tuple, list[_HeadLayout]] = field(default_factory=dict)
    algebras: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def full_algebra(self, d: int) -> torch.Tensor:
        """so(d) (:func:`full_rotation_algebra`), one tensor shared by every value/output family."""
        if ("so", d) not in self.algebras:
            self.algebras["so", d] = full_rotation_algebra(d)
        return self.algebras["so", d]


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _measure_projection(g: _Graph, linear: fx.Node, target: fx.Node, memo: _AttentionMemo
                        ) -> tuple[_HeadLayout | None, str | None]:
    """The head layout of the map from a projection's output (..., T, C) to an attention input
    (B, H, T, d), measured and checked to be linear and per position.

    One random probe is compared with the layouts measured before for the same shapes: a match to
    ``10 * _COMMUTANT_TOL`` (a layer built like an analysed one) reuses that layout. Otherwise the
    map is measured with basis probes (one per channel, in one vectorised pass over the sub-graph
    from the projection to the attention input) and checked against the random probe.
    """
    in_shape, out_shape = g.shape(linear), g.shape(target)
    if in_shape is None or out_shape is None or len(out_shape) != 4:
        return None, f"{_NEEDS_EXAMPLES} (shapes) to measure the head layout"
    _, heads, seq, d = out_shape
    if in_shape[-2] != seq:
        return None, f"{linear.target}: sequence axis not recognised"
    x = torch.randn(in_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (response,) = g.probe({linear: x}, [target])
    response = response.cpu()
    known = memo.layouts.setdefault((in_shape, out_shape), [])
    for layout in known:
        if _relative_error(response, layout.predict(x)) <= 10 * _COMMUTANT_TOL:
            return layout, None
    # resp[h, t, i, c]: head h, position t, dim i, for the unit vector on channel c (batch entry 0)
    stack = g.basis_responses(linear, target)[:, 0].permute(1, 2, 3, 0).cpu()
    heads_channels: list[list[int]] = []
    maps = torch.zeros(seq, heads, d, d, dtype=torch.float64)
    for h in range(heads):
        support = (stack[h].abs().amax(dim=(0, 1)) > 1e-12).nonzero().flatten().tolist()
        if len(support) != d:
            return None, f"{linear.target}: attention head {h} reads {len(support)} channels, not {d}"
        heads_channels.append(support)
        maps[:, h] = stack[h][:, :, support]
    layout = _HeadLayout(heads_channels, maps)
    err = _relative_error(response, layout.predict(x))
    if err > 100 * _PROBE_TOL:
        return None, f"{linear.target}: the map to the attention input is not linear per position (err {err:.1e})"
    known.append(layout)
    return layout, None


def _source_linear(g: _Graph, arg: Any) -> fx.Node | None:
    """The unique Linear whose output reaches ``arg`` without passing another Linear."""
    if not isinstance(arg, fx.Node):
        return None
    if g.is_linear(arg):
        return arg
    found = {n for n in g.upstream(arg, stop=g.is_linear) if g.is_linear(n)}
    return found.pop() if len(found) == 1 else None


def _exclusive_flow(g: _Graph, start: fx.Node, target: fx.Node) -> bool:
    """Every value derived from ``start`` flows into ``target`` and nowhere else."""
    closure, stack = {start}, [start]
    while stack:
        n = stack.pop()
        if n is target:
            continue
        for u in g.value_users(n):
            if u.op == "output":
                return False
            if u not in closure:
                closure.add(u)
                stack.append(u)
    return target in closure and all(
        all(u in closure for u in g.value_users(n)) for n in closure if n is not target
    )


@dataclass
class _AttentionSite:
    """softmax(q k^T) v found in the graph: its three inputs (B, H, T, d), its output, the nodes
    allowed to consume each input, and the extra operands (masks, scales) of the score path."""

    name: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    output: fx.Node
    consumers: dict[str, set[fx.Node]]
    extras: list[Any]


def _recorded_in(n: fx.Node) -> str:
    """The innermost module whose ``forward`` recorded ``n`` (its path in the model), else n's name."""
    stack = n.meta.get("nn_module_stack")
    return next(reversed(stack)) if stack else n.name


def _is_matmul(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in (operator.matmul, torch.matmul)) or (
        n.op == "call_method" and n.target == "matmul")


def _is_last_two_transpose(g: _Graph, n: Any) -> bool:
    if not isinstance(n, fx.Node) or not (n.op == "call_method" and n.target == "transpose"
                                          or n.op == "call_function" and n.target is torch.transpose):
        return False
    shape = g.shape(n.args[0])
    if shape is None:
        return False
    return {_norm_dim(d, len(shape)) for d in n.args[1:3]} == {len(shape) - 2, len(shape) - 1}


def _attention_sites(g: _Graph) -> list[_AttentionSite]:
    """Every fused attention call and every explicit ``softmax(q @ k.transpose(-2, -1) ...) @ v``."""
    sites = []
    for n in g.nodes:
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
            q, k, v = (_arg(n, i, name) for i, name in enumerate(("query", "key", "value")))
            extras = [_arg(n, 3, "attn_mask")]
            sites.append(_AttentionSite(_recorded_in(n), q, k, v, n, {"q": {n}, "k": {n}, "v": {n}}, extras))
            continue
        is_softmax = (n.op == "call_function" and n.target in (F.softmax, torch.softmax)) or (
            n.op == "call_method" and n.target == "softmax")
        if not is_softmax:
            continue
        shape, dim = g.shape(n), _arg(n, 1, "dim")
        if shape is None or len(shape) != 4 or dim is None or _norm_dim(dim, 4) != 3:
            continue
        # backwards from the softmax through scaling and masking to q @ k^T
        extras, cur = [], n.args[0]
        while isinstance(cur, fx.Node) and not _is_matmul(cur):
            if len(g.value_users(cur)) != 1 or not cur.args:
                break
            extras += [a for a in (*cur.args[1:], *cur.kwargs.values())]
            cur = cur.args[0]
        if not (isinstance(cur, fx.Node) and _is_matmul(cur) and _is_last_two_transpose(g, cur.args[1])):
            continue
        scores, k_t = cur, cur.args[1]
        if g.value_users(k_t) != [scores]:
            continue
        # forwards from the softmax through dropout and dtype casts to attention @ v
        out = n
        while len(g.value_users(out)) == 1 and not _is_matmul(next(iter(g.value_users(out)))):
            nxt = next(iter(g.value_users(out)))
            is_dropout = isinstance(g.module(nxt), nn.Dropout) or nxt.op == "call_function" and nxt.target is F.dropout
            is_cast = nxt.op == "call_method" and nxt.target in _CASTS and nxt.args[0] is out
            if not (is_dropout or is_cast):
                break
            out = nxt
        users = g.value_users(out)
        if len(users) != 1 or not _is_matmul(users[0]) or users[0].args[0] is not out:
            continue
        attn_v = users[0]
        sites.append(_AttentionSite(_recorded_in(n), scores.args[0], k_t.args[0], attn_v.args[1], attn_v,
                                    {"q": {scores}, "k": {k_t}, "v": {attn_v}}, extras))
    return sites


def _commutant_algebra(pairs: torch.Tensor, d: int, tol: float = 1e-12) -> torch.Tensor:
    """Orthonormal basis of {X in so(d): A X = X A for all A in pairs (n, d, d)}, shape (k, d, d).

    The pairs are scaled so that their largest entry is 1, and X is kept when every commutator
    [A, X] is below ``tol`` in that scale: a generator that commutes only approximately (slow RoPE
    frequencies over a short example come within ~1e-9) changes the outputs by about that much,
    so it is left out. The condition is linear in A, so the principal directions of span(pairs),
    each weighted by its singular value, stand in for the pairs (r of them: 1 without RoPE, about d
    with it; identical pairs, such as those of heads with the same positional map, count as one
    pair of weight sqrt(multiplicity), which leaves the principal directions as they are).

    The candidate space starts from :func:`_symmetric_commutant` (a necessary condition, from one
    d x d eigendecomposition) and is cut down by one matrix at a time, a generic combination first
    so that the later cuts are cheap; each cut keeps the combinations of the current basis whose
    commutator with A is negligible (left singular vectors of the stacked commutators [A, X_i]
    with small singular values).
    """
    if len(pairs) == 0:
        return full_rotation_algebra(d) / 2**0.5  # orthonormal in the Frobenius inner product
    flat = pairs.reshape(len(pairs), -1)
    flat = flat / flat.abs().max().clamp_min(1e-30)
    flat, counts = torch.unique(flat, dim=0, return_counts=True)
    flat = flat * counts.to(flat.dtype).sqrt()[:, None]
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)
    rank = int((s > 10 * tol * s[0]).sum())
    span = (s[:rank, None] / s[0] * vh[:rank]).reshape(-1, d, d)  # weighted: small directions matter less
    coefficients = torch.randn(len(span), generator=torch.Generator().manual_seed(0), dtype=span.dtype)
    generic = torch.einsum("j,jab->ab", coefficients.to(span.device), span)
    basis = _symmetric_commutant(generic + generic.T)
    for a in (generic, *span):
        commutators = (a @ basis - basis @ a).reshape(len(basis), -1)  # row i: vec([A, X_i])
        # every candidate commutes with A already: each entry, or every singular value (at most the
        # Frobenius norm), is negligible
        if commutators.abs().max() <= tol or torch.linalg.matrix_norm(commutators) <= 10 * tol:
            continue
        if len(basis) > 64:  # cheap, loose pre-cut through the Gram matrix (it squares the precision)
            eigenvalues, eigenvectors = torch.linalg.eigh(commutators @ commutators.T)
            loose = eigenvalues <= 1e-8 * max(eigenvalues[-1].item(), (a * a).sum().item())
            basis = torch.einsum("ik,iab->kab", eigenvectors[:, loose], basis)
            commutators = eigenvectors[:, loose].T @ commutators
        u, singular, _ = torch.linalg.svd(commutators, full_matrices=False)
        keep = singular <= 10 * tol
        basis = torch.einsum("ik,iab->kab", u[:, keep], basis)
        if len(basis) == 0:
            break
    return basis


def _symmetric_commutant(h: torch.Tensor, gap: float = 1e-3) -> torch.Tensor:
    """An orthonormal basis of the X in so(d) that commute with the symmetric matrix ``h``, taking
    eigenvalues closer than ``gap`` (relative to the largest) as equal, shape (k, d, d).

    With ``h = A + A^T``: a skew X commutes with A^T whenever it commutes with A
    (``[A^T, X] = [A, X]^T``), so with ``h``; the X commuting with ``h`` are ``V Y V^T`` for ``Y``
    skew and block diagonal over the clusters of ``h``'s eigenvalues (``h = V diag(mu) V^T``). Used as
    the candidates for the exact test, this is a necessary condition only: clusters are merged
    loosely (eigenvalues closer than ``gap`` count as one), so that eigenvectors are accurate to
    rounding / gap, far below the commutation tolerance, and no generator that commutes is lost.
    """
    d = h.shape[-1]
    mu, v = torch.linalg.eigh(h)
    cut = (mu.diff() > gap * mu.abs().max().clamp_min(1e-30)).nonzero().flatten() + 1
    bounds = [0, *cut.tolist(), d]
    pairs = [(i, j) for lo, hi in zip(bounds, bounds[1:]) for i in range(lo, hi) for j in range(i + 1, hi)]
    if not pairs:
        return torch.zeros(0, d, d, dtype=h.dtype, device=h.device)
    i, j = torch.tensor(pairs, device=h.device).T
    outer = v[:, i].T[:, :, None] * v[:, j].T[:, None, :]  # u_i u_j^T per pair
    return (outer - outer.transpose(1, 2)) / 2**0.5


def _query_key_algebra(q: _HeadLayout, k: _HeadLayout, device: torch.device) -> torch.Tensor:
    """The rotations of each head's query and key dimensions that leave every score unchanged: the
    commutant of the relative positional maps ``Q_m^T K_n`` (all heads, up to 8 positions m, n),
    computed on ``device`` (the model's) and returned on the CPU."""
    seq, _, d = q.maps.shape[:3]
    positions = torch.arange(seq) if seq <= 8 else torch.linspace(0, seq - 1, 8).long()
    pairs = torch.einsum("mhca,nhcb->hmnab", q.maps[positions], k.maps[positions]).reshape(-1, d, d)
    return _commutant_algebra(pairs.to(device), d, _COMMUTANT_TOL).cpu()


def _attention_families(g: _Graph, attn: _AttentionSite, memo: _AttentionMemo
                        ) -> tuple[list[GaugeFamily], list[Skipped]]:
    site = attn.name
    if g.example_inputs is None:
        return [], [Skipped(site, "qk_rotation/vo_rotation", f"{_NEEDS_EXAMPLES} to probe the attention maps")]
    q_arg, k_arg, v_arg = attn.q, attn.k, attn.v
    linears = [_source_linear(g, a) for a in (q_arg, k_arg, v_arg)]
    families: list[GaugeFamily] = []
    skipped: list[Skipped] = []
    if any(lin is None for lin in linears):
        return [], [Skipped(site, "qk_rotation/vo_rotation", "query/key/value do not each come from one Linear")]
    q_lin, k_lin, v_lin = linears
    if len({q_lin, k_lin, v_lin}) != 3:
        return [], [Skipped(site, "qk_rotation/vo_rotation", "query, key and value share a projection call (fused qkv is not analysed)")]
    if any(g.out_axis(lin) != 0 for lin in linears):
        return [], [Skipped(site, "qk_rotation/vo_rotation", "head rotations are implemented for (out, in) weights only")]
    for lin, arg, key in ((q_lin, q_arg, "q"), (k_lin, k_arg, "k"), (v_lin, v_arg, "v")):
        slot_ok = set(g.value_users(arg)) == attn.consumers[key] and all(
            arg not in (other, *g.ancestors(other)) for other_key, other in (("q", q_arg), ("k", k_arg), ("v", v_arg))
            if other_key != key and isinstance(other, fx.Node))
        if not slot_ok or not _exclusive_flow(g, lin, arg) or g.calls[lin.target] != 1:
            return [], [Skipped(site, "qk_rotation/vo_rotation", f"{lin.target} output is used outside its attention slot")]
    for extra in attn.extras:
        if isinstance(extra, fx.Node) and ({q_lin, k_lin, v_lin} & (g.ancestors(extra) | {extra})):
            return [], [Skipped(site, "qk_rotation/vo_rotation", "the attention mask or scale depends on the projections")]
    prefix = _common_prefix([q_lin.target, k_lin.target, v_lin.target])
    measured, reasons = {}, {}
    for key, lin, arg in (("q", q_lin, q_arg), ("k", k_lin, k_arg), ("v", v_lin, v_arg)):
        measured[key], reasons[key] = _measure_projection(g, lin, arg, memo)
    if measured["v"] is None:
        skipped.append(Skipped(prefix, "vo_rotation", reasons["v"]))
    if measured["q"] is None or measured["k"] is None:
        skipped.append(Skipped(prefix, "qk_rotation", reasons["q"] or reasons["k"]))
    q, k, v = measured["q"], measured["k"], measured["v"]
    n_query = g.shape(q_arg)[1] if attn.output.kwargs.get("enable_gqa") else None
    algebra_key = (q, k, n_query)
    if n_query is not None:
        # grouped-query SDPA: query head h reads key/value head h // (query heads / kv heads)
        k, v = (None if p is None else p.repeated(n_query) for p in (k, v))
    if q is not None and len({tuple(c) for c in q.heads}) != q.maps.shape[1]:
        skipped.append(Skipped(prefix, "qk_rotation", "query heads are not distinct channel blocks"))
        q = None

    def grouping(layout: _HeadLayout) -> tuple[list[list[int]], tuple[int, ...]]:
        kv_channels: list[list[int]] = []
        group = []
        for chans in layout.heads:
            if chans not in kv_channels:
                kv_channels.append(chans)
            group.append(kv_channels.index(chans))
        return kv_channels, tuple(group)

    def rows(channel_lists: list[list[int]]) -> torch.Tensor:
        return torch.tensor(channel_lists, dtype=torch.long)

    # ---- query/key rotation -----------------------------------------------------------------
    k_channels, k_group = grouping(k) if k is not None else ([], ())
    flat_k = [c for chans in k_channels for c in chans]
    if q is not None and k is not None and len(set(flat_k)) != len(flat_k):
        skipped.append(Skipped(prefix, "qk_rotation", "key heads overlap"))
    elif q is not None and k is not None:
        if algebra_key not in memo.algebras:
            memo.algebras[algebra_key] = _query_key_algebra(q, k, g.device)
        algebra = memo.algebras[algebra_key]
        if algebra.shape[0] == 0:
            skipped.append(Skipped(prefix, "qk_rotation", "no rotation commutes with the positional map"))
        else:
            families.append(HeadRotation(
                name=f"qk_rotation:{prefix}", kind="qk_rotation", algebra=algebra, query_group=k_group,
                left=((g.param(q_lin.target, "weight"), g.param(q_lin.target, "bias"), rows(q.heads), True),
                      (g.param(k_lin.target, "weight"), g.param(k_lin.target, "bias"), rows(k_channels), False)),
            ))
    # ---- value/output rotation --------------------------------------------------------------
    if v is None:
        return families, skipped
    v_channels, v_group = grouping(v)
    d = v.maps.shape[2]
    eye = torch.eye(d, dtype=v.maps.dtype)
    if (v.maps - eye).abs().max() > 10 * _PROBE_TOL:
        skipped.append(Skipped(prefix, "vo_rotation", "the value path is not a pure head selection"))
        return families, skipped
    out_proj, reason = _output_projection(g, attn.output)
    if out_proj is None:
        skipped.append(Skipped(prefix, "vo_rotation", reason))
        return families, skipped
    o_lin, col_index = out_proj
    if g.out_axis(o_lin) != 0:
        skipped.append(Skipped(prefix, "vo_rotation", "head rotations are implemented for (out, in) weights only"))
        return families, skipped
    families.append(HeadRotation(
        name=f"vo_rotation:{prefix}", kind="vo_rotation", algebra=memo.full_algebra(d), query_group=v_group,
        left=((g.param(v_lin.target, "weight"), g.param(v_lin.target, "bias"), rows(v_channels), False),),
        right=((g.param(o_lin.target, "weight"), col_index),),
    ))
    return families, skipped


def _output_projection(g: _Graph, attn: fx.Node) -> tuple[tuple[fx.Node, torch.Tensor] | None, str | None]:
    """The single Linear that reads the attention output through a pure channel permutation."""
    shape = g.shape(attn)
    closure, stack, linears = {attn}, [attn], []
    while stack:
        n = stack.pop()
        for u in g.value_users(n):
            if g.is_linear(u):
                linears.append(u)
            elif u.op == "output":
                return None, "the attention output is a model output"
            elif u not in closure:
                closure.add(u)
                stack.append(u)
    if len(linears) != 1 or g.calls[linears[0].target] != 1:
        return None, "the attention output does not reach exactly one Linear"
    o_lin = linears[0]
    o_in = o_lin.args[0]
    in_shape = g.shape(o_in)
    if shape is None or in_shape is None:
        return None, "needs shapes to measure the output projection"
    batch, heads, seq, d = shape
    code = (torch.arange(heads * d, dtype=torch.float64) + 1).reshape(heads, 1, d).expand(batch, heads, seq, d)
    got = g.probe({attn: code.contiguous()}, [o_in])[0].cpu()
    if tuple(got.shape[-1:]) != (heads * d,) or got.shape[-2] != seq:
        return None, "the output projection input is not (…, seq, heads*d)"
    first = got.reshape(-1, heads * d)[0]
    if not torch.all((got.reshape(-1, heads * d) - first).abs() < 1e-9):
        return None, "the output projection mixes positions or batch entries"
    codes = first.round().long() - 1
    if sorted(codes.tolist()) != list(range(heads * d)):
        return None, "the attention output reaches the output projection through a non-permutation"
    col_index = torch.empty(heads * d, dtype=torch.long)
    col_index[codes] = torch.arange(heads * d)
    col_index = col_index.reshape(heads, d)
    # verify with a random probe (positions and batch entries kept apart)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = g.probe({attn: x}, [o_in])[0].cpu()
    expect = torch.zeros(batch, seq, heads * d, dtype=torch.float64)
    for h in range(heads):
        expect[..., col_index[h]] = x[:, h]
    if (got.reshape(expect.shape) - expect).abs().max() > 100 * _PROBE_TOL * expect.abs().max():
        return None, "the attention output reaches the output projection through a non-permutation"
    return (o_lin, col_index), None


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for tokens in zip(*parts):
        if len(set(tokens)) != 1:
            break
        prefix.append(tokens[0])
    return ".".join(prefix) or names[0]


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def find_gauges(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    output: OutputKind = "values",
) -> GaugeSet:
    """Discover the gauge families of ``model`` by tracing its computation.

    Args:
        model: any ``nn.Module`` whose ``forward`` has no Python control flow on tensor values
            (with ``example_inputs``, a module that has some is kept whole and listed in
            ``skipped``); arguments not given keep their defaults. A ``torch.compile`` wrapper is
            read through: the module it compiles is traced (a note in ``GaugeSet.notes`` says so).
        example_inputs: a tensor or tuple of tensors to run ``forward`` on, or a dict of keyword
            arguments (tensors become inputs, other values are passed as they are, e.g.
            ``{"input_ids": ids, "use_cache": False}`` for a ``transformers`` model). Needed for the
            analyses that read shapes (indexing, reductions, views) and for the attention probes;
            without it those analyses are skipped with that reason, and one warning (also kept in
            ``GaugeSet.notes``) names them. A small batch is enough (e.g. 1 x 8 tokens); the graph
            is traced for the example's shapes (:mod:`.tracing`). When ``forward`` returns a mapping
            (a ``ModelOutput``), its ``"logits"`` entry is the output.
        output: ``"logits"`` when the model output is consumed by a softmax / cross-entropy over its
            last axis (then the output Linear carries a logit shift), ``"values"`` otherwise.

    The analysis runs in float64 on the model's device: a model in another precision (bfloat16,
    float16, float32) is analysed on a float64 copy (8 bytes per parameter, made tensor by tensor),
    its example inputs are moved there (floating ones converted), and the families are bound back to
    ``model``, which is left as it was (values, dtypes, train/eval modes). When no family is found,
    or none of a kind at any of the sites the structure offers it (every affine norm, every
    attention, the output layer when ``output="logits"``), a ``UserWarning`` says so with the most
    frequent reasons (the sentence is also kept in ``GaugeSet.notes``).

    Returns:
        A :class:`GaugeSet` bound to ``model``, with ``skipped`` listing every candidate left out and why.
    """
    if output not in ("logits", "values"):
        raise ValueError(f"output must be 'logits' or 'values', got {output!r}")
    keyword_inputs: dict[str, Any] = {}
    if isinstance(example_inputs, Mapping):
        keyword_inputs, example_inputs = dict(example_inputs), ()
    elif example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    notes = []
    if uncompiled(model) is not model:
        model = uncompiled(model)
        notes.append(f"read through torch.compile: traced the compiled {type(model).__name__} (_orig_mod); "
                     "the families name its parameters, which the compiled module shares")
    analysed = _float64_copy(model)
    device = next((p.device for p in analysed.parameters()), torch.device("cpu"))
    if example_inputs is not None:
        example_inputs = tuple(_analysis_input(x, device) for x in example_inputs)
    keyword_inputs = {k: _analysis_input(x, device) for k, x in keyword_inputs.items()}
    with _eval_mode(analysed):  # no dropout while probing; every module's own mode is restored after
        g = _Graph(analysed, example_inputs, keyword_inputs)
        families, skipped, input_layers, output_layers = _analyse(g, output)
    waiting = [s for s in skipped if _NEEDS_EXAMPLES in s.reason] if example_inputs is None else []
    found_notes = [_needs_examples_note(waiting)] if waiting else []
    coverage = _coverage_note(families, skipped, output, bool(output_layers))
    found_notes += [coverage] if coverage else []
    if found_notes:
        warnings.warn(f"find_gauges({type(model).__name__}): " + " ".join(found_notes), stacklevel=2)
    gauges = GaugeSet(families, skipped, analysed, notes + found_notes,
                      input_layers=input_layers, output_layers=output_layers)
    return gauges if analysed is model else gauges.bind(model)


def _analyse(g: _Graph, output: OutputKind) -> tuple[list[GaugeFamily], list[Skipped], list[str], list[str]]:
    """The families found on the traced model, the candidates left out, and the weights of the layers
    that read the model's input and write its output directly (see :class:`GaugeSet`)."""
    families: list[GaugeFamily] = []
    skipped = [Skipped(site or type(g.model).__name__, "all", f"kept whole, not analysed inside: its code branches on "
                       f"tensor values ({why})") for site, why in g.opaque.items()]

    # the Linears and convolutions whose output reaches the model output without passing another layer
    def layer(x: fx.Node) -> bool:
        return g.is_linear(x) or isinstance(g.module(x), CONVOLUTIONS)

    output_linears = {x for x in g.upstream(g.output, stop=lambda x: layer(x) or g.is_norm(x) or is_channel_layer(g.module(x)))
                      if layer(x)}
    # the Linears that read a model input without another layer with parameters in between
    def learned(x: fx.Node) -> bool:
        mod = g.module(x)
        return mod is not None and next(mod.parameters(), None) is not None

    input_linears = {n for n in g.nodes if layer(n)
                     and any(x.op == "placeholder" for x in g.upstream(n, stop=learned))}

    def add(family: GaugeFamily, site: str) -> None:
        tied = [p for p in family.parameters if p in g.tied]
        if tied:
            skipped.append(Skipped(site, family.kind, f"parameter {tied[0]} is tied to another module"))
        else:
            families.append(family)

    for n in g.nodes:
        mod = g.module(n)
        if g.is_linear(n):
            if g.calls[n.target] != 1:
                skipped.append(Skipped(n.target, "neuron_scale/logit_shift", f"module is called {g.calls[n.target]} times"))
                continue
            weight, bias = g.param(n.target, "weight"), g.param(n.target, "bias")
            out_axis = g.out_axis(n)
            absorbed, shift_reason = _follow_logit_shift(g, n, output)
            if absorbed is not None:
                kind = "logit_shift" if absorbed == "model output" else "router_shift"
                if out_axis == 0:
                    add(LogitShift(f"{kind}:{n.target}", weight, mod.weight.shape[1], bias, absorbed, kind), n.target)
                else:
                    skipped.append(Skipped(n.target, kind, "the shift is implemented for (out, in) weights only"))
            sinks, reason = _follow_channel_scaling(g, n)
            if reason is None and sinks:
                multiplied = (AxisRef(weight, out_axis),) + ((AxisRef(bias, 0),) if bias else ())
                divided = tuple(AxisRef(g.param(s.target, "weight"), g.in_axis(s)) for s in sinks)
                if any(g.calls[s.target] != 1 for s in sinks):
                    skipped.append(Skipped(n.target, "neuron_scale", "a consumer module is called more than once"))
                else:
                    add(NeuronScaling(f"neuron_scale:{n.target}", mod.weight.shape[out_axis], multiplied, divided,
                                      producer=n.target), n.target)
            elif absorbed is None:
                skipped.append(Skipped(n.target, "neuron_scale", reason or "no consumer"))
            if absorbed is None and shift_reason and (
                    "model output" in shift_reason or (output == "logits" and n in output_linears)):
                skipped.append(Skipped(n.target, "logit_shift", shift_reason))
        elif g.is_norm(n) and not is_channel_layer(mod):
            site = n.target
            if getattr(mod, "weight", None) is None:
                skipped.append(Skipped(site, "norm_scale", "the norm has no gain"))
                continue
            if g.calls[site] != 1:
                skipped.append(Skipped(site, "norm_scale", f"module is called {g.calls[site]} times"))
                continue
            gain_reason = g.gain_reason(n)
            if gain_reason is not None:
                skipped.append(Skipped(site, "norm_scale", gain_reason))
                continue
            sinks, reason = _follow_channel_scaling(g, n)
            if reason is not None or not sinks:
                skipped.append(Skipped(site, "norm_scale", reason or "no consumer"))
                continue
            if any(g.calls[s.target] != 1 for s in sinks):
                skipped.append(Skipped(site, "norm_scale", "a consumer module is called more than once"))
                continue
            if any(g.in_axis(s) != 1 for s in sinks):
                # the norm family and the optimizers' merged-column frames read consumer columns on axis 1
                skipped.append(Skipped(site, "norm_scale", "a consumer stores its weight (in, out) (e.g. Conv1D); "
                                                           "norm scaling is offered for (out, in) consumers only"))
                continue
            consumers = tuple(g.param(s.target, "weight") for s in sinks)
            add(norm_scaling(f"norm_scale:{site}", g.param(site, "weight"), g.param(site, "bias"), consumers,
                             mod.weight.shape[0]), site)
    found, missed, _ = channel_families(g, _NEEDS_EXAMPLES)
    for fam in found:
        add(fam, fam.producer)
    skipped += missed
    memo = _AttentionMemo()
    for site in _attention_sites(g):
        found, missed = _attention_families(g, site, memo)
        for fam in found:
            add(fam, fam.name.split(":", 1)[1])
        skipped += missed
    layer_weights = {n: g.param(n.target, "weight") for n in (*input_linears, *output_linears)}
    return (families, skipped, sorted({layer_weights[n] for n in input_linears} - {None}),
            sorted({layer_weights[n] for n in output_linears} - {None}))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout), every module's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _float64_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when its floating parameters and buffers are all float64; otherwise a deep copy
    in which they are (complex ones complex128), on their own devices. Half-precision rounding would
    decide which maps commute (a bfloat16 Llama would claim query/key rotations of twice the true
    dimension) and hide every norm gain's action; converting is exact, so the copy computes the
    model's own function. The copy takes 8 bytes per parameter; each tensor is converted once."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.dtype in (torch.float64, torch.complex128) or not (t.is_floating_point() or t.is_complex())
           for t in tensors):
        return model
    memo: dict[int, Any] = {}  # tied tensors stay tied: each is converted once, by identity
    for p in model.parameters():
        if p.is_floating_point() or p.is_complex():
            memo[id(p)] = nn.Parameter(_to_64_bits(p.detach()), requires_grad=p.requires_grad)
    for b in model.buffers():
        if b.is_floating_point() or b.is_complex():
            memo[id(b)] = _to_64_bits(b)
    try:
        return copy.deepcopy(model, memo)
    except Exception as err:  # noqa: BLE001 - any reason a model cannot be copied
        raise ValueError(
            f"find_gauges analyses a float64 copy of a model in another precision, and "
            f"copy.deepcopy({type(model).__name__}) failed ({type(err).__name__}: {err}); "
            "pass the model in float64 (e.g. a float64 copy you made) and bind the result to yours "
            "with GaugeSet.bind") from err


def _to_64_bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        return t.to(torch.complex128)
    return t.to(torch.float64) if t.is_floating_point() else t


def _analysis_input(x: Any, device: torch.device) -> Any:
    """An example input as the float64 analysis reads it: on the model's device, floats in float64."""
    return _to_64_bits(x.to(device)) if isinstance(x, torch.Tensor) else x


# The kinds a model's structure offers at known sites (each affine norm, each attention, the output
# layer when the output feeds a softmax), with what one site is called.
_STRUCTURAL_KINDS = {"norm_scale": "norm", "qk_rotation": "attention", "vo_rotation": "attention",
                     "logit_shift": "output layer"}


def _coverage_note(families: list[GaugeFamily], skipped: list[Skipped], output: OutputKind,
                   has_output_layer: bool) -> str | None:
    """A sentence when discovery found no family at all, or none of a kind at any of the sites the
    structure offers it (every affine norm left out, every attention, the output layer when
    ``output="logits"``), with the most frequent reasons; None when nothing is missing that way.
    Candidates that only wait for example inputs are left to :func:`_needs_examples_note`."""
    found = {f.kind for f in families}
    missing = []
    for kind, site in _STRUCTURAL_KINDS.items():
        if kind in found or (kind == "logit_shift" and output != "logits"):
            continue
        reasons = [s.reason for s in skipped if kind in s.family.split("/")
                   and s.family != "neuron_scale/logit_shift" and _NEEDS_EXAMPLES not in s.reason]
        if not reasons:
            continue
        # reasons that differ only in the names and numbers in them ("add_3 adds it ...", "add_6 adds
        # it ...") are one reason, shown by its first instance
        groups = Counter(_NAMES_AND_NUMBERS.sub("#", r) for r in reasons)
        example = {_NAMES_AND_NUMBERS.sub("#", r): r for r in reversed(reasons)}
        common = "; ".join(example[key] + (f" (and {count - 1} alike)" if count > 1 else "")
                           for key, count in groups.most_common(2))
        more = f"; {len(groups) - 2} other reason{'s' * (len(groups) > 3)}" if len(groups) > 2 else ""
        sites = len(reasons)
        where = f"any of the {sites} {site}s" if sites > 1 else f"the one {site}"
        missing.append(f"no {kind} at {where} ({common}{more})")
    if families and not missing:
        return None
    if families:
        head = "fewer families than the model's structure suggests: "
    else:
        head = ("no gauge family found, so an optimizer given these gauges steps this model as its base rule "
                "(AdamW, Muon) would" + (": " if missing else ""))
    hint = ("; if the output feeds a softmax or cross-entropy, pass output='logits' (the output layer then carries "
            "a logit shift)" if not families and output == "values" and has_output_layer else "")
    return (f"{head}{'; '.join(missing)}{hint}. "
            "gauges.summary(show_skipped=True) lists every candidate left out and why.")


def _needs_examples_note(waiting: list[Skipped], shown: int = 3) -> str:
    """One sentence naming the candidates left out for lack of example inputs, a few sites per family."""
    sites: dict[str, list[str]] = {}
    for s in waiting:
        sites.setdefault(s.family, []).append(s.site)
    listed = "; ".join(f"{family} at {', '.join(names[:shown])}"
                       + (f" and {len(names) - shown} more" if len(names) > shown else "")
                       for family, names in sites.items())
    return (f"no example_inputs: {len(waiting)} candidate(s) need them to be analysed ({listed}); "
            "pass a small batch (e.g. 1 x 8 tokens) as example_inputs")


__all__ = ["find_gauges", "OutputKind"]
