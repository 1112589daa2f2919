"""The symmetry-compatible layerwise optimizer and the parameter classifier that configures it.

:class:`SymmetryCompatible` is one ``torch.optim.Optimizer`` whose param groups each name a
``rule`` from :data:`gaugeopt.optim.layerwise.RULES`. For a matrix rule ``Phi`` a step is

    M <- mu M + (1 - mu) G              (EMA momentum, no bias correction; mu = ``momentum``)
    W <- (1 - lr * weight_decay) W      (decoupled weight decay)
    W <- W - lr * Phi(M)                (or Phi((1 - mu) G + mu M) with nesterov=True)

and ``adamw`` groups take an ordinary AdamW step. :func:`symmetry_param_groups` inspects a model's
structure, gives every parameter a role (embedding, LM head, tied embedding/head, attention
Q/K/V and output per head, SwiGLU gate/up and down, MoE router and experts, vectors), maps roles
to rules, applies the user's overrides and prints the classification table.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .base import FramedOptimizer
from .guards import require_betas, require_nonnegative, require_positive, require_rate, require_unit_interval
from .layerwise import ADJUST_LR_CHOICES, ORIENTATIONS, RULES, get_rule
from .rules import Adam, MomentumMap, Muon, Rule
from .matrix_functions import (
    MUON_NS_COEFFICIENTS,
    NSCoefficients,
    coefficients_setting,
    ns_coefficient_schedule,
)

__all__ = [
    "SymmetryCompatible",
    "UNCLASSIFIED",
    "symmetry_param_groups",
    "classify_parameters",
    "ParamClassification",
    "format_table",
    "ROLE_DEFAULTS",
    "RULE_DEFAULT_LR",
]


# ==============================================================================================
# Optimizer
# ==============================================================================================

#: The role of parameters in a group that names no rule: outside the classification of
#: :func:`symmetry_param_groups` (a learnable temperature, a loss's own parameter); they take ``adamw``.
UNCLASSIFIED = "unclassified"


class SymmetryCompatible(FramedOptimizer):
    """Symmetry-compatible layerwise optimizer: a per-group update rule applied to EMA momentum.

    Args:
        params: parameters or param-group dicts, typically ``symmetry_param_groups(model)``. A
            group that names no ``rule`` (when ``rule`` is not given here either) holds parameters
            outside the classification (a learnable temperature, a loss's own parameter): they take
            ``adamw`` with the role ``"unclassified"``, and one warning lists them; at least one
            group must name a rule.
        lr: learning rate (groups from :func:`symmetry_param_groups` carry their own).
        rule: default rule name, one of ``gaugeopt.optim.layerwise.RULES``; ``None`` forces every
            group to name its rule.
        orientation: ``"row"`` (rows of the stored matrix are the block's units) or ``"col"``
            (columns are; for ``muon`` it selects the axis that ``heads`` splits).
        heads: Muon only: orthogonalise ``heads`` equal row (or column) blocks separately.
        momentum: the EMA momentum coefficient ``mu`` (the paper's beta, 0.95 in its runs); named
            like torch's, so ``OneCycleLR`` and ``CyclicLR`` cycle it.
        nesterov: use ``(1 - mu) G + mu M`` instead of ``M`` as the input of ``Phi``.
        weight_decay: decoupled weight decay ``W <- (1 - lr wd) W``.
        eps: row-norm denominator guard and Gram-matrix damping of the spectral rules.
        alpha: exponent of the nuclear-norm scale of the spectral and hybrid rules.
        ns_steps, ns_eps, ns_coefficients: Muon's Newton-Schulz iteration (``ns_coefficients``: one
            quintic ``(a, b, c)``, one per step, or ``"polar_express"``, as in :class:`~gaugeopt.DDCMuon`;
            it runs in the parameters' dtype).
        adjust_lr: Muon scale, ``"original"`` (sqrt(max(1, rows/cols))), ``"match_rms_adamw"``
            (0.2 sqrt(max(rows, cols))) or ``"none"``.
        adam_betas, adam_eps: the AdamW rule's moment coefficients and denominator guard.
        nonfinite: ``"raise"`` (default): a NaN or Inf gradient raises
            :class:`~gaugeopt.optim.NonFiniteGradientError` naming the parameter; ``"skip"``: the
            step is skipped and counted in :attr:`skipped_steps`. Nothing changes in either case.
        compiled: run the step compiled by ``torch.compile``.

    The step is the batched step of :mod:`gaugeopt.optim.step` without gauge frames: each
    group's rule is a base rule of :mod:`gaugeopt.optim.rules` (``adamw``: :class:`~gaugeopt.optim.rules.Adam`;
    ``muon``: :class:`~gaugeopt.optim.rules.Muon`; the other maps:
    :class:`~gaugeopt.optim.rules.MomentumMap`), and same-shape parameters of a group are stepped as one
    stack. Matrix rules accept 2-D parameters and 3-D stacks ``(E, rows, cols)`` (one matrix per expert;
    ``muon`` also any ``(..., rows, cols)``). Invalid settings raise ``ValueError`` at construction (and
    when a step or ``load_state_dict`` meets them), naming the group and parameter. Float16/bfloat16
    parameters keep float32 state and are updated in float32 (``docs/robustness.md``).
    """

    _EXTRA_GROUP_KEYS = frozenset({"role"})

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        *,
        rule: str | None = None,
        orientation: str = "row",
        heads: int | None = None,
        momentum: float = 0.95,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        alpha: float = 1.0,
        ns_steps: int = 5,
        ns_eps: float = 1e-7,
        ns_coefficients: NSCoefficients = MUON_NS_COEFFICIENTS,
        adjust_lr: str = "original",
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        nonfinite: str = "raise",
        compiled: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, rule=rule, orientation=orientation, heads=heads, momentum=momentum, nesterov=nesterov,
            weight_decay=weight_decay, eps=eps, alpha=alpha, ns_steps=ns_steps, ns_eps=ns_eps,
            ns_coefficients=coefficients_setting(ns_coefficients), adjust_lr=adjust_lr, adam_betas=tuple(adam_betas),
            adam_eps=adam_eps,
        )
        _validate_settings(defaults, type(self).__name__)
        super().__init__(params, defaults, None, channel_step=False, nonfinite=nonfinite,
                         compiled=compiled)

    def _group_parts(self, param_group: dict[str, Any]) -> list[dict[str, Any]]:
        """A group that names no rule (and no default rule was given) holds parameters outside the
        classification: they take ``adamw``, with the role :data:`UNCLASSIFIED`."""
        if isinstance(param_group, Mapping) and param_group.get("rule", self.defaults["rule"]) is None:
            return [{**param_group, "rule": "adamw", "role": UNCLASSIFIED}]
        return [param_group]

    def _check_configured(self) -> None:
        if all(g.get("role") == UNCLASSIFIED for g in self.param_groups if g["params"]) and \
                any(g["params"] for g in self.param_groups):
            raise ValueError(f"the param groups have no 'rule' and no rule= was given; build the groups with "
                             f"symmetry_param_groups(model) or pass rule=... (known rules: {', '.join(RULES)})")

    def _is_outside(self, group_index: int, param_index: int) -> bool:
        return self.param_groups[group_index].get("role") == UNCLASSIFIED

    def _outside_notice(self, listing: str, count: int) -> str:
        return (f"SymmetryCompatible: {count} parameter(s) are in groups that name no rule (not classified by "
                f"symmetry_param_groups): each takes the 'adamw' rule ({listing}); SymmetryCompatible.split() lists "
                f"every parameter's rule")

    def _frame_of(self, group_index: int, param_index: int) -> str:
        role = self.param_groups[group_index].get("role")
        return "none: not classified" if role == UNCLASSIFIED else (role or "-")

    def rule_name(self, group: Mapping[str, Any]) -> str:
        return group["rule"]

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        _validate_group(group, where)

    def _upgraded_group(self, saved: Mapping[str, Any]) -> Mapping[str, Any]:
        """Checkpoints of earlier versions named the momentum coefficient ``beta``."""
        if "beta" in saved and "momentum" not in saved:
            return {("momentum" if key == "beta" else key): value for key, value in saved.items()}
        return saved

    def rule_for(self, group: Mapping[str, Any]) -> Rule:
        name = group["rule"]
        if name == "adamw":
            return Adam(betas_key="adam_betas", eps_key="adam_eps")
        if name == "muon":
            return Muon(nesterov=bool(group["nesterov"]), ns_steps=group["ns_steps"],
                        ns_coefficients=ns_coefficient_schedule(group["ns_coefficients"], group["ns_steps"]),
                        ns_eps=float(group["ns_eps"]),
                        adjust_lr=group["adjust_lr"], head_blocks=group["heads"], head_axis=group["orientation"],
                        block_scale=True, momentum_key="momentum")
        options = tuple((key, group[key]) for key in get_rule(name).options)
        return MomentumMap(name, group["orientation"], options, bool(group["nesterov"]), momentum_key="momentum")


def _validate_settings(settings: dict[str, Any], where: str) -> None:
    """Check the hyperparameters of a group (or of the defaults); ``ValueError`` naming the field."""

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {message}")

    require_rate(where, settings["lr"])
    require_unit_interval(where, "momentum", settings["momentum"])
    require(isinstance(settings["nesterov"], bool), f"nesterov must be True or False, got {settings['nesterov']!r}")
    for name in ("weight_decay", "eps", "alpha", "ns_eps"):
        require_nonnegative(where, name, settings[name])
    require_positive(where, "adam_eps", settings["adam_eps"])  # 0 would divide 0 by 0 on zero gradients
    steps = settings["ns_steps"]
    require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0,
            f"ns_steps must be an int >= 0, got {steps!r}")
    try:
        ns_coefficient_schedule(settings["ns_coefficients"], steps, name="ns_coefficients")
    except ValueError as error:
        require(False, str(error))
    require(settings["adjust_lr"] in ADJUST_LR_CHOICES,
            f"adjust_lr must be one of {ADJUST_LR_CHOICES}, got {settings['adjust_lr']!r}")
    require(settings["orientation"] in ORIENTATIONS,
            f"orientation must be one of {ORIENTATIONS}, got {settings['orientation']!r}")
    require_betas(where, "adam_betas", settings["adam_betas"])
    heads = settings["heads"]
    require(heads is None or (isinstance(heads, int) and not isinstance(heads, bool) and heads >= 1),
            f"heads must be a positive int, got {heads!r}")


def _validate_group(group: dict[str, Any], where: str) -> None:
    """Check one param group's settings against its parameters; raise a ``ValueError`` naming them."""
    names = group.get("param_names") or [f"params[{i}]" for i in range(len(group["params"]))]
    if "role" in group and not isinstance(group["role"], str):
        raise ValueError(f"{where}: role must be a string, got {group['role']!r}")
    where = where + (f" ({group['role']})" if "role" in group else "")
    if group["rule"] is None:
        raise ValueError(
            f"{where} has no 'rule'; build the groups with symmetry_param_groups(model) or pass rule=... "
            f"(known rules: {', '.join(RULES)})"
        )
    try:
        rule = get_rule(group["rule"])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {message}")

    _validate_settings(group, where)
    heads = group["heads"]
    require(heads is None or rule.name == "muon",
            f"heads={heads} is only meaningful for rule 'muon', not {rule.name!r}")
    for name, param in zip(names, group["params"]):
        if rule.matrix_only:
            ok_ndim = param.ndim >= 2 if rule.name == "muon" else param.ndim in (2, 3)
            require(ok_ndim, f"rule {rule.name!r} needs a matrix (or a (E, rows, cols) stack) but {name} "
                             f"has shape {tuple(param.shape)}; use rule 'adamw' for vectors")
        if heads is not None:
            axis = -2 if group["orientation"] == "row" else -1
            require(param.shape[axis] % heads == 0,
                    f"heads={heads} does not divide the {group['orientation']} axis of {name} {tuple(param.shape)}")
        require(not torch.is_complex(param), f"{name} is complex; SymmetryCompatible supports real parameters only")


# ==============================================================================================
# Classification
# ==============================================================================================

#: Default settings per role. ``orientation`` is the role's geometry (which axis holds its units)
#: and is kept when an override changes only the rule; a role ``lr`` belongs to the role's default
#: rule and is replaced by ``RULE_DEFAULT_LR`` when an override picks another rule. The embedding,
#: LM head and router choices and learning rates come from the smoke MoE runs in docs/symcompat.md.
ROLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "embedding": dict(rule="hybrid", orientation="row", lr=0.01),
    "lm_head": dict(rule="centered_hybrid", orientation="row", lr=1e-3),
    "tied_embedding_head": dict(rule="row_norm", orientation="row"),
    "attention_qkv": dict(rule="muon", orientation="row"),
    "attention_out": dict(rule="muon", orientation="col"),
    "swiglu_gate_up": dict(rule="muon", orientation="row"),
    "swiglu_down": dict(rule="muon", orientation="col"),
    "moe_router": dict(rule="centered_left_spectral", orientation="row", lr=0.05),
    "moe_expert_gate_up": dict(rule="muon", orientation="row"),
    "moe_expert_down": dict(rule="muon", orientation="col"),
    "moe_expert_tensor": dict(rule="muon", orientation="row"),
    "matrix": dict(rule="muon", orientation="row"),
    "vector": dict(rule="adamw", orientation="row"),
}

#: Learning rate used for a rule when neither the role nor an override sets one (lightly tuned
#: on the smoke MoE language model, see docs/symcompat.md). Spectral/hybrid rules scale with the
#: nuclear norm of the momentum (alpha = 1), hence their very different values.
RULE_DEFAULT_LR: dict[str, float] = {
    "muon": 0.02,
    "row_norm": 0.05,
    "centered_row_norm": 0.03,
    "right_spectral": 0.05,
    "centered_right_spectral": 0.05,
    "left_spectral": 0.05,
    "centered_left_spectral": 0.05,
    "hybrid": 1e-3,
    "centered_hybrid": 1e-3,
    "adamw": 3e-3,
}

_OVERRIDE_KEYS = frozenset({
    "rule", "orientation", "heads", "lr", "weight_decay", "momentum", "nesterov", "eps", "alpha", "ns_steps",
    "ns_eps", "ns_coefficients", "adjust_lr", "adam_betas", "adam_eps",
})
_SWIGLU_NAMES = {
    "gate": ("gate", "gate_proj", "w1"),
    "up": ("up", "up_proj", "w3"),
    "down": ("down", "down_proj", "w2"),
}
_HEAD_ATTRS = ("n_heads", "num_heads", "num_attention_heads")
_KV_HEAD_ATTRS = ("n_kv_heads", "num_key_value_heads", "num_kv_heads")
_EXPERT_COUNT_ATTRS = ("n_experts", "num_experts", "num_local_experts")


@dataclass
class ParamClassification:
    """One row of the classification table: a (de-duplicated) parameter and its settings."""

    name: str
    shape: tuple[int, ...]
    role: str
    rule: str
    orientation: str = "row"
    heads: int | None = None
    lr: float | None = None
    source: str = "auto"  # "auto", "default" (conservative fallback) or "override <pattern>"
    note: str = ""
    aliases: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)  # override hyperparameters besides the above

    def __str__(self) -> str:
        return format_table([self], header=False)


def format_table(rows: Sequence[ParamClassification], *, header: bool = True) -> str:
    """Plain-text table of classification rows (name, shape, role, rule, orientation, heads, lr, source, note)."""
    columns = ("parameter", "shape", "role", "rule", "orient", "heads", "lr", "source", "note")
    cells = [
        (
            r.name, "x".join(map(str, r.shape)) or "scalar", r.role, r.rule, r.orientation,
            "-" if r.heads is None else str(r.heads), "-" if r.lr is None else f"{r.lr:g}", r.source,
            "; ".join(filter(None, [r.note] + [f"{k}={v}" for k, v in r.options.items()])),
        )
        for r in rows
    ]
    table = ([columns] if header else []) + cells
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class _Auto:
    role: str | None
    heads: int | None = None
    note: str = ""
    fallback: bool = False  # a documented conservative default, not a confident structural match
    error: str | None = None


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


def _classify_structurally(model: nn.Module, example_inputs: Sequence[Any] | None) -> dict[int, _Auto]:
    """Map ``id(parameter)`` to its automatically determined role."""
    head = _output_linear(model, example_inputs)
    roles: dict[int, _Auto] = {}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if head is not None:
        if id(head.weight) in embeddings:
            roles[id(head.weight)] = _Auto(
                "tied_embedding_head", note="tied: the shared-shift gauge of the head is not a symmetry of the embedding"
            )
        else:
            roles[id(head.weight)] = _Auto("lm_head", note="output Linear")
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            roles.setdefault(id(module.weight), _Auto("embedding"))
        attention = _attention_layout(module)
        if attention is not None:
            for short, heads in attention.items():
                weight = getattr(module, f"{short}_proj").weight
                role = "attention_out" if short == "o" else "attention_qkv"
                if heads is None:
                    fallback = _Auto(role, note="no head-count attribute: whole-matrix Muon", fallback=True)
                    roles.setdefault(id(weight), fallback)
                else:
                    roles.setdefault(id(weight), _Auto(role, heads=heads))
        moe = _moe_layout(module)
        if moe is not None:
            router, experts = moe
            roles.setdefault(id(router), _Auto("moe_router"))
            for sub in experts.modules():
                parts = _swiglu_parts(sub)
                if parts is not None:
                    for part, lin in parts.items():
                        role = "moe_expert_down" if part == "down" else "moe_expert_gate_up"
                        roles.setdefault(id(lin.weight), _Auto(role))
            for p in experts.parameters():
                if p.ndim == 3:
                    roles.setdefault(id(p), _Auto("moe_expert_tensor", note="per-expert (batched) matrices"))
        parts = _swiglu_parts(module)
        if parts is not None:
            for part, lin in parts.items():
                roles.setdefault(id(lin.weight), _Auto("swiglu_down" if part == "down" else "swiglu_gate_up"))
    return roles


def _param_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _normalise_override(pattern: str, value: Any) -> dict[str, Any]:
    settings = {"rule": value} if isinstance(value, str) else dict(value)
    unknown = set(settings) - _OVERRIDE_KEYS
    if unknown:
        raise ValueError(
            f"override {pattern!r} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_OVERRIDE_KEYS)}"
        )
    if "rule" in settings:
        try:
            get_rule(settings["rule"])
        except ValueError as error:
            raise ValueError(f"override {pattern!r}: {error}") from None
    return settings


def classify_parameters(
    model: nn.Module,
    overrides: Mapping[str, str | Mapping[str, Any]] | None = None,
    *,
    example_inputs: Sequence[Any] | None = None,
) -> list[ParamClassification]:
    """Give every trainable parameter of ``model`` a role and settings; see :func:`symmetry_param_groups`.

    Raises ``ValueError`` naming every parameter that cannot be classified (and has no override),
    every parameter matched by two override patterns, and every pattern that matches nothing.
    """
    overrides = {pattern: _normalise_override(pattern, value) for pattern, value in (overrides or {}).items()}
    auto = _classify_structurally(model, example_inputs)
    names = _param_names(model)
    seen: set[int] = set()
    pattern_hits = {pattern: 0 for pattern in overrides}
    rows: list[ParamClassification] = []
    problems: list[str] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        all_names = names[id(param)]
        matches = [pat for pat in overrides if any(fnmatch.fnmatchcase(n, pat) for n in all_names)]
        for pat in matches:
            pattern_hits[pat] += 1
        if len(matches) > 1:
            problems.append(f"{name} is matched by several override patterns {matches}; make them disjoint")
            continue
        found = auto.get(id(param))
        if found is None:
            if param.ndim <= 1:
                found = _Auto("vector")
            elif param.ndim == 2:
                found = _Auto("matrix", note="unrecognised matrix: whole-matrix Muon (O x O) is the safe default",
                              fallback=True)
            else:
                found = _Auto(None, error=f"{name} {tuple(param.shape)}: a {param.ndim}-D tensor outside an MoE expert "
                                          "container; add an override, e.g. {'%s': 'adamw'}" % name)
        override = overrides[matches[0]] if matches else {}
        if found.role is None and "rule" not in override:
            problems.append(found.error or f"{name}: cannot classify; add an override")
            continue
        role = found.role or "override"
        settings = dict(ROLE_DEFAULTS.get(role, {}))
        if "rule" in override and override["rule"] != settings.get("rule"):
            settings.pop("lr", None)  # the role's lr was chosen for its default rule
        settings.update(override)
        rule = settings.pop("rule")
        orientation = settings.pop("orientation", "row")
        heads = settings.pop("heads", found.heads if rule == "muon" else None)
        lr = settings.pop("lr", RULE_DEFAULT_LR[rule])
        note = found.note
        if len(all_names) > 1:
            note = "; ".join(filter(None, [note, "also " + ", ".join(n for n in all_names if n != name)]))
        rows.append(ParamClassification(
            name=name, shape=tuple(param.shape), role=role, rule=rule, orientation=orientation, heads=heads, lr=lr,
            source=f"override {matches[0]}" if matches else ("default" if found.fallback else "auto"),
            note=note, aliases=tuple(n for n in all_names if n != name), options=settings,
        ))
    unused = [pat for pat, hits in pattern_hits.items() if hits == 0]
    problems += [f"override pattern {pat!r} matches no trainable parameter" for pat in unused]
    if problems:
        raise ValueError("symmetry_param_groups could not classify the model:\n  " + "\n  ".join(problems))
    return rows


def symmetry_param_groups(
    model: nn.Module,
    overrides: Mapping[str, str | Mapping[str, Any]] | None = None,
    *,
    example_inputs: Sequence[Any] | None = None,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Param groups for :class:`SymmetryCompatible`, one per distinct setting, with the table printed.

    Roles are found from the model's structure:

    * ``embedding``: an ``nn.Embedding`` weight. ``lm_head``: the Linear producing the model's
      output (observed with ``example_inputs``; otherwise a top-level Linear shaped like an
      embedding table). ``tied_embedding_head``: both at once (listed once, with its aliases).
    * ``attention_qkv`` / ``attention_out``: ``q_proj/k_proj/v_proj`` and ``o_proj`` of a module
      holding all four, with per-head Muon from its ``n_heads``/``n_kv_heads`` (or HF-style)
      attributes, checked against the shapes.
    * ``swiglu_gate_up`` / ``swiglu_down``: a module with ``gate/up/down`` (or ``gate_proj``...,
      ``w1/w3/w2``) Linears of shapes ``(f, d), (f, d), (d, f)``.
    * ``moe_router``: in a module holding an ``experts`` container, the one child matrix with as many
      outputs as experts. ``moe_expert_gate_up`` / ``moe_expert_down``: SwiGLU matrices inside
      the container; ``moe_expert_tensor``: 3-D ``(E, rows, cols)`` expert stacks.
    * ``vector``: every 0-/1-D parameter (gains, biases) -> AdamW.
    * ``matrix`` (conservative default, source ``default``): any other 2-D parameter -> whole
      matrix Muon, which commutes with every orthogonal/permutation gauge of a matrix.
    * anything else (3-D or more outside an MoE) is an error asking for an override.

    ``overrides`` maps glob patterns on parameter names (``fnmatch``, e.g. ``"blocks.*.moe.router.weight"``)
    to a rule name or a dict of settings (``rule``, ``orientation``, ``heads``, ``lr``, ``weight_decay``,
    ``momentum``, ``nesterov``, ``eps``, ``alpha``, Muon and AdamW options). A parameter matched by two
    patterns, or a pattern that matches nothing, is an error. Frozen parameters are skipped.

    Returns ordinary param-group dicts: ``params``, ``param_names``, ``role`` and the settings.
    """
    rows = classify_parameters(model, overrides, example_inputs=example_inputs)
    if verbose:
        print(format_table(rows))
    tensors = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    groups: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        settings = dict(rule=row.rule, orientation=row.orientation, heads=row.heads, lr=row.lr, **row.options)
        key = (row.role, tuple(sorted((k, repr(v)) for k, v in settings.items())))
        group = groups.setdefault(key, dict(params=[], param_names=[], role=row.role, **settings))
        group["params"].append(tensors[row.name])
        group["param_names"].append(row.name)
    return list(groups.values())
