"""Orbit-drift audit against the real gauge library: AdamW drifts along orbits, a no-op does not."""

import math

import pytest
import torch
import torch.nn.functional as F

from gaugeopt.dds import OrbitDriftRecorder, orbit_drift
from gaugeopt.gauges import find_gauges
from gaugeopt.models import ReLUMLP, ReLUMLPConfig


def _setup():
    torch.manual_seed(0)
    model = ReLUMLP(ReLUMLPConfig(sizes=(4, 8, 3))).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    y = torch.randn(64, 3, dtype=torch.float64)
    gauges = find_gauges(model, x[:2])
    return model, x, y, gauges


def _run(model, x, y, gauges, step_fn, steps=30):
    audit = OrbitDriftRecorder(gauges, model)
    for step in range(1, steps + 1):
        step_fn()
        audit.record(step)
    return audit.report()


def test_adamw_drifts_along_neuron_scaling_orbits():
    model, x, y, gauges = _setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)

    def adamw_step():
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()

    report = _run(model, x, y, gauges, adamw_step)
    assert report, "the ReLU MLP should have at least one gauge family"
    moved = [values["max_abs_change"] for values in report.values() if values["coordinates"]]
    assert max(moved) > 1e-2
    for values in report.values():
        assert values["max_abs_change_over_run"] >= values["max_abs_change"]
        assert values["last_step"] == 30


def test_a_step_that_does_nothing_does_not_drift():
    model, x, y, gauges = _setup()
    report = _run(model, x, y, gauges, lambda: None, steps=3)
    assert all(values["max_abs_change"] == 0.0 and values["rms_change"] == 0.0
               for values in report.values())


def test_orbit_drift_arithmetic_and_errors():
    start = {"a": torch.tensor([0.0, 1.0, 2.0, 3.0])}
    now = {"a": torch.tensor([0.0, 1.0, 2.0, 5.0])}
    drift = orbit_drift(start, now)["a"]
    assert drift["max_abs_change"] == 2.0 and drift["rms_change"] == pytest.approx(1.0)
    assert drift["coordinates"] == 4 and drift["undefined"] == 0
    dead = orbit_drift({"a": torch.tensor([0.0, -math.inf, 2.0])}, {"a": torch.tensor([1.0, 0.0, math.nan])})["a"]
    assert dead == {"max_abs_change": 1.0, "rms_change": 1.0, "coordinates": 1, "undefined": 2}  # log 0 of a dead unit
    with pytest.raises(ValueError, match="families differ"):
        orbit_drift(start, {"b": torch.zeros(4)})
    with pytest.raises(ValueError, match="changed from 4"):
        orbit_drift(start, {"a": torch.zeros(3)})
    with pytest.raises(TypeError, match="orbit_coordinates"):
        OrbitDriftRecorder(object(), torch.nn.Linear(2, 2))
    model, *_ , gauges = _setup()
    with pytest.raises(ValueError, match="nothing recorded"):
        OrbitDriftRecorder(gauges, model).report()
