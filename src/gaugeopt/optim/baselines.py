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

from ..gauges.gaugeset import GaugeSet
from .ddc_muon import muon_parameter_names

__all__ = ["MuonWithAdamW"]


class MuonWithAdamW:
    """``torch.optim.Muon`` on hidden matrices plus ``torch.optim.AdamW`` on everything else.

    Args:
        model: the model whose trainable parameters are optimized.
        gauges: its :class:`~gaugeopt.gauges.GaugeSet`, used only to recognise the LM head (the
            weight of a logit-shift family); ``None`` treats every non-embedding matrix as hidden.
        muon_names: the parameter names that take Muon, overriding the automatic split (must be 2-D).
        lr, momentum, nesterov, weight_decay, adjust_lr, ns_steps: ``torch.optim.Muon``'s settings
            (``adjust_lr`` is its ``adjust_lr_fn``).
        adam_lr, adam_betas, adam_eps, adam_weight_decay: ``torch.optim.AdamW``'s (decay defaults
            to ``weight_decay``), the same defaults as DDCMuon's Adam part.

    Offers what training loops and :func:`gaugeopt.testing.check_equivariance` use: ``step``,
    ``zero_grad``, ``param_groups``, ``state_dict`` and ``load_state_dict``.
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
    ):
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
                                     adjust_lr_fn=adjust_lr)
        self.adamw = torch.optim.AdamW([params[n] for n in self.adamw_names], lr=adam_lr, betas=adam_betas,
                                       eps=adam_eps,
                                       weight_decay=weight_decay if adam_weight_decay is None else adam_weight_decay)

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return self.muon, self.adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
