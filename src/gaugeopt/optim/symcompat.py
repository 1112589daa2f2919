"""The symmetry-compatible layerwise optimizer and the role-to-rule mapping that configures it.

:class:`SymmetryCompatible` is one ``torch.optim.Optimizer`` whose param groups each name a
``rule``: ``adamw``, or a map ``Phi`` of :data:`gaugeopt.optim.layerwise.MAPS` (which the group's
rule applies to the momentum). For a map ``Phi`` a step is

    M <- mu M + (1 - mu) G              (EMA momentum, no bias correction; mu = ``momentum``)
    W <- (1 - lr * weight_decay) W      (decoupled weight decay)
    W <- W - lr * Phi(M)                (or Phi((1 - mu) G + mu M) with nesterov=True)

and ``adamw`` groups take an ordinary AdamW step. :func:`symmetry_param_groups` takes every
parameter's role from the library's one structural classifier, :func:`gaugeopt.optim.roles.parameter_roles`
(embedding, LM head, tied embedding/head, attention Q/K/V and output per head, SwiGLU gate/up and
down, MoE router and experts, vectors; the classifier DDCMuon's Muon/Adam split reads too), maps
roles to rules (:data:`ROLE_DEFAULTS`), applies the user's overrides and prints the classification
table.
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
from .layerwise import ADJUST_LR_CHOICES, MAPS, ORIENTATIONS, get_map
from .roles import (
    ATTENTION_OUT,
    ATTENTION_QKV,
    EMBEDDING,
    LM_HEAD,
    MATRIX,
    MOE_EXPERT_DOWN,
    MOE_EXPERT_GATE_UP,
    MOE_EXPERT_TENSOR,
    MOE_ROUTER,
    SWIGLU_DOWN,
    SWIGLU_GATE_UP,
    TIED_EMBEDDING_HEAD,
    VECTOR,
    parameter_roles,
)
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

#: What the ``rule`` of a group may name: a map of :data:`~gaugeopt.optim.layerwise.MAPS` (``muon``
#: takes the base rule :class:`~gaugeopt.optim.rules.Muon`, the others
#: :class:`~gaugeopt.optim.rules.MomentumMap`) or ``adamw`` (:class:`~gaugeopt.optim.rules.Adam`).
_RULE_NAMES: tuple[str, ...] = (*MAPS, "adamw")


def _require_known_rule(name: Any) -> None:
    """A ``ValueError`` listing the known rules unless ``name`` is one."""
    if not isinstance(name, str) or name not in _RULE_NAMES:
        raise ValueError(f"unknown rule {name!r}; known rules: {', '.join(_RULE_NAMES)}")


class SymmetryCompatible(FramedOptimizer):
    """Symmetry-compatible layerwise optimizer: per group a layerwise map on EMA momentum, or AdamW.

    Args:
        params: parameters or param-group dicts, typically ``symmetry_param_groups(model)``. A
            group that names no ``rule`` (when ``rule`` is not given here either) holds parameters
            outside the classification (a learnable temperature, a loss's own parameter): they take
            ``adamw`` with the role ``"unclassified"``, and one warning lists them; at least one
            group must name a rule.
        lr: learning rate (groups from :func:`symmetry_param_groups` carry their own).
        rule: default rule name, ``"adamw"`` or a map of ``gaugeopt.optim.layerwise.MAPS``; ``None``
            forces every group to name its rule.
        orientation: ``"row"`` (rows of the stored matrix are the block's units) or ``"col"``
            (columns are; for ``muon`` it selects the axis that ``heads`` splits).
        heads: Muon only: orthogonalise ``heads`` equal row (or column) blocks separately.
        momentum: the EMA momentum coefficient ``mu`` (the paper's beta, 0.95 in its runs); named
            like torch's, so ``OneCycleLR`` and ``CyclicLR`` cycle it.
        nesterov: use ``(1 - mu) G + mu M`` instead of ``M`` as the input of ``Phi``.
        weight_decay: decoupled weight decay ``W <- (1 - lr wd) W``.
        eps: row-norm denominator guard and Gram-matrix damping of the spectral maps.
        alpha: exponent of the nuclear-norm scale of the spectral and hybrid maps.
        ns_steps, ns_eps, ns_coefficients: Muon's Newton-Schulz iteration (``ns_coefficients``: one
            quintic ``(a, b, c)``, one per step, or ``"polar_express"``, as in :class:`~gaugeopt.DDCMuon`;
            it runs in the parameters' dtype).
        adjust_lr: Muon scale, ``"original"`` (sqrt(max(1, rows/cols))), ``"match_rms_adamw"``
            (0.2 sqrt(max(rows, cols))) or ``"none"``.
        adam_betas, adam_eps: the AdamW rule's moment coefficients and denominator guard.
        nonfinite: ``"raise"`` (default): a NaN or Inf gradient raises
            :class:`~gaugeopt.optim.NonFiniteGradientError` naming the parameter; ``"skip"``: the
            step is skipped and counted in :attr:`skipped_steps`. Nothing changes in either case.
        compiled: run the step compiled by ``torch.compile``: ``True`` or the name of a mode, as
            for :class:`~gaugeopt.optim.DDCAdam`.

    The step is the batched step of :mod:`gaugeopt.optim.step` without gauge frames: each
    group's rule is a base rule of :mod:`gaugeopt.optim.rules` (``adamw``: :class:`~gaugeopt.optim.rules.Adam`;
    ``muon``: :class:`~gaugeopt.optim.rules.Muon`; the other maps:
    :class:`~gaugeopt.optim.rules.MomentumMap`), and same-shape parameters of a group are stepped as one
    stack. The maps accept 2-D parameters and 3-D stacks ``(E, rows, cols)`` (one matrix per expert;
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
        compiled: bool | str = False,
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
                             f"symmetry_param_groups(model) or pass rule=... (known rules: {', '.join(_RULE_NAMES)})")

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
        options = tuple((key, group[key]) for key in get_map(name).options)
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
            f"(known rules: {', '.join(_RULE_NAMES)})"
        )
    rule = group["rule"]
    try:
        _require_known_rule(rule)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {message}")

    _validate_settings(group, where)
    heads = group["heads"]
    require(heads is None or rule == "muon",
            f"heads={heads} is only meaningful for rule 'muon', not {rule!r}")
    for name, param in zip(names, group["params"]):
        if rule != "adamw":  # a map: matrices only
            ok_ndim = param.ndim >= 2 if rule == "muon" else param.ndim in (2, 3)
            require(ok_ndim, f"rule {rule!r} needs a matrix (or a (E, rows, cols) stack) but {name} "
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
    EMBEDDING: dict(rule="hybrid", orientation="row", lr=0.01),
    LM_HEAD: dict(rule="centered_hybrid", orientation="row", lr=1e-3),
    TIED_EMBEDDING_HEAD: dict(rule="row_norm", orientation="row"),
    ATTENTION_QKV: dict(rule="muon", orientation="row"),
    ATTENTION_OUT: dict(rule="muon", orientation="col"),
    SWIGLU_GATE_UP: dict(rule="muon", orientation="row"),
    SWIGLU_DOWN: dict(rule="muon", orientation="col"),
    MOE_ROUTER: dict(rule="centered_left_spectral", orientation="row", lr=0.05),
    MOE_EXPERT_GATE_UP: dict(rule="muon", orientation="row"),
    MOE_EXPERT_DOWN: dict(rule="muon", orientation="col"),
    MOE_EXPERT_TENSOR: dict(rule="muon", orientation="row"),
    MATRIX: dict(rule="muon", orientation="row"),
    VECTOR: dict(rule="adamw", orientation="row"),
}

#: Learning rate used for a rule when neither the role nor an override sets one (lightly tuned
#: on the smoke MoE language model, see docs/symcompat.md). The spectral/hybrid maps scale with the
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


def _normalise_override(pattern: str, value: Any) -> dict[str, Any]:
    settings = {"rule": value} if isinstance(value, str) else dict(value)
    unknown = set(settings) - _OVERRIDE_KEYS
    if unknown:
        raise ValueError(
            f"override {pattern!r} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_OVERRIDE_KEYS)}"
        )
    if "rule" in settings:
        try:
            _require_known_rule(settings["rule"])
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

    The roles are :func:`gaugeopt.optim.roles.parameter_roles`' (read without gauges). A role with no
    default rule in :data:`ROLE_DEFAULTS` (``conv_kernel``) or no role at all needs an override that
    names a rule; the row keeps the role (``"override"`` when there is none). Raises ``ValueError``
    naming every parameter that cannot be classified (and has no override), every parameter matched by
    two override patterns, and every pattern that matches nothing.
    """
    overrides = {pattern: _normalise_override(pattern, value) for pattern, value in (overrides or {}).items()}
    pattern_hits = {pattern: 0 for pattern in overrides}
    rows: list[ParamClassification] = []
    problems: list[str] = []
    for found in parameter_roles(model, example_inputs=example_inputs):
        name, all_names = found.name, (found.name, *found.aliases)
        matches = [pat for pat in overrides if any(fnmatch.fnmatchcase(n, pat) for n in all_names)]
        for pat in matches:
            pattern_hits[pat] += 1
        if len(matches) > 1:
            problems.append(f"{name} is matched by several override patterns {matches}; make them disjoint")
            continue
        override = overrides[matches[0]] if matches else {}
        if found.role not in ROLE_DEFAULTS and "rule" not in override:
            # no role, or one without a default rule (a convolution kernel)
            problems.append(f"{name} {found.shape}: a {len(found.shape)}-D tensor outside an MoE expert container; "
                            "add an override, e.g. {'%s': 'adamw'}" % name)
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
        if found.aliases:
            note = "; ".join(filter(None, [note, "also " + ", ".join(found.aliases)]))
        rows.append(ParamClassification(
            name=name, shape=found.shape, role=role, rule=rule, orientation=orientation, heads=heads, lr=lr,
            source=f"override {matches[0]}" if matches else ("default" if found.fallback else "auto"),
            note=note, aliases=found.aliases, options=settings,
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

    Roles are found from the model's structure by :func:`gaugeopt.optim.roles.parameter_roles`:

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
    * anything else (3-D or more outside an MoE, e.g. a ``conv_kernel``) is an error asking for an
      override.

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
