"""Optimizers: update math as pure functions on tensors, thin ``torch.optim.Optimizer`` shells.

Modules: ``matrix_functions`` (Newton-Schulz polar, inverse square roots), ``ddc_adam``,
``ddc_muon``, ``symcompat`` (the symmetry-compatible layerwise stack and its parameter classifier),
``guards`` (the checks every optimizer shares: settings, gradients, low precision, checkpoints).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DDCAdam": "gaugeopt.optim.ddc_adam",
    "DDCMuon": "gaugeopt.optim.ddc_muon",
    "SymmetryCompatible": "gaugeopt.optim.symcompat",
    "symmetry_param_groups": "gaugeopt.optim.symcompat",
    "NonFiniteGradientError": "gaugeopt.optim.guards",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gaugeopt.optim' has no attribute {name!r}")
