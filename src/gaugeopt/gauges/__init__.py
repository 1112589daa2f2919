"""Gauges: continuous symmetry groups of a network's parameters, and their discovery.

``find_gauges(model, example_inputs, output="logits")`` traces the model and returns a
:class:`GaugeSet`; each family in it can sample, apply and differentiate its group action.
"""

from .discovery import find_gauges
from .families import (
    EDGE_SCALE,
    AxisRef,
    GaugeFamily,
    HeadRotation,
    LogitShift,
    NeuronScaling,
    NormScaling,
    full_rotation_algebra,
    unit_section,
)
from .gaugeset import GaugeSet, GaugeSummary, GroupElement, Skipped, SummaryRow, uncompiled

__all__ = [
    "find_gauges", "GaugeSet", "GaugeSummary", "GroupElement", "Skipped", "SummaryRow",
    "GaugeFamily", "AxisRef", "LogitShift", "NeuronScaling", "NormScaling", "HeadRotation",
    "full_rotation_algebra", "uncompiled", "EDGE_SCALE", "unit_section",
]
