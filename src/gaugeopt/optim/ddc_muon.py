"""DDCMuon: Muon on hidden matrices and Adam on the rest, exactly equivariant under a model's gauges.

One ``torch.optim.Optimizer`` for the whole model (docs/ddc_muon.md), stepped as frame -> base rule ->
lift like :class:`~gaugeopt.optim.ddc_adam.DDCAdam`: every tensor's gradient enters its frame
(:mod:`gaugeopt.optim.frames`), the group's rule maps it to a canonical direction ``D``, and the lift
writes ``p <- (1 - lr wd) p - lr D gamma``. Muon groups take :class:`~gaugeopt.optim.rules.Muon`
(``torch.optim.Muon``'s update)::

    B <- mu B + (1 - mu) G~,    U = (1 - mu) G~ + mu B (nesterov) or B,    D = s NS(U)

with ``NS`` the quintic Newton-Schulz iteration (:func:`~gaugeopt.optim.matrix_functions.newton_schulz`,
torch's operation for operation) and ``s`` the shape factor ``sqrt(max(1, rows / cols))``
(``adjust_lr="original"``) or ``0.2 sqrt(max(rows, cols))`` (``"match_rms_adamw"``). Adam groups take
DDCAdam's rule. Why this is exact, per family:

* *Norm scale, neuron scale:* Muon sees the canonical (merged, balanced) matrix; ``NS(D U) != D NS(U)``
  for a diagonal ``D``, which is why the frame is needed.
* *Head rotation:* ``NS(Q U R^T) = Q NS(U) R^T`` for orthogonal ``Q``, ``R`` (the iteration is a
  polynomial in ``X X^T`` times ``X`` and ``|U|_F`` is invariant), so per-head rotations compose with
  Muon whole-matrix or head-wise (``head_wise=True``: each head's block, read from the rotation
  family, is orthogonalised on its own; the shape factor stays the whole matrix's).
* *Logit or router shift:* the gradient is centred and so is ``D``: the mean row never moves.

With ``ns_dtype=None`` (the default) Newton-Schulz runs in the parameters' dtype and training from
``g . theta_0`` gives ``g . theta_t`` to rounding; ``ns_dtype=torch.bfloat16`` reproduces
``torch.optim.Muon`` (which hard-codes bfloat16), whose rounding is not equivariant.

**Which parameters take Muon.** Each group has a flag ``use_muon``. When a group does not set it,
:func:`muon_parameter_names` decides: the hidden matrices, i.e. every 2-D parameter except embedding
tables, the LM head and the layers that read the model's input or write its output directly.
Convolution kernels count as hidden matrices: Muon orthogonalises each as its ``(out, in * kernel)``
matricisation (``Muon(flatten=True)``). Everything else (vectors, embeddings, input and output layers)
takes Adam. Without a ``GaugeSet`` every 2-D parameter takes Muon unless its group says
``use_muon=False``.

**Learning rates.** ``lr`` (and ``weight_decay``) are the Muon groups'; ``adam_lr`` (and
``adam_weight_decay``) the Adam groups'. In the param groups both are stored under ``lr`` and
``weight_decay`` (so LR schedulers scale both); :meth:`DDCMuon.split` prints which parameters take
which rule at which learning rate. A ``UserWarning`` says so once when no parameter takes Muon (a
model without hidden matrices): then ``lr`` is unused.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..gauges.families import LogitShift
from ..gauges.gaugeset import GaugeSet
from .base import FramedOptimizer
from .ddc_adam import ADAM, check_adam_settings
from .guards import require, require_betas, require_choice, require_nonnegative, require_rate, require_unit_interval
from .layerwise import muon_lr_scale
from .matrix_functions import MUON_NS_COEFFICIENTS
from .rules import Muon, Rule

#: Modules whose weight DDCMuon's Muon rule steps as its matricisation (out channels, the rest).
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

__all__ = ["DDCMuon", "muon_parameter_names", "muon_lr_scale", "ADJUST_LR_CHOICES"]

#: Shape factors of the Muon step, as in ``torch.optim.Muon``'s ``adjust_lr_fn``.
ADJUST_LR_CHOICES = ("original", "match_rms_adamw")

#: DDCMuon's default section constant ``c`` of the neuron frames (DDCAdam's is ``gauges.EDGE_SCALE``).
MUON_EDGE_SCALE = 0.5

#: Keys a user group may set besides ``params`` and ``use_muon``: the Muon settings, and the Adam
#: part's settings under ``adam_*`` names (stored in the Adam groups under Adam's own names).
_MUON_KEYS = ("lr", "momentum", "nesterov", "weight_decay", "adjust_lr", "ns_steps", "ns_coefficients", "ns_eps",
              "ns_dtype", "head_wise")
_ADAM_KEYS = {"adam_lr": "lr", "adam_betas": "betas", "adam_eps": "eps", "adam_weight_decay": "weight_decay"}


def muon_parameter_names(model: nn.Module, gauges: GaugeSet | None = None) -> set[str]:
    """Names of the parameters that DDCMuon (and the Muon + AdamW baseline) give the Muon step: the
    hidden matrices, i.e. every 2-D parameter except ``nn.Embedding`` tables, the weight of a
    ``logit_shift`` family (the LM head) and, when ``gauges`` come from ``find_gauges``, the layers
    that read the model's input or write its output directly (``gauges.input_layers`` and
    ``gauges.output_layers``: an input projection or patch embedding, an output layer), as Muon's
    recipe leaves those to AdamW. Without ``gauges`` every 2-D non-embedding parameter counts.
    Convolution kernels (``nn.Conv1d/2d/3d``) count as hidden matrices too: Muon steps each as its
    ``(out, in * kernel)`` matricisation (the first conv, which reads the input, is an input layer)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    excluded: set[str] = set()
    if gauges is not None:
        excluded |= {f.weight for f in gauges if isinstance(f, LogitShift) and f.kind == "logit_shift"}
        excluded |= {*gauges.input_layers, *gauges.output_layers}
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, _CONVOLUTIONS)}
    return {n for n, p in model.named_parameters()
            if (p.ndim == 2 or id(p) in kernels) and id(p) not in embeddings and n not in excluded}


class DDCMuon(FramedOptimizer):
    """Muon on hidden matrices and DDCAdam's rule on the rest, exactly equivariant under ``gauges``.

    Args:
        params: parameters, ``(name, parameter)`` pairs or group dicts. A group may set any keyword
            below (the ``adam_*`` ones configure its Adam part) and ``use_muon`` to choose the rule
            for all its parameters; otherwise :func:`muon_parameter_names` splits it.
        gauges: the model's :class:`~gaugeopt.gauges.GaugeSet` (``gaugeopt.find_gauges``), or ``None``
            for none (then every 2-D parameter takes Muon unless its group sets ``use_muon=False``).
        lr, momentum, nesterov, weight_decay: the Muon groups', as in ``torch.optim.Muon`` (decay is
            ``W <- (1 - lr wd) W``).
        adjust_lr: the shape factor, ``"original"`` or ``"match_rms_adamw"`` (torch's ``adjust_lr_fn``).
        ns_steps, ns_coefficients, ns_eps: the Newton-Schulz iteration.
        ns_dtype: its arithmetic dtype: ``None`` (default) uses the parameters' dtype, which keeps the
            equivariance exact; ``torch.bfloat16`` reproduces ``torch.optim.Muon``.
        head_wise: orthogonalise each attention head's block of the query/key/value rows and output
            columns separately (heads read from the model's rotation families).
        adam_lr, adam_betas, adam_eps: the Adam groups' settings (embeddings, the head, vectors).
        adam_weight_decay: decay of the Adam groups (default: ``weight_decay``).
        edge_scale: the section constant ``c`` of the neuron frames, as in :class:`~gaugeopt.optim.DDCAdam`;
            0.5 by default (DDCAdam's 1 made Muon's fixed-size orthogonal steps unstable on a deep
            gated stack without norms: docs/ddc_muon.md).
        nonfinite, compiled: as in :class:`~gaugeopt.optim.DDCAdam`.
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
        ns_coefficients: tuple[float, float, float] = MUON_NS_COEFFICIENTS,
        ns_eps: float = 1e-7,
        ns_dtype: torch.dtype | None = None,
        head_wise: bool = False,
        adam_lr: float = 1e-3,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        adam_weight_decay: float | None = None,
        edge_scale: float = MUON_EDGE_SCALE,
        nonfinite: str = "raise",
        compiled: bool = False,
    ):
        where = type(self).__name__
        require_betas(where, "adam_betas", adam_betas)
        require(isinstance(ns_coefficients, (tuple, list)), where,
                f"ns_coefficients must be three finite numbers (a, b, c), got {ns_coefficients!r}")
        adam_weight_decay = weight_decay if adam_weight_decay is None else adam_weight_decay
        muon_defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                             adjust_lr=adjust_lr, ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients),
                             ns_eps=ns_eps, ns_dtype=ns_dtype, head_wise=head_wise)
        adam_defaults = dict(lr=adam_lr, betas=tuple(adam_betas), eps=adam_eps, weight_decay=adam_weight_decay)
        _check_muon_settings(muon_defaults, where)
        check_adam_settings(adam_defaults, where)
        if gauges is not None and not isinstance(gauges, GaugeSet):
            raise TypeError(f"gauges must be a GaugeSet (from gaugeopt.find_gauges) or None, got {type(gauges).__name__}")
        names = {id(p): n for n, p in gauges.model.named_parameters()} if gauges is not None else {}
        hidden = muon_parameter_names(gauges.model, gauges) if gauges is not None else None
        groups = _split_groups(params, muon_defaults, adam_defaults, names, hidden)
        defaults = {**muon_defaults, "betas": tuple(adam_betas), "eps": adam_eps, "use_muon": True}
        super().__init__(groups, defaults, gauges, channel_step=False, edge_scale=edge_scale,
                         nonfinite=nonfinite, compiled=compiled)
        if not any(g["use_muon"] and g["params"] for g in self.param_groups):
            warnings.warn(f"DDCMuon: no parameter takes the Muon step (no hidden matrix among them), so lr={lr} "
                          f"is unused and every parameter takes the Adam rule with adam_lr={adam_lr}; "
                          f"DDCMuon.split() lists the split", UserWarning, stacklevel=2)

    def _validate_group(self, group: dict, where: str) -> None:
        """Every setting (a group holds both rules' settings), and matrices where the group takes Muon.
        Runs on groups added, on every step and on groups a checkpoint loads."""
        require(isinstance(group.get("use_muon"), bool), where, f"use_muon must be True or False, got "
                                                                f"{group.get('use_muon')!r}")
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
                    ns_coefficients=tuple(group["ns_coefficients"]), ns_eps=float(group["ns_eps"]),
                    ns_dtype=group["ns_dtype"], adjust_lr=group["adjust_lr"],
                    head_blocks="frame" if group["head_wise"] else None, block_scale=False, flatten=True)

    def split(self, *, print_table: bool = True) -> list[tuple[str, tuple[int, ...], str, float]]:
        """``(parameter, shape, rule, lr)`` for every parameter, Muon's first; printed as a table."""
        names = self.parameter_names()
        rows = [(names[gi][pi] or f"group {gi} entry {pi}", tuple(p.shape), "muon" if g["use_muon"] else "adam",
                 float(g["lr"])) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])]
        rows.sort(key=lambda r: r[2] != "muon")
        if print_table:
            width = max([len(r[0]) for r in rows] + [9])
            print(f"{'parameter':<{width}}  {'shape':<14}  rule  lr")
            for name, shape, rule, lr in rows:
                print(f"{name:<{width}}  {str(shape):<14}  {rule:<4}  {lr:g}")
        return rows


# --------------------------------------------------------------------------------------------------
# Construction helpers
# --------------------------------------------------------------------------------------------------


def _check_muon_settings(group: Mapping[str, Any], where: str) -> None:
    """``ValueError(f"{where}: <field> ...")`` for a bad Muon setting."""
    require_rate(where, group["lr"])
    require_unit_interval(where, "momentum", group["momentum"])
    for flag in ("nesterov", "head_wise"):
        require(isinstance(group[flag], bool), where, f"{flag} must be True or False, got {group[flag]!r}")
    require_nonnegative(where, "weight_decay", group["weight_decay"])
    require_choice(where, "adjust_lr", group["adjust_lr"], ADJUST_LR_CHOICES)
    steps = group["ns_steps"]
    require(isinstance(steps, int) and not isinstance(steps, bool) and 0 <= steps < 100, where,
            f"ns_steps must be an int in [0, 100), got {steps!r}")
    coefficients = group["ns_coefficients"]
    require(isinstance(coefficients, (tuple, list)) and len(coefficients) == 3
            and all(isinstance(c, (int, float)) and math.isfinite(c) for c in coefficients), where,
            f"ns_coefficients must be three finite numbers (a, b, c), got {coefficients!r}")
    require_nonnegative(where, "ns_eps", group["ns_eps"])
    dtype = group["ns_dtype"]
    require(dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point), where,
            f"ns_dtype must be a floating-point dtype or None, got {dtype!r}")


def _split_groups(params, muon_defaults: dict, adam_defaults: dict, names: dict[int, str],
                  hidden: set[str] | None) -> list[dict]:
    """Turn the user's params into Muon groups and Adam groups (every key filled in)."""
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors or of group dicts, got a single Tensor")
    params = list(params)
    if not params:
        raise ValueError("DDCMuon got an empty parameter list")
    user_groups = params if isinstance(params[0], dict) else [{"params": params}]
    groups = []
    for index, user in enumerate(user_groups):
        unknown = set(user) - {"params", "use_muon", *_MUON_KEYS, *_ADAM_KEYS}
        if unknown:
            raise ValueError(f"param group {index} has unknown option(s) {sorted(unknown)}")
        if isinstance(user["params"], set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                            "of tensors in sets will change between runs. Please use a list instead.")
        entries = [user["params"]] if isinstance(user["params"], Tensor) else list(user["params"])
        tensors = [e[1] if isinstance(e, tuple) else e for e in entries]
        if "use_muon" in user:
            muon_flags = [bool(user["use_muon"])] * len(tensors)
        elif hidden is not None:
            muon_flags = [names.get(id(p)) in hidden for p in tensors]
        else:
            muon_flags = [p.ndim == 2 for p in tensors]
        muon = {**muon_defaults, **{k: user[k] for k in _MUON_KEYS if k in user}}
        adam = {**muon_defaults, **adam_defaults, **{v: user[k] for k, v in _ADAM_KEYS.items() if k in user}}
        for settings, flag in ((muon, True), (adam, False)):
            # entries as given: (name, tensor) pairs keep their names (torch's checks apply to them)
            chosen = [e for e, f in zip(entries, muon_flags) if f == flag]
            if chosen:
                settings = dict(settings, ns_coefficients=tuple(settings["ns_coefficients"]))
                if flag:
                    settings.update(betas=adam["betas"], eps=adam["eps"])
                groups.append({**settings, "params": chosen, "use_muon": flag})
    return groups
