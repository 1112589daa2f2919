"""Baseline optimizers the gauge-equivariant ones are measured against.

:class:`MuonWithAdamW` is the usual way Muon is deployed: ``torch.optim.Muon`` on the hidden matrices,
``torch.optim.AdamW`` on embeddings, the LM head and vectors, stepped together as one object. It
splits the parameters exactly like :class:`~gaugeopt.optim.ddc_muon.DDCMuon`
(:func:`~gaugeopt.optim.ddc_muon.muon_parameter_names`), so the two differ only in the gauge frames.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..gauges.gaugeset import GaugeSet, uncompiled
from .guards import (
    NonfinitePolicy,
    all_finite,
    require,
    require_betas,
    require_choice,
    require_nonnegative,
    require_rate,
    require_unit_interval,
)
from .ddc_muon import ADJUST_LR_CHOICES, muon_parameter_names

__all__ = ["MuonWithAdamW"]


class MuonWithAdamW(NonfinitePolicy):
    """``torch.optim.Muon`` on hidden matrices plus ``torch.optim.AdamW`` on everything else.

    Args:
        model: the model whose trainable parameters are optimized.
        gauges: its :class:`~gaugeopt.gauges.GaugeSet`, used only for the split: the LM head (the
            weight of a logit-shift family) and the input and output layers take AdamW; ``None``
            leaves the structural roles alone (embeddings and a top-level Linear shaped like an
            embedding table, the LM head, take AdamW, every other matrix Muon).
        muon_names: the parameter names that take Muon, overriding the automatic split (must be 2-D).
        lr, momentum, nesterov, weight_decay, adjust_lr, ns_steps: ``torch.optim.Muon``'s settings
            (``adjust_lr`` is its ``adjust_lr_fn``).
        adam_lr, adam_betas, adam_eps, adam_weight_decay: ``torch.optim.AdamW``'s (decay defaults
            to ``weight_decay``), the same defaults as DDCMuon's Adam part.

        nonfinite: ``"raise"`` or ``"skip"``, as for the gaugeopt optimizers (one fused finiteness
            check of all gradients before either optimizer steps).

    Offers what training loops and :func:`gaugeopt.testing.check_equivariance` use: ``step``,
    ``zero_grad``, ``param_groups``, ``state_dict`` and ``load_state_dict``. The guards of
    ``docs/robustness.md`` apply except two: settings are checked at construction only (torch's
    optimizers check nothing later), and float16/bfloat16 parameters keep torch's state dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        gauges: GaugeSet | None = None,
        *,
        muon_names: set[str] | None = None,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        adjust_lr: str = "original",
        ns_steps: int = 5,
        adam_lr: float = 1e-3,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        adam_weight_decay: float | None = None,
        nonfinite: str = "raise",
    ):
        where = type(self).__name__
        self._init_guards(nonfinite)
        require_rate(where, lr)
        require_unit_interval(where, "momentum", momentum)
        require_nonnegative(where, "weight_decay", weight_decay)
        require_choice(where, "adjust_lr", adjust_lr, ADJUST_LR_CHOICES)
        require(isinstance(ns_steps, int) and 0 <= ns_steps < 100, where,
                f"ns_steps must be an int in [0, 100), got {ns_steps!r}")
        require_rate(where, adam_lr)
        require_betas(where, "adam_betas", adam_betas)
        require_nonnegative(where, "adam_eps", adam_eps)
        if adam_weight_decay is not None:
            require_nonnegative(where, "adam_weight_decay", adam_weight_decay)
        model = uncompiled(model)  # a torch.compile wrapper shares the parameters of the module it wraps
        if gauges is not None and gauges.model is not model:
            raise ValueError("gauges were found on another model: pass the GaugeSet of this model "
                             "(gauges.bind(model) re-targets one to a copy)")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if muon_names is None:
            hidden = muon_parameter_names(model, gauges)
            muon_names = {n for n in hidden if n in params and params[n].ndim == 2}
        unknown = sorted(set(muon_names) - set(params))
        if unknown:
            raise ValueError(f"muon_names not among the model's trainable parameters: {unknown}")
        #: The names given to ``torch.optim.Muon`` and to ``torch.optim.AdamW``.
        self.muon_names = tuple(n for n in params if n in muon_names)
        self.adamw_names = tuple(n for n in params if n not in muon_names)
        self.muon = torch.optim.Muon([params[n] for n in self.muon_names], lr=lr, momentum=momentum,
                                     nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                                     adjust_lr_fn=adjust_lr) if self.muon_names else None
        self.adamw = torch.optim.AdamW([params[n] for n in self.adamw_names], lr=adam_lr, betas=adam_betas,
                                       eps=adam_eps,
                                       weight_decay=weight_decay if adam_weight_decay is None else adam_weight_decay
                                       ) if self.adamw_names else None

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The torch optimizers that have parameters (Muon's, AdamW's)."""
        return tuple(opt for opt in (self.muon, self.adamw) if opt is not None)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def _parts(self) -> list[tuple[str, torch.optim.Optimizer, tuple[str, ...]]]:
        """``(key, optimizer, parameter names)`` of the parts that have parameters."""
        return [(key, opt, names) for key, opt, names in (("muon", self.muon, self.muon_names),
                                                          ("adamw", self.adamw, self.adamw_names)) if opt is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_step_skipped = False
        named = [(n, p) for _, opt, names in self._parts() for n, p in zip(names, opt.param_groups[0]["params"])
                 if p.grad is not None]
        sparse = [n for n, p in named if p.grad.is_sparse]
        if sparse:
            raise ValueError(f"MuonWithAdamW does not support sparse gradients, got them for {sparse}")
        if not all_finite(p.grad for _, p in named):
            self.apply_nonfinite_policy([n for n, p in named if not torch.isfinite(p.grad).all()])  # raises or counts a skip
            return loss
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        shapes = {n: list(p.shape) for _, opt, names in self._parts() for n, p in zip(names, opt.param_groups[0]["params"])}
        return {**{key: opt.state_dict() for key, opt, _ in self._parts()},
                "gaugeopt": {"optimizer": type(self).__name__, "muon_names": list(self.muon_names),
                             "adamw_names": list(self.adamw_names), "shapes": shapes,
                             "skipped_steps": self.skipped_steps}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this class for the same parameters; ``ValueError`` before anything
        changes otherwise."""
        meta = state_dict.get("gaugeopt") if isinstance(state_dict, dict) else None
        if not isinstance(meta, dict) or meta.get("optimizer") != type(self).__name__:
            written = meta.get("optimizer") if isinstance(meta, dict) else "another optimizer"
            raise ValueError(f"this state dict was written by {written}, not {type(self).__name__}")
        for key, names in (("muon_names", self.muon_names), ("adamw_names", self.adamw_names)):
            if list(meta[key]) != list(names):
                raise ValueError(f"the state dict's {key} {meta[key]} differ from this optimizer's {list(names)}: "
                                 f"it was saved for another model")
        for key, opt, names in self._parts():
            saved = state_dict[key]
            for n, p, saved_id in zip(names, opt.param_groups[0]["params"], saved["param_groups"][0]["params"]):
                if list(meta["shapes"][n]) != list(p.shape):
                    raise ValueError(f"the state dict was saved for {n} of shape {tuple(meta['shapes'][n])}, "
                                     f"here it has shape {tuple(p.shape)}: it belongs to another model")
                for name, value in saved["state"].get(saved_id, {}).items():
                    if name != "step" and isinstance(value, torch.Tensor) and value.shape != p.shape:
                        raise ValueError(f"state {name!r} of {n} has shape {tuple(value.shape)}")
        for key, opt, _ in self._parts():
            opt.load_state_dict(state_dict[key])
        self.skipped_steps = int(meta["skipped_steps"])
