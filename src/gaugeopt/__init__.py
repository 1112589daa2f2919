"""gaugeopt: gauge-aware optimizers and dead-direction diagnostics for PyTorch.

Public entry points are imported lazily so that ``import gaugeopt`` stays cheap and optional
dependencies (devinterp, matplotlib) load only when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "find_gauges": "gaugeopt.gauges",
    "GaugeSet": "gaugeopt.gauges",
    "DDCAdam": "gaugeopt.optim",
    "DDCMuon": "gaugeopt.optim",
    "SymmetryCompatible": "gaugeopt.optim",
    "symmetry_param_groups": "gaugeopt.optim",
    "clip_grad_norm_": "gaugeopt.optim",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in {"models", "gauges", "optim", "dds", "experiments", "testing", "data", "monitor", "integrations"}:
        return importlib.import_module(f"gaugeopt.{name}")
    raise AttributeError(f"module 'gaugeopt' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .gauges import GaugeSet, find_gauges
    from .optim import DDCAdam, DDCMuon, SymmetryCompatible, clip_grad_norm_, symmetry_param_groups
