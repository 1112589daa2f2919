"""Parameter roles: the one structural classifier of a model's parameters.

:func:`parameter_roles` gives every trainable parameter of a model one role, read from the model's
structure (module types, child names, shapes, head and expert counts; never name keywords) and,
when a :class:`~gaugeopt.gauges.GaugeSet` is given, from what ``find_gauges`` recorded. Two readers
share it:

* :func:`gaugeopt.optim.ddc_muon.muon_parameter_names` (DDCMuon's Muon/Adam split, the Muon + AdamW
  baseline, the benchmarks): the parameters whose role is in :data:`MUON_HIDDEN_ROLES` take Muon;
* :func:`gaugeopt.optim.symcompat.classify_parameters` (``symmetry_param_groups``): each role maps
  to a SymmetryCompatible rule (``symcompat.ROLE_DEFAULTS``), under the user's overrides.

The roles, and the evidence for each:

* ``embedding`` (:data:`EMBEDDING`): the weight of an ``nn.Embedding``.
* ``lm_head`` (:data:`LM_HEAD`): the Linear producing the model's output. Structurally: observed
  with ``example_inputs`` (a forward pass with hooks finds the Linear whose output tensor *is* the
  model output, its first element or its ``logits`` entry); otherwise the unique direct child Linear
  of the model shaped like an embedding table (``(out, in) == (num_embeddings, embedding_dim)``).
  From gauges: the weight of a ``LogitShift`` family of kind ``"logit_shift"`` (a softmax over the
  model's outputs does not see a common shift of its rows).
* ``tied_embedding_head`` (:data:`TIED_EMBEDDING_HEAD`): an embedding weight that is also the
  structural LM head (one tensor, several names).
* ``input_layer`` / ``output_layer`` (:data:`INPUT_LAYER`, :data:`OUTPUT_LAYER`): from gauges only,
  the weights in ``gauges.input_layers`` / ``gauges.output_layers``: the Linears and convolutions that
  read a model input, or write its output, with no other layer with parameters in between (an input
  projection, a patch embedding, a first convolution; a classifier's last layer).
* ``attention_qkv`` / ``attention_out`` (:data:`ATTENTION_QKV`, :data:`ATTENTION_OUT`): the
  ``q_proj``/``k_proj``/``v_proj`` and ``o_proj`` Linears of a module holding all four; ``heads`` is
  the query or key/value head count read from the module's ``n_heads``/``num_heads``/
  ``num_attention_heads`` and ``n_kv_heads``/``num_key_value_heads``/``num_kv_heads`` attributes,
  checked against the shapes (``None``, marked as a fallback, when the module has no head count).
* ``swiglu_gate_up`` / ``swiglu_down`` (:data:`SWIGLU_GATE_UP`, :data:`SWIGLU_DOWN`): a module with
  ``gate``/``up``/``down`` (or ``gate_proj``/``up_proj``/``down_proj``, ``w1``/``w3``/``w2``) Linears of
  shapes ``(f, d), (f, d), (d, f)``.
* ``moe_router`` (:data:`MOE_ROUTER`): in a module holding an ``experts`` container, the one child
  matrix with as many rows as experts (held by a child Linear, or bare by a router module).
* ``moe_expert_gate_up`` / ``moe_expert_down`` (:data:`MOE_EXPERT_GATE_UP`, :data:`MOE_EXPERT_DOWN`):
  SwiGLU matrices inside the expert container.
* ``moe_expert_tensor`` (:data:`MOE_EXPERT_TENSOR`): a 3-D ``(E, rows, cols)`` stack of per-expert
  matrices inside the expert container.
* ``conv_kernel`` (:data:`CONV_KERNEL`): the weight of an ``nn.Conv1d/2d/3d`` (Muon steps it as its
  ``(out, in * kernel)`` matricisation).
* ``vector`` (:data:`VECTOR`): any other 0-/1-D parameter (norm gains, biases, a temperature).
* ``matrix`` (:data:`MATRIX`): any other 2-D parameter: a conservative fallback (``fallback=True``).
* ``None``: any other tensor (3-D or more, e.g. the ViT's ``(1, P, d)`` position table): no role,
  with an ``error`` saying so.

Evidence precedence: an embedding (or tied embedding/head) first; then gauge evidence
(``logit_shift`` weight, then input layers, then output layers); then the structural roles (LM head,
convolution kernels, then per module in ``model.modules()`` order: attention, MoE, SwiGLU, the first
match kept); then the ``vector`` / ``matrix`` fallbacks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..gauges.channels import CONVOLUTIONS
from ..gauges.families import LogitShift
from ..gauges.gaugeset import GaugeSet

__all__ = [
    "ParameterRole",
    "parameter_roles",
    "ROLES",
    "MUON_HIDDEN_ROLES",
    "EMBEDDING",
    "LM_HEAD",
    "TIED_EMBEDDING_HEAD",
    "INPUT_LAYER",
    "OUTPUT_LAYER",
    "ATTENTION_QKV",
    "ATTENTION_OUT",
    "SWIGLU_GATE_UP",
    "SWIGLU_DOWN",
    "MOE_ROUTER",
    "MOE_EXPERT_GATE_UP",
    "MOE_EXPERT_DOWN",
    "MOE_EXPERT_TENSOR",
    "CONV_KERNEL",
    "MATRIX",
    "VECTOR",
]

# The role vocabulary. Plain strings: they are printed in tables, stored in param groups (and so in
# checkpoints) and written in docs and tests.
EMBEDDING = "embedding"
LM_HEAD = "lm_head"
TIED_EMBEDDING_HEAD = "tied_embedding_head"
INPUT_LAYER = "input_layer"
OUTPUT_LAYER = "output_layer"
ATTENTION_QKV = "attention_qkv"
ATTENTION_OUT = "attention_out"
SWIGLU_GATE_UP = "swiglu_gate_up"
SWIGLU_DOWN = "swiglu_down"
MOE_ROUTER = "moe_router"
MOE_EXPERT_GATE_UP = "moe_expert_gate_up"
MOE_EXPERT_DOWN = "moe_expert_down"
MOE_EXPERT_TENSOR = "moe_expert_tensor"
CONV_KERNEL = "conv_kernel"
MATRIX = "matrix"
VECTOR = "vector"

#: Every role :func:`parameter_roles` gives (``None``, no role, aside).
ROLES: tuple[str, ...] = (
    EMBEDDING, LM_HEAD, TIED_EMBEDDING_HEAD, INPUT_LAYER, OUTPUT_LAYER, ATTENTION_QKV, ATTENTION_OUT,
    SWIGLU_GATE_UP, SWIGLU_DOWN, MOE_ROUTER, MOE_EXPERT_GATE_UP, MOE_EXPERT_DOWN, MOE_EXPERT_TENSOR,
    CONV_KERNEL, MATRIX, VECTOR,
)

#: The roles of Muon's hidden matrices (DDCMuon and the Muon + AdamW baseline step them with Muon):
#: every 2-D role and convolution kernels, except the embedding, the LM head (tied or not) and the
#: input and output layers, which Muon's recipe leaves to AdamW. A 3-D ``moe_expert_tensor`` is not
#: one (DDCMuon's Muon steps matrices and kernels, not stacks of experts).
MUON_HIDDEN_ROLES: frozenset[str] = frozenset({
    ATTENTION_QKV, ATTENTION_OUT, SWIGLU_GATE_UP, SWIGLU_DOWN, MOE_ROUTER, MOE_EXPERT_GATE_UP, MOE_EXPERT_DOWN,
    CONV_KERNEL, MATRIX,
})

_SWIGLU_NAMES = {
    "gate": ("gate", "gate_proj", "w1"),
    "up": ("up", "up_proj", "w3"),
    "down": ("down", "down_proj", "w2"),
}
_HEAD_ATTRS = ("n_heads", "num_heads", "num_attention_heads")
_KV_HEAD_ATTRS = ("n_kv_heads", "num_key_value_heads", "num_kv_heads")
_EXPERT_COUNT_ATTRS = ("n_experts", "num_experts", "num_local_experts")


@dataclass(frozen=True)
class ParameterRole:
    """One (de-duplicated) parameter and its role.

    ``name`` is its first name in ``model.named_parameters(remove_duplicate=False)`` order and
    ``aliases`` its other names (a tied weight). ``role`` is one of :data:`ROLES`, or ``None`` when
    nothing classifies it (then ``error`` says why). ``heads`` is the attention head count of an
    ``attention_qkv`` / ``attention_out`` weight (``None`` otherwise, or when the module has none);
    ``note`` the evidence worth printing; ``fallback`` marks a conservative default rather than a
    confident match (``matrix``, attention without a head count).
    """

    name: str
    shape: tuple[int, ...]
    role: str | None
    heads: int | None = None
    note: str = ""
    fallback: bool = False
    error: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def muon_hidden(self) -> bool:
        """Whether this parameter is one of Muon's hidden matrices (:data:`MUON_HIDDEN_ROLES`)."""
        return self.role in MUON_HIDDEN_ROLES


@dataclass(frozen=True)
class _Found:
    role: str
    heads: int | None = None
    note: str = ""
    fallback: bool = False


def parameter_roles(
    model: nn.Module,
    *,
    gauges: GaugeSet | None = None,
    example_inputs: Sequence[Any] | None = None,
    include_frozen: bool = False,
    strict: bool = True,
) -> list[ParameterRole]:
    """The role of every trainable parameter of ``model``, in ``named_parameters`` order.

    Each tensor is listed once (a tied weight under its first name, its other names as ``aliases``);
    parameters with ``requires_grad=False`` are left out unless ``include_frozen``. ``gauges`` (from
    ``find_gauges``) add their evidence: the ``logit_shift`` weight is the ``lm_head``, and
    ``gauges.input_layers`` / ``gauges.output_layers`` are ``input_layer`` / ``output_layer``
    (matched by any of a parameter's names). ``example_inputs`` make the structural LM head observed
    rather than inferred from shapes (one forward pass under ``torch.no_grad``). The roles, their
    evidence and its precedence are in the module docstring.

    With ``strict`` (default) a module whose structure contradicts itself raises ``ValueError``: an
    attention module whose head counts do not fit its projections, an MoE module with several router
    candidates. ``strict=False`` leaves such a module's parameters to the other rules (as a Muon/Adam
    split needs only to tell hidden matrices from the rest, it does not raise).
    """
    structural = _structural_roles(model, example_inputs, strict)
    evidence = _gauge_roles(gauges) if gauges is not None else {}
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    seen: set[int] = set()
    rows: list[ParameterRole] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or not (param.requires_grad or include_frozen):
            continue
        seen.add(id(param))
        all_names = names[id(param)]
        found = structural.get(id(param))
        from_gauges = next((evidence[n] for n in all_names if n in evidence), None)
        if from_gauges is not None and (found is None or found.role not in (EMBEDDING, TIED_EMBEDDING_HEAD)):
            found = from_gauges
        shape = tuple(param.shape)
        aliases = tuple(n for n in all_names if n != name)
        if found is None:
            if param.ndim <= 1:
                found = _Found(VECTOR)
            elif param.ndim == 2:
                found = _Found(MATRIX, note="unrecognised matrix: whole-matrix Muon (O x O) is the safe default",
                               fallback=True)
            else:
                rows.append(ParameterRole(
                    name, shape, None, aliases=aliases,
                    error=f"{name} {shape}: a {param.ndim}-D tensor that is neither a convolution kernel nor an "
                          f"expert stack in an MoE expert container has no role"))
                continue
        rows.append(ParameterRole(name, shape, found.role, heads=found.heads, note=found.note,
                                  fallback=found.fallback, aliases=aliases))
    return rows


# ----------------------------------------------------------------------------------------------
# Gauge evidence
# ----------------------------------------------------------------------------------------------


def _gauge_roles(gauges: GaugeSet) -> dict[str, _Found]:
    """Parameter name -> role from what ``find_gauges`` recorded, the first evidence kept."""
    roles: dict[str, _Found] = {}
    for family in gauges:
        if isinstance(family, LogitShift) and family.kind == "logit_shift":
            roles.setdefault(family.weight, _Found(LM_HEAD, note=f"output Linear (logit shift {family.name})"))
    for name in gauges.input_layers:
        roles.setdefault(name, _Found(INPUT_LAYER, note="reads the model input (gauges.input_layers)"))
    for name in gauges.output_layers:
        roles.setdefault(name, _Found(OUTPUT_LAYER, note="writes the model output (gauges.output_layers)"))
    return roles


# ----------------------------------------------------------------------------------------------
# Structural evidence
# ----------------------------------------------------------------------------------------------


def _structural_roles(model: nn.Module, example_inputs: Sequence[Any] | None, strict: bool) -> dict[int, _Found]:
    """``id(parameter)`` -> its role read from the model's structure (first match kept)."""
    head = _output_linear(model, example_inputs)
    roles: dict[int, _Found] = {}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if head is not None:
        if id(head.weight) in embeddings:
            roles[id(head.weight)] = _Found(
                TIED_EMBEDDING_HEAD, note="tied: the shared-shift gauge of the head is not a symmetry of the embedding"
            )
        else:
            roles[id(head.weight)] = _Found(LM_HEAD, note="output Linear")
    for module in model.modules():
        if isinstance(module, CONVOLUTIONS):
            roles.setdefault(id(module.weight), _Found(CONV_KERNEL))
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            roles.setdefault(id(module.weight), _Found(EMBEDDING))
        attention = _checked(_attention_layout, module, strict)
        if attention is not None:
            for short, heads in attention.items():
                weight = getattr(module, f"{short}_proj").weight
                role = ATTENTION_OUT if short == "o" else ATTENTION_QKV
                if heads is None:
                    roles.setdefault(id(weight), _Found(role, note="no head-count attribute: whole-matrix Muon",
                                                        fallback=True))
                else:
                    roles.setdefault(id(weight), _Found(role, heads=heads))
        moe = _checked(_moe_layout, module, strict)
        if moe is not None:
            router, experts = moe
            roles.setdefault(id(router), _Found(MOE_ROUTER))
            for sub in experts.modules():
                parts = _swiglu_parts(sub)
                if parts is not None:
                    for part, lin in parts.items():
                        role = MOE_EXPERT_DOWN if part == "down" else MOE_EXPERT_GATE_UP
                        roles.setdefault(id(lin.weight), _Found(role))
            for p in experts.parameters():
                if p.ndim == 3:
                    roles.setdefault(id(p), _Found(MOE_EXPERT_TENSOR, note="per-expert (batched) matrices"))
        parts = _swiglu_parts(module)
        if parts is not None:
            for part, lin in parts.items():
                roles.setdefault(id(lin.weight), _Found(SWIGLU_DOWN if part == "down" else SWIGLU_GATE_UP))
    return roles


def _checked(layout, module: nn.Module, strict: bool):
    """``layout(module)``; a contradiction raises with ``strict``, else reads as no layout."""
    try:
        return layout(module)
    except ValueError:
        if strict:
            raise
        return None


def _int_attr(module: nn.Module, names: Sequence[str]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _linear_children(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: child for name, child in module.named_children() if isinstance(child, nn.Linear)}


def _swiglu_parts(module: nn.Module) -> dict[str, nn.Linear] | None:
    """``{"gate": .., "up": .., "down": ..}`` if ``module`` is a gated MLP with consistent shapes."""
    linears = _linear_children(module)
    parts: dict[str, nn.Linear] = {}
    for part, candidates in _SWIGLU_NAMES.items():
        found = [linears[n] for n in candidates if n in linears]
        if len(found) != 1:
            return None
        parts[part] = found[0]
    gate, up, down = parts["gate"].weight.shape, parts["up"].weight.shape, parts["down"].weight.shape
    if gate != up or down != (gate[1], gate[0]):
        return None
    return parts


def _attention_layout(module: nn.Module) -> dict[str, Any] | None:
    """Head layout of a module with ``q_proj/k_proj/v_proj/o_proj`` Linears, or ``None``.

    Returns ``{"q": heads, "k": kv_heads, "v": kv_heads, "o": heads}`` (``None`` values when the
    module has no head-count attribute) and raises if the attributes contradict the shapes.
    """
    linears = _linear_children(module)
    if not all(k in linears for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return None
    heads = _int_attr(module, _HEAD_ATTRS)
    kv_heads = _int_attr(module, _KV_HEAD_ATTRS) or heads
    if heads is None:
        return {"q": None, "k": None, "v": None, "o": None}
    q_out = linears["q_proj"].out_features
    if q_out % heads:
        raise ValueError(
            f"attention module {type(module).__name__}: q_proj has {q_out} outputs, not a multiple of {heads} heads"
        )
    head_dim = _int_attr(module, ("head_dim",)) or q_out // heads
    expected = {"q_proj": (heads * head_dim, None), "k_proj": (kv_heads * head_dim, None),
                "v_proj": (kv_heads * head_dim, None), "o_proj": (None, heads * head_dim)}
    for name, (out_dim, in_dim) in expected.items():
        lin = linears[name]
        wrong_out = out_dim is not None and lin.out_features != out_dim
        wrong_in = in_dim is not None and lin.in_features != in_dim
        if wrong_out or wrong_in:
            raise ValueError(
                f"attention module {type(module).__name__}: {name} shape {tuple(lin.weight.shape)} is inconsistent "
                f"with {heads} heads, {kv_heads} kv heads and head_dim {head_dim}"
            )
    return {"q": heads, "k": kv_heads, "v": kv_heads, "o": heads}


def _moe_layout(module: nn.Module) -> tuple[Tensor, nn.Module] | None:
    """``(router weight, experts)`` for a module holding an expert container and a router.

    The expert container is a child ``ModuleList`` named ``experts`` (or a child module named
    ``experts`` holding 3-D parameters); the router weight is the unique ``(experts, d)`` matrix held
    directly by a child Linear or by another direct child module (a router module with a bare
    ``weight``, as in Hugging Face's Mixtral).
    """
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        return None
    if isinstance(experts, nn.ModuleList):
        count = len(experts)
    else:
        stacked = [p for p in experts.parameters(recurse=False) if p.ndim == 3]
        count = stacked[0].shape[0] if stacked else _int_attr(experts, _EXPERT_COUNT_ATTRS)
    count = _int_attr(module, _EXPERT_COUNT_ATTRS) or count
    if not count:
        return None
    routers = [p for child in module.children() if child is not experts
               for p in child.parameters(recurse=False) if p.ndim == 2 and p.shape[0] == count]
    if len(routers) != 1:
        raise ValueError(
            f"MoE module {type(module).__name__} with {count} experts has {len(routers)} child matrices with "
            f"{count} rows; cannot tell which is the router: give the router an override"
        )
    return routers[0], experts


def _output_linear(model: nn.Module, example_inputs: Sequence[Any] | None) -> nn.Linear | None:
    """The Linear whose output is the model's output.

    With ``example_inputs`` this is observed: a forward pass with hooks finds the Linear whose
    output tensor *is* the model output (or its first element / ``logits`` entry). Without, the
    structural rule is: a direct child Linear of the model whose ``(out, in)`` matches the
    ``(num_embeddings, embedding_dim)`` of an ``nn.Embedding`` of the model (an LM head).
    """
    if example_inputs is not None:
        produced: list[tuple[Tensor, nn.Linear]] = []  # keeps the outputs alive, so identity is meaningful
        handles = [
            m.register_forward_hook(lambda mod, args, out: produced.append((out, mod)))
            for m in model.modules() if isinstance(m, nn.Linear)
        ]
        try:
            with torch.no_grad():
                result = model(*example_inputs)
        finally:
            for h in handles:
                h.remove()
        if isinstance(result, Mapping):
            result = result.get("logits", next(iter(result.values()), None))
        if isinstance(result, (tuple, list)):
            result = result[0] if result else None
        return next((mod for out, mod in produced if out is result), None)
    embedding_shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Embedding)}
    candidates = [
        m for m in model.children() if isinstance(m, nn.Linear) and tuple(m.weight.shape) in embedding_shapes
    ]
    return candidates[0] if len(candidates) == 1 else None
