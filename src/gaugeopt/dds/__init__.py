"""Dead-direction signatures (DDS): cheap spectral readings of singular directions (dds.md).

* :func:`dead_direction_signatures` -- one forward and one backward give, per site, the positive
  spectra of the activation second moment ``A = X^T X / N`` and of the per-sample gradient second
  moment ``G = D^T D / N`` (smallest eigenvalue, log pseudo-determinant, rank).
* :func:`fit_slope`, :func:`read_cell`, :func:`rate_readout`, :class:`TrajectoryRecorder` -- slopes
  against the distance to the singular set and the "readable cells" rule.
* :class:`HorizontalProjection` -- a parameter change with its gauge-orbit part removed: the
  quotient metric of the remaining arc length.
* :func:`rrr_lambda` -- the closed-form learning coefficient of reduced-rank regression.
* :func:`estimate_llc`, :func:`scan_step_sizes`, :func:`scan_localization` -- the local learning
  coefficient baseline through ``devinterp`` (``pip install gaugeopt[llc]``), its step-size
  calibration and the localisation scan with its locality check.
* :class:`OrbitDriftRecorder` -- how far each gauge family's orbit coordinates move during a run.
* :func:`router_diagnostics` -- load balance and logit statistics of every MoE router, one row per layer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .audit import OrbitDriftRecorder, orbit_drift
from .capture import CapturedSites, SiteSpec, capture_sites
from .observables import (
    DEFAULT_REL_TOL,
    SLOPE_OBSERVABLES,
    PositiveSpectrum,
    SiteObservables,
    positive_spectrum,
    second_moment_eigenvalues,
    site_observables,
)
from .quotient import HorizontalProjection
from .reading import DDSReading, dead_direction_signatures
from .router import router_diagnostics, router_statistics
from .rrr import RRRLearningCoefficient, rrr_grid, rrr_lambda, rrr_learning_coefficient
from .slopes import (
    CLOCKS,
    VALIDATED_CLOCKS,
    CellReading,
    RateReadout,
    SlopeFit,
    TrajectoryRecorder,
    fit_slope,
    flatten_parameters,
    inverse_step_clock,
    log_spaced_steps,
    rate_readout,
    read_cell,
    remaining_arc_length,
    remaining_arc_length_of_checkpoints,
)

_LAZY = {name: "gaugeopt.dds.llc" for name in
         ("estimate_llc", "LLCEstimate", "scan_step_sizes", "StepSizeScan", "full_data_loss",
          "scan_localization", "LocalizationScan")}

__all__ = [
    "DEFAULT_REL_TOL", "SLOPE_OBSERVABLES",
    "CapturedSites", "SiteSpec", "capture_sites",
    "PositiveSpectrum", "SiteObservables", "positive_spectrum", "second_moment_eigenvalues",
    "site_observables",
    "DDSReading", "dead_direction_signatures", "HorizontalProjection",
    "CLOCKS", "VALIDATED_CLOCKS", "CellReading", "RateReadout", "SlopeFit", "TrajectoryRecorder", "fit_slope",
    "flatten_parameters", "inverse_step_clock", "log_spaced_steps", "rate_readout", "read_cell", "remaining_arc_length",
    "remaining_arc_length_of_checkpoints",
    "RRRLearningCoefficient", "rrr_grid", "rrr_lambda", "rrr_learning_coefficient",
    "OrbitDriftRecorder", "orbit_drift",
    "router_diagnostics", "router_statistics",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gaugeopt.dds' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .llc import (LLCEstimate, LocalizationScan, StepSizeScan, estimate_llc, full_data_loss,
                      scan_localization, scan_step_sizes)
