"""DDCMuon: Muon on hidden matrices and Adam on the rest, exactly equivariant under a model's gauges.

One ``torch.optim.Optimizer`` for the whole model (docs/ddc_muon.md), stepped as frame -> base rule ->
lift like :class:`~gaugeopt.optim.ddc_adam.DDCAdam`: every tensor's gradient enters its frame
(:mod:`gaugeopt.optim.frames`), the group's rule maps it to a canonical direction ``D``, and the lift
writes ``p <- (1 - lr wd) p - lr D gamma``. Muon groups take :class:`~gaugeopt.optim.rules.Muon`
(``torch.optim.Muon``'s update)::

    B <- mu B + (1 - mu) G~,    U = (1 - mu) G~ + mu B (nesterov) or B,    D = s NS(U)

with ``NS`` the quintic Newton-Schulz iteration (:func:`~gaugeopt.optim.matrix_functions.newton_schulz`,
torch's operation for operation, in bfloat16 by default as torch's; Keller Jordan's coefficients, or
the Polar Express schedule with ``ns_coefficients="polar_express"``) and ``s`` the shape factor
``sqrt(max(1, rows / cols))`` (``adjust_lr="original"``) or ``0.2 sqrt(max(rows, cols))``
(``"match_rms_adamw"``). Adam groups take DDCAdam's rule. Why this is exact, per family:

* *Norm scale, neuron scale:* Muon sees the canonical (merged, balanced) matrix; ``NS(D U) != D NS(U)``
  for a diagonal ``D``, which is why the frame is needed.
* *Head rotation:* ``NS(Q U R^T) = Q NS(U) R^T`` for orthogonal ``Q``, ``R`` (the iteration is a
  polynomial in ``X X^T`` times ``X`` and ``|U|_F`` is invariant), so per-head rotations compose with
  Muon whole-matrix or head-wise (``head_wise=True``: each head's block, read from the rotation
  family, is orthogonalised on its own; the shape factor stays the whole matrix's).
* *Logit or router shift:* the gradient is centred and so is ``D``: the mean row never moves.

Each of these maps is exactly equivariant; what the arithmetic keeps depends on ``ns_dtype``. With
``torch.float32`` or ``None`` (the parameters' dtype) training from ``g . theta_0`` gives
``g . theta_t`` to that dtype's rounding. The default ``torch.bfloat16`` (``torch.optim.Muon``'s,
which it reproduces bit for bit) keeps the scalings and shifts exact, since the frames hand
Newton-Schulz the same canonical matrix in both runs, but not the head rotations: they rotate its
input, and bfloat16's rounding does not commute with rotations, so the two runs drift apart at
bfloat16's scale, amplified over training (docs/ddc_muon.md measures it). The orbit coordinates
(norm gains, balanced units, the mean head row) stay fixed in every dtype.

**Which parameters take Muon.** Each param group takes one rule, recorded as its ``use_muon``. A
group the user gives may set ``use_muon`` for all its parameters; otherwise :func:`muon_parameter_names`
(a reading of :func:`gaugeopt.optim.roles.parameter_roles`, the classifier ``symmetry_param_groups``
reads too) splits it into a Muon group and an Adam group (in this order): the hidden matrices, i.e.
every 2-D parameter except embedding tables, the LM head and the layers that read the model's input
or write its output directly, take Muon. Convolution kernels count as hidden matrices: Muon orthogonalises
each as its ``(out, in * kernel)`` matricisation (``Muon(flatten=True)``). Everything else (vectors,
embeddings, input and output layers, parameters outside ``gauges.model``) takes Adam. Without a
``GaugeSet`` every 2-D parameter takes Muon unless its group says ``use_muon=False``.
:meth:`~gaugeopt.optim.base.FramedOptimizer.split` prints who takes what; ``add_param_group`` splits a
group added later the same way.

**Param groups, as in torch.** Every group, whichever its rule, holds ``lr``, ``betas``, ``eps``,
``weight_decay`` and the Newton-Schulz settings, and the step of its parameters reads its own values:
``lr`` and ``weight_decay`` for both rules, ``betas = (beta1, beta2)`` where ``beta1`` is the
momentum ``mu`` of a Muon group and Adam's first-moment coefficient of an Adam group (``beta2`` is
Adam's alone). One key for the first-moment coefficient of both rules is what lets one scheduler
reach both: ``OneCycleLR`` and ``CyclicLR`` cycle ``betas[0]`` of every group. The constructor's
arguments are the defaults of each rule (``lr``, ``momentum``, ``weight_decay`` for Muon groups;
``adam_lr``, ``adam_betas``, ``adam_eps``, ``adam_weight_decay`` for Adam groups); a user's group
overrides them with its own ``lr``, ``betas``, ``eps``, ``weight_decay`` for every parameter in it,
and with ``momentum`` (its Muon part's ``betas[0]``) or ``adam_lr``, ``adam_betas``, ``adam_eps``,
``adam_weight_decay`` (its Adam part) for one rule only. Those rule-specific keys are read when the
group is added and are refused in a group later (``momentum`` written by a warm-up loop would
otherwise be ignored: write ``betas``). A scheduler that scales each group's own rate (``LambdaLR``,
``CosineAnnealingLR``, the Hugging Face schedules) keeps the Muon/Adam ratio; ``OneCycleLR`` keeps it
when given one ``max_lr`` per group (``max_lr=[g["lr"] for g in optimizer.param_groups]``), as for
any optimizer with several groups. A ``UserWarning`` says so once when no parameter takes Muon (a
model without hidden matrices): then ``lr`` is unused.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..gauges.gaugeset import GaugeSet
from .base import FramedOptimizer
from .ddc_adam import ADAM, check_adam_settings
from .guards import (
    require,
    require_betas,
    require_choice,
    require_known_keys,
    require_nonnegative,
    require_rate,
    require_unit_interval,
    user_stacklevel,
)
from .layerwise import muon_lr_scale
from .matrix_functions import (
    MUON_NS_COEFFICIENTS,
    NSCoefficients,
    coefficients_setting,
    ns_coefficient_schedule,
)
from .roles import parameter_roles
from .rules import Muon, Rule

__all__ = ["DDCMuon", "muon_parameter_names", "muon_lr_scale", "ADJUST_LR_CHOICES"]

#: Shape factors of the Muon step, as in ``torch.optim.Muon``'s ``adjust_lr_fn``.
ADJUST_LR_CHOICES = ("original", "match_rms_adamw")

#: DDCMuon's default section constant ``c`` of the neuron frames (DDCAdam's is ``gauges.EDGE_SCALE``).
MUON_EDGE_SCALE = 0.5

#: The settings every group holds (torch's names), read by the step of whichever rule the group takes.
_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "nesterov", "adjust_lr", "ns_steps", "ns_coefficients", "ns_eps",
               "ns_dtype", "head_wise")
#: Keys a user's group may set for one rule only, read when the group is added: the Muon part's
#: momentum (its ``betas[0]``) and the Adam part's settings, under their group names.
_MUON_ONLY = frozenset({"momentum"})
_ADAM_ONLY = {"adam_lr": "lr", "adam_betas": "betas", "adam_eps": "eps", "adam_weight_decay": "weight_decay"}


def muon_parameter_names(model: nn.Module, gauges: GaugeSet | None = None) -> set[str]:
    """Names of the parameters that DDCMuon (and the Muon + AdamW baseline) give the Muon step: the
    hidden matrices, i.e. the parameters whose role (:func:`~gaugeopt.optim.roles.parameter_roles`)
    is in :data:`~gaugeopt.optim.roles.MUON_HIDDEN_ROLES`: every 2-D parameter and convolution kernel
    (``nn.Conv1d/2d/3d``, which Muon steps as its ``(out, in * kernel)`` matricisation) except
    ``nn.Embedding`` tables, the LM head and, when ``gauges`` come from ``find_gauges``, the layers that
    read the model's input or write its output directly (``gauges.input_layers`` and
    ``gauges.output_layers``: an input projection, a patch embedding or a first convolution, an output
    layer), as Muon's recipe leaves those to AdamW. The LM head is the weight of a ``logit_shift``
    family of ``gauges`` or, with or without ``gauges``, the unique top-level Linear shaped like an
    embedding table. 3-D expert stacks (``moe_expert_tensor``) are not hidden matrices. Frozen
    parameters are named too (by role, as the trainable ones); a module whose structure contradicts
    itself (attention head counts, two router candidates) does not raise here."""
    return {row.name for row in parameter_roles(model, gauges=gauges, include_frozen=True, strict=False)
            if row.muon_hidden}


class DDCMuon(FramedOptimizer):
    """Muon on hidden matrices and DDCAdam's rule on the rest, exactly equivariant under ``gauges``.

    Args:
        params: parameters, ``(name, parameter)`` pairs or group dicts. A group may set ``lr``,
            ``betas``, ``eps``, ``weight_decay`` and the Newton-Schulz settings for all its
            parameters, ``momentum`` for its Muon part, ``adam_lr``, ``adam_betas``, ``adam_eps``,
            ``adam_weight_decay`` for its Adam part, and ``use_muon`` to choose the rule for all its
            parameters; otherwise :func:`muon_parameter_names` splits it (module docstring).
        gauges: the model's :class:`~gaugeopt.gauges.GaugeSet` (``gaugeopt.find_gauges``), or ``None``
            for none (then every 2-D parameter takes Muon unless its group sets ``use_muon=False``).
        lr, momentum, nesterov, weight_decay: the Muon groups' defaults, as in ``torch.optim.Muon``
            (decay is ``W <- (1 - lr wd) W``). A Muon group keeps its momentum as ``betas[0]``.
        adjust_lr: the shape factor, ``"original"`` or ``"match_rms_adamw"`` (torch's ``adjust_lr_fn``).
        ns_steps, ns_eps: the Newton-Schulz iteration, as in ``torch.optim.Muon``.
        ns_coefficients: its quintic ``(a, b, c)`` for every step (default: torch's), a sequence of
            ``ns_steps`` quintics, one per step, or ``"polar_express"`` (the schedule of Amsel et al.,
            :func:`~gaugeopt.optim.matrix_functions.polar_express_coefficients`, closer to the polar
            factor in the same number of steps).
        ns_dtype: its arithmetic dtype: ``torch.bfloat16`` (default), as ``torch.optim.Muon``, which it
            reproduces; ``torch.float32``, or ``None`` for the parameters' dtype, keeps the equivariance
            exact to that dtype's rounding (bfloat16's rounding is not equivariant: module docstring).
        head_wise: orthogonalise each attention head's block of the query/key/value rows and output
            columns separately (heads read from the model's rotation families).
        adam_lr, adam_betas, adam_eps: the Adam groups' defaults (embeddings, the head, vectors).
        adam_weight_decay: the Adam groups' default decay (default: ``weight_decay``).
        edge_scale: the section constant ``c`` of the neuron frames, as in :class:`~gaugeopt.optim.DDCAdam`;
            0.5 by default (DDCAdam's 1 made Muon's fixed-size orthogonal steps unstable on a deep
            gated stack without norms: docs/ddc_muon.md).
        nonfinite, compiled, stack_parameters: as in :class:`~gaugeopt.optim.DDCAdam`.

    Every param group takes one rule (``use_muon``) and its own ``lr``, ``betas``, ``weight_decay``:
    schedulers act on both rules (module docstring); ``add_param_group`` splits a group as the
    constructor does, so it may add two groups, the Muon part first.
    """

    _EXTRA_GROUP_KEYS = frozenset({"use_muon"})

    def __init__(
        self,
        params,
        gauges: GaugeSet | None,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        adjust_lr: str = "original",
        ns_steps: int = 5,
        *,
        ns_coefficients: NSCoefficients = MUON_NS_COEFFICIENTS,
        ns_eps: float = 1e-7,
        ns_dtype: torch.dtype | None = torch.bfloat16,
        head_wise: bool = False,
        adam_lr: float = 1e-3,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        adam_weight_decay: float | None = None,
        edge_scale: float = MUON_EDGE_SCALE,
        nonfinite: str = "raise",
        compiled: bool | str = False,
        stack_parameters: bool = False,
    ):
        where = type(self).__name__
        require_unit_interval(where, "momentum", momentum)
        require_betas(where, "adam_betas", adam_betas)
        adam_weight_decay = weight_decay if adam_weight_decay is None else adam_weight_decay
        muon = dict(lr=lr, betas=(momentum, adam_betas[1]), eps=adam_eps, weight_decay=weight_decay,
                    nesterov=nesterov, adjust_lr=adjust_lr, ns_steps=ns_steps,
                    ns_coefficients=coefficients_setting(ns_coefficients), ns_eps=ns_eps, ns_dtype=ns_dtype,
                    head_wise=head_wise)
        adam = dict(muon, lr=adam_lr, betas=tuple(adam_betas), weight_decay=adam_weight_decay)
        _check_muon_settings(muon, where)
        check_adam_settings(adam, where)
        if gauges is not None and not isinstance(gauges, GaugeSet):
            raise TypeError(f"gauges must be a GaugeSet (from gaugeopt.find_gauges) or None, got {type(gauges).__name__}")
        #: Each rule's defaults: the settings of the groups it takes, before a user's group overrides them.
        self.rule_defaults: dict[str, dict[str, Any]] = {"muon": muon, "adam": adam}
        self._hidden = muon_parameter_names(gauges.model, gauges) if gauges is not None else None
        self._warned_one_peak = False
        super().__init__(params, {**muon, "use_muon": True}, gauges, channel_step=False,
                         edge_scale=edge_scale, nonfinite=nonfinite, compiled=compiled,
                         stack_parameters=stack_parameters)
        if not any(g["use_muon"] and g["params"] for g in self.param_groups):
            warnings.warn(f"DDCMuon: no parameter takes the Muon step (no hidden matrix among them), so lr={lr} "
                          f"is unused and every parameter takes the Adam rule with adam_lr={adam_lr}; "
                          f"DDCMuon.split() lists the split", UserWarning, stacklevel=2)

    def _group_parts(self, param_group: dict[str, Any]) -> list[dict[str, Any]]:
        """A user's group as a Muon group and an Adam group (module docstring), each with every key."""
        if not isinstance(param_group, Mapping):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        where = f"param group {len(self.param_groups)}"
        require_known_keys(where, param_group, {*self.defaults, *_MUON_ONLY, *_ADAM_ONLY})
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                            "tensors in sets will change between runs. Please use a list instead.")
        entries = [params] if isinstance(params, Tensor) else list(params)
        if "param_names" in param_group:  # names given beside the tensors: keep them with each tensor
            entries = list(zip(param_group["param_names"], entries))
        tensors = [e[1] if isinstance(e, tuple) else e for e in entries]
        if "use_muon" in param_group:
            flags = [bool(param_group["use_muon"])] * len(tensors)
        elif self._hidden is not None:
            names = {id(p): n for n, p in self.gauges.params().items()}
            flags = [names.get(id(p)) in self._hidden for p in tensors]
        else:
            flags = [p.ndim == 2 for p in tensors]
        own = {k: param_group[k] for k in _GROUP_KEYS if k in param_group}
        parts = []
        for rule, flag in (("muon", True), ("adam", False)):
            chosen = [e for e, f in zip(entries, flags) if f == flag]
            if not chosen and (entries or param_group.get("use_muon", True) != flag):
                continue  # an empty group stays one group, a Muon group unless it says use_muon=False
            settings = {**self.rule_defaults[rule], **own}
            if flag and "momentum" in param_group:
                settings["betas"] = (param_group["momentum"], settings["betas"][1])
            if not flag:
                settings.update({key: param_group[k] for k, key in _ADAM_ONLY.items() if k in param_group})
            if isinstance(settings["betas"], (tuple, list)):
                settings["betas"] = tuple(settings["betas"])
            settings["ns_coefficients"] = coefficients_setting(settings["ns_coefficients"])
            parts.append({**settings, "params": chosen, "use_muon": flag})
        return parts

    def _validate_group(self, group: dict, where: str) -> None:
        """Every setting (a group holds both rules' settings), and matrices where the group takes Muon.
        Runs on groups added, on every step and on groups a checkpoint loads."""
        require(isinstance(group.get("use_muon"), bool), where, f"use_muon must be True or False, got "
                                                                f"{group.get('use_muon')!r}")
        stale = sorted(set(group) & {*_MUON_ONLY, *_ADAM_ONLY})
        require(not stale, where, f"{stale} set a rule's part of a group when the group is added; each group now "
                                  f"has its own lr, betas (Muon's momentum is betas[0]), eps and weight_decay: set "
                                  f"those")
        _check_muon_settings(group, where)
        if group["use_muon"]:
            for p in group["params"]:
                require(p.ndim >= 2, where, f"Muon needs matrices (or conv kernels); a parameter of shape "
                                            f"{tuple(p.shape)} is in a group with use_muon=True: put it in a group "
                                            f"with use_muon=False")
        check_adam_settings(group, where)

    def rule_for(self, group: Mapping[str, Any]) -> Rule:
        if not group["use_muon"]:
            return ADAM
        return Muon(nesterov=bool(group["nesterov"]), ns_steps=group["ns_steps"],
                    ns_coefficients=ns_coefficient_schedule(group["ns_coefficients"], group["ns_steps"]),
                    ns_eps=float(group["ns_eps"]),
                    ns_dtype=group["ns_dtype"], adjust_lr=group["adjust_lr"],
                    head_blocks="frame" if group["head_wise"] else None, block_scale=False, flatten=True,
                    momentum_key="betas")

    def rule_name(self, group: Mapping[str, Any]) -> str:
        return "muon" if group["use_muon"] else "adam"

    def _check_step_inputs(self) -> None:
        super()._check_step_inputs()
        if not self._warned_one_peak:
            self._warn_one_peak()

    def _warn_one_peak(self) -> None:
        """Warn once when a ``OneCycleLR`` given one ``max_lr`` has set the same peak for the Muon and
        the Adam groups although their default rates differ: the ratio of the two is then lost."""
        peaks = {g["use_muon"]: set() for g in self.param_groups if g["params"]}
        for g in self.param_groups:
            if g["params"] and "max_lr" in g:
                peaks[g["use_muon"]].add(float(g["max_lr"]))
        if len(peaks) == 2 and all(len(p) == 1 for p in peaks.values()) and peaks[True] == peaks[False] and \
                self.rule_defaults["muon"]["lr"] != self.rule_defaults["adam"]["lr"]:
            self._warned_one_peak = True
            warnings.warn(f"DDCMuon: a scheduler set the same max_lr={peaks[True].pop():g} for the Muon and the Adam "
                          f"groups, whose rates were lr={self.rule_defaults['muon']['lr']:g} and "
                          f"adam_lr={self.rule_defaults['adam']['lr']:g}; to keep their ratio pass one max_lr per "
                          f"group: OneCycleLR(optimizer, max_lr=[g['lr'] for g in optimizer.param_groups], ...)",
                          UserWarning, stacklevel=user_stacklevel())


# --------------------------------------------------------------------------------------------------
# Construction helpers
# --------------------------------------------------------------------------------------------------


def _check_muon_settings(group: Mapping[str, Any], where: str) -> None:
    """``ValueError(f"{where}: <field> ...")`` for a bad Muon setting."""
    require_rate(where, group["lr"])
    for flag in ("nesterov", "head_wise"):
        require(isinstance(group[flag], bool), where, f"{flag} must be True or False, got {group[flag]!r}")
    require_nonnegative(where, "weight_decay", group["weight_decay"])
    require_choice(where, "adjust_lr", group["adjust_lr"], ADJUST_LR_CHOICES)
    steps = group["ns_steps"]
    require(isinstance(steps, int) and not isinstance(steps, bool) and 0 <= steps < 100, where,
            f"ns_steps must be an int in [0, 100), got {steps!r}")
    try:
        ns_coefficient_schedule(group["ns_coefficients"], steps, name="ns_coefficients")
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    require_nonnegative(where, "ns_eps", group["ns_eps"])
    dtype = group["ns_dtype"]
    require(dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point), where,
            f"ns_dtype must be a floating-point dtype or None, got {dtype!r}")
