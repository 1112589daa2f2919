"""Tracing models whose ``forward`` plain :func:`torch.fx.symbolic_trace` cannot follow.

Library models (Hugging Face ``transformers``, ``timm``) unpack shapes (``(*x.shape[:-1], -1, d)``),
branch on them (``if q.shape[2] > 1``), take ``**kwargs`` and return output dataclasses. Plain fx
refuses all of these. :class:`ShadowTracer` records the same torch-level graph but runs every
recorded op on real example inputs as it goes, so each proxy carries its concrete value:

- unpacking a tuple-valued proxy (a shape, the outputs of ``chunk``) yields one proxy per entry;
- ``len``, ``int`` and Python branches read the concrete value, and are allowed only where that
  value is *static*: it depends on the inputs' shapes and dtypes and on the model's buffers alone
  (never on the values of inputs or parameters): the graph is then exact for every input of the
  example's shapes, which is how discovery uses it;
- buffers are recorded as graph attributes like parameters, so ops that mix a buffer with a
  traced size (BERT's ``token_type_ids[:, :seq].expand(batch, seq)``) are recorded too;
- a branch on tensor *values* (data-dependent routing) raises :class:`torch.fx.proxy.TraceError`.

Leaves (calls kept whole in the graph): every ``torch.nn`` module as in plain fx, and every module
that :func:`is_norm_like` or :func:`is_linear_like` accepts by its parameters (a custom
``RMSNorm``, GPT-2's ``Conv1D``); discovery then checks what each one computes before relying on it.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx import _symbolic_trace
from torch.fx.proxy import TraceError

_CONSTANT_ATTRIBUTES = {"dtype", "device", "ndim", "is_cuda", "is_meta", "layout"}
_SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_floating_point"}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "get_device", "is_floating_point", "is_contiguous"}


def _own_parameters(m: nn.Module) -> dict[str, torch.Tensor]:
    return dict(m.named_parameters(recurse=False))


def is_norm_like(m: nn.Module) -> bool:
    """A childless module whose only parameters are a 1-D ``weight`` and optionally a ``bias`` of the
    same length (LayerNorm, RMSNorm and their re-implementations). Only a candidate: discovery
    measures whether the gain acts as a per-channel factor on the output."""
    params = _own_parameters(m)
    weight = params.get("weight")
    if next(m.children(), None) is not None or weight is None or weight.dim() != 1:
        return False
    bias = params.get("bias")
    return set(params) <= {"weight", "bias"} and (bias is None or bias.shape == weight.shape)


def is_linear_like(m: nn.Module) -> bool:
    """A childless module whose only parameters are a 2-D ``weight`` and optionally a 1-D ``bias``
    (``nn.Linear``, GPT-2's ``Conv1D`` storing ``(in, out)``). Only a candidate: discovery measures
    which weight axis the outputs run along before relying on it."""
    params = _own_parameters(m)
    weight = params.get("weight")
    if isinstance(m, nn.Embedding) or next(m.children(), None) is not None or weight is None or weight.dim() != 2:
        return False
    bias = params.get("bias")
    return set(params) <= {"weight", "bias"} and (bias is None or bias.dim() == 1)


class KeywordCall(nn.Module):
    """``model(*positional, **keywords, **constants)`` with the tensors passed positionally, so that
    fx can trace models whose ``forward`` takes ``**kwargs``. When the model returns a mapping (a
    ``transformers`` ``ModelOutput``), its ``"logits"`` entry (else its first entry) is returned."""

    def __init__(self, model: nn.Module, positional: int, keywords: Sequence[str], constants: Mapping[str, Any]):
        super().__init__()
        self.model = model
        self.positional = positional
        self.keywords = tuple(keywords)
        self.constants = dict(constants)

    def forward(self, *inputs):
        args = inputs[: self.positional]
        kwargs = dict(zip(self.keywords, inputs[self.positional:]))
        out = self.model(*args, **kwargs, **self.constants)
        if isinstance(out, Mapping):
            return out["logits"] if "logits" in out else next(iter(out.values()))
        return out


@contextlib.contextmanager
def _unpatched_modules() -> Iterator[None]:
    """Run a leaf module for real while fx has patched ``nn.Module.__call__``/``__getattr__`` to record
    calls (its parameters must be read as tensors, not as proxies)."""
    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _symbolic_trace._orig_module_call, _symbolic_trace._orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched


class DataDependentError(TraceError):
    """Python control flow on tensor values met while tracing."""


class _TensorIterationError(DataDependentError, TypeError):
    """Iterating over a tensor (a TypeError too: ``ModelOutput`` probes iterability with it)."""


class _ShadowProxy(fx.Proxy):
    """A proxy that knows its concrete value (see :class:`ShadowTracer`). Its dtype, device and number
    of dimensions are constants of the graph and are returned as such."""

    def __getattr__(self, name: str) -> Any:
        if name in _CONSTANT_ATTRIBUTES:
            value = self.tracer.values[self.node]
            if isinstance(value, torch.Tensor):
                return getattr(value, name)
        return super().__getattr__(name)

    def __len__(self) -> int:  # a length is a shape (of a tuple, or of a tensor's first axis)
        return len(self.tracer.values[self.node])

    def __int__(self) -> int:
        return int(self.tracer.concrete(self.node, "int()"))

    def __index__(self) -> int:
        return operator.index(self.tracer.concrete(self.node, "an index"))

    def __float__(self) -> float:
        return float(self.tracer.concrete(self.node, "float()"))


class ShadowTracer(fx.Tracer):
    """An fx tracer that evaluates every recorded node on real inputs while tracing.

    ``inputs`` are the values of the root's placeholders in order (a ``*args`` placeholder takes
    them all as one tuple).
    """

    def __init__(self, inputs: Sequence[Any]):
        super().__init__()
        self.proxy_buffer_attributes = True
        self._inputs = list(inputs)
        self._placeholders = 0
        self.values: dict[fx.Node, Any] = {}
        self.static: set[fx.Node] = set()  # nodes whose value depends on shapes, dtypes and buffers alone
        self.opaque: dict[str, str] = {}  # modules kept whole because they branch on tensor values

    # --- leaves ---------------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_norm_like(m) or is_linear_like(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs) -> Any:
        """Trace through ``m``; if its code branches on tensor values (an MoE dispatch loop), drop what
        was recorded inside it and keep the call whole instead (listed in ``opaque`` with why)."""
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        # iter(): before torch 2.13 reversed(graph.nodes) is a reversed node list, not an iterator
        mark, depth = next(iter(reversed(self.graph.nodes)), None), len(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except DataDependentError as err:
            while len(self.module_stack) > depth:  # fx pops its scope only on success
                self.module_stack.popitem(last=True)
            recorded = []
            for node in reversed(self.graph.nodes):
                if node is mark:
                    break
                recorded.append(node)
            for node in recorded:  # newest first, so every node's users are gone before it
                if node.op != "get_attr":  # fx caches parameter proxies: leave them (unused)
                    self.graph.erase_node(node)
                    self.values.pop(node, None)
                    self.static.discard(node)
            self.opaque[path] = str(err)
            return self.create_proxy("call_module", path, args, kwargs)

    # --- shadow evaluation ------------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShadowProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "output":
            return node
        if kind == "placeholder":
            value = tuple(self._inputs[self._placeholders:]) if str(target).startswith("*") \
                else self._inputs[self._placeholders]
            self._placeholders += len(value) if str(target).startswith("*") else 1
        else:
            value = self._evaluate(node)
            if self._is_static(node, value):
                self.static.add(node)
        self.values[node] = value
        return node

    def _is_static(self, node: fx.Node, value: Any) -> bool:
        """Whether ``node``'s value is the same for every input of the example's shapes: a shape or
        dtype read, a buffer (a constant of the model, unlike a parameter), or an op on static values."""
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            return True
        if node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRIBUTES:
            return True
        if node.op == "get_attr":
            return not isinstance(value, nn.Parameter)
        return all(a in self.static for a in node.all_input_nodes)

    def _evaluate(self, node: fx.Node) -> Any:
        args = fx.node.map_arg(node.args, self.values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.values.__getitem__)
        with torch.no_grad(), _unpatched_modules():
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                return self.root.get_submodule(node.target)(*args, **kwargs)
            if node.op == "get_attr":
                return operator.attrgetter(node.target)(self.root)
        raise TraceError(f"cannot evaluate node {node.op} {node.target}")

    def concrete(self, node: fx.Node, use: str) -> Any:
        """The value of ``node`` for Python to use; only static values (see :meth:`_is_static`)."""
        if node not in self.static:
            raise DataDependentError(f"{use} of {node.name} depends on tensor values (data-dependent control flow)")
        return self.values[node]

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.concrete(obj.node, "a Python branch"))

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = self.values[obj.node]
        if isinstance(value, torch.Tensor):
            raise _TensorIterationError(f"iterating over {obj.node.name} depends on tensor values")
        return iter([obj[i] for i in range(len(value))])

    def keys(self, obj: fx.Proxy) -> Any:
        return self.values[obj.node].keys()


def trace_with_examples(model: nn.Module, args: Sequence[Any], keywords: Mapping[str, Any]
                        ) -> tuple[fx.GraphModule, tuple, dict[str, str]]:
    """Trace ``model(*args, **keywords)``. Returns the graph module (its module and attribute names
    relative to ``model``), the tensors to run it on (its placeholders, in order), and the modules
    kept whole because their code branches on tensor values (name -> why; ``""`` is the model).

    Tensor entries of ``keywords`` become inputs of the graph; other entries are fixed constants.
    """
    tensor_keywords = {k: v for k, v in keywords.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in keywords.items() if k not in tensor_keywords}
    inputs = (*args, *tensor_keywords.values())
    wrapper = KeywordCall(model, len(args), list(tensor_keywords), constants)
    tracer = ShadowTracer(inputs)
    was_training = model.training
    model.eval()
    try:
        graph = tracer.trace(wrapper)
    finally:
        model.train(was_training)
    # Name modules and parameters as the model does ("layers.0.mlp", not "model.layers.0.mlp"); the
    # tracer's own tensor constants keep their names.
    prefix, owned = "model.", {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            target = node.target
            node.target = target[len(prefix):] if target.startswith(prefix) else target
            owned[node.target] = (wrapper.get_submodule(target) if node.op == "call_module"
                                  else operator.attrgetter(target)(wrapper))
        if "nn_module_stack" in node.meta:  # the modules a node was recorded in, outermost first
            node.meta["nn_module_stack"] = type(node.meta["nn_module_stack"])(
                (path[len(prefix):], (path[len(prefix):], kind))
                for path, (_, kind) in node.meta["nn_module_stack"].items() if path.startswith(prefix))
    graph_module = fx.GraphModule(owned, graph, class_name=type(model).__name__)
    graph_module.training = model.training  # it shares the model's modules: train()/eval() on it reach them
    opaque = {path[len(prefix):] if path.startswith(prefix) else "": why for path, why in tracer.opaque.items()}
    return graph_module, inputs, opaque


__all__ = ["ShadowTracer", "KeywordCall", "is_norm_like", "is_linear_like", "trace_with_examples"]
