"""Slope fits, the readable-cell rule, arc lengths and the trajectory recorder."""

import math

import numpy as np
import pytest
import torch

from gaugeopt.dds import (
    TrajectoryRecorder,
    dead_direction_signatures,
    fit_slope,
    rate_readout,
    read_cell,
    remaining_arc_length,
    remaining_arc_length_of_checkpoints,
)
from gaugeopt.models import DeepLinear, DeepLinearConfig


def test_exact_power_law_slope_and_k_hat():
    t = np.geomspace(1e-3, 1e-1, 10)
    fit = fit_slope(t, 5.0 * t**4)
    assert fit.slope == pytest.approx(4.0, rel=1e-12)
    assert fit.k_hat == pytest.approx(3.0)
    assert fit.r2 == pytest.approx(1.0) and fit.stderr == pytest.approx(0.0, abs=1e-10)
    assert fit.points == 10 and fit.window == pytest.approx((1e-3, 1e-1))
    # a log-valued observable (logdet) is fitted as is
    assert fit_slope(t, 3 * np.log(t) + 2, kind="linear").slope == pytest.approx(3.0)


def test_window_and_standard_error():
    rng = np.random.default_rng(0)
    t = np.geomspace(1e-4, 1, 40)
    values = t**2 * np.exp(0.1 * rng.standard_normal(40))
    fit = fit_slope(t, values, window=(1e-3, 1e-1))
    assert fit.points == sum((t >= 1e-3) & (t <= 1e-1))
    assert abs(fit.slope - 2) < 4 * fit.stderr
    log_t, y = np.log(t[(t >= 1e-3) & (t <= 1e-1)]), np.log(values[(t >= 1e-3) & (t <= 1e-1)])
    slope, intercept = np.polyfit(log_t, y, 1)
    residual = y - (slope * log_t + intercept)
    expected_se = math.sqrt(residual @ residual / (log_t.size - 2) / ((log_t - log_t.mean()) ** 2).sum())
    assert fit.slope == pytest.approx(slope) and fit.stderr == pytest.approx(expected_se)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="two distinct"):
        fit_slope([1.0, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="equal length"):
        fit_slope([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="window"):
        fit_slope([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], window=(2.0, 1.0))
    with pytest.raises(ValueError, match="kind"):
        fit_slope([1.0, 2.0], [1.0, 2.0], kind="exp")


def test_readable_cell_rule():
    t = np.geomspace(1e-3, 1e-1, 10)
    assert read_cell(t, t**2).reads
    short = read_cell(t[:7], t[:7] ** 2)
    assert not short.reads and "7 usable points" in short.reason
    rising = read_cell(t, t**-1.0)  # grows as t -> 0: nothing decays, not measurable
    assert not rising.reads and not rising.measurable and rising.reason.startswith("not measurable")
    noisy = read_cell(t, t**2 * np.exp(2 * np.random.default_rng(0).standard_normal(10)))
    assert noisy.measurable and not noisy.reads and "R^2" in noisy.reason
    # a bend: slope 1 on the small-t half, 3 on the large-t half
    bent = np.where(t < 1e-2, t, t**3 / 1e-4)
    verdict = read_cell(t, bent)
    assert not verdict.reads and "differ" in verdict.reason
    assert verdict.half_slopes[0] == pytest.approx(1.0, rel=0.1)


def test_remaining_arc_length():
    np.testing.assert_allclose(remaining_arc_length([1.0, 2.0, 3.0]), [6.0, 5.0, 3.0, 0.0])
    points = [torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0]), torch.tensor([3.0, 5.0])]
    np.testing.assert_allclose(remaining_arc_length_of_checkpoints(points), [6.0, 1.0, 0.0])
    # a metric and a projection that removes the second (vertical) coordinate
    t = remaining_arc_length_of_checkpoints(
        points, metric=lambda d: float(2 * d.norm()), project_horizontal=lambda d: d * torch.tensor([1.0, 0.0])
    )
    np.testing.assert_allclose(t, [6.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="non-negative"):
        remaining_arc_length([1.0, -1.0])


def _per_sample_mse(outputs, targets):
    return 0.5 * (outputs - targets).pow(2).sum(-1)


def test_recorder_reads_a_decaying_dead_direction():
    """A deep-linear chain whose dead entry shrinks geometrically; each step moves t by a known amount."""
    torch.manual_seed(0)
    width, depth = 4, 3
    model = DeepLinear(DeepLinearConfig(width=width, depth=depth)).double()
    x = torch.randn(200, width, dtype=torch.float64)
    y = x.clone()
    y[:, -1] = 0.3 * torch.randn(200, dtype=torch.float64)
    recorder = TrajectoryRecorder(model, x, y, loss=_per_sample_mse, sites=["layers.0", "layers.1"])
    # Dead weights follow t_k; the last recording sits at 0 so remaining arc length = sqrt(depth) * t_k.
    dead_values = [*np.geomspace(0.5, 0.01, 12), 0.0]
    for step, value in enumerate(dead_values):
        diagonal = torch.ones(width, dtype=torch.float64)
        diagonal[-1] = value
        with torch.no_grad():
            for layer in model.layers:
                layer.weight.copy_(torch.diag(diagonal))
        recorder.record(step)
    t = recorder.remaining_arc_length()
    np.testing.assert_allclose(t[:-1], math.sqrt(depth) * np.asarray(dead_values[:-1]), rtol=1e-10)
    readout = recorder.readout(observables=["lambda_min_G"])
    slopes = {cell.site: cell.fit.slope for cell in readout.cells}
    assert slopes["layers.0:output"] == pytest.approx(2 * (depth - 1), rel=0.05)
    assert slopes["layers.1:output"] == pytest.approx(2 * (depth - 2), rel=0.05)
    assert readout.readable_cells == readout.total_cells == 2
    assert readout.as_dict()["readable_cells"] == 2
    with pytest.raises(ValueError, match="increase"):
        recorder.record(3)


def test_rate_readout_validates():
    model = DeepLinear(DeepLinearConfig(width=3, depth=2)).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    reading = dead_direction_signatures(model, x, x, loss=_per_sample_mse, sites=["layers.0"])
    with pytest.raises(ValueError, match="readings but"):
        rate_readout([1.0, 2.0], [reading])
    with pytest.raises(ValueError, match="unknown observables"):
        rate_readout([1.0], [reading], observables=["rank_G"])


def test_update_path_follows_the_path_not_the_chord():
    model = DeepLinear(DeepLinearConfig(width=2, depth=1)).double()
    x = torch.randn(10, 2, dtype=torch.float64)
    recorder = TrajectoryRecorder(model, x, x, loss=_per_sample_mse, sites=["layers.0"])
    recorder.update_path()  # calls before the first recording do not start the path
    recorder.record(0)
    for shift in (1.0, -1.0):  # out and back: chord 0, path 2
        with torch.no_grad():
            model.layers[0].weight[0, 0] += shift
        recorder.update_path()
    recorder.record(1)
    with torch.no_grad():
        model.layers[0].weight[0, 0] += 0.5
    recorder.record(2)  # no update_path: the chord, 0.5
    np.testing.assert_allclose(recorder.remaining_arc_length(), [2.5, 0.5, 0.0])


def test_clocks_inverse_step_and_log_spaced_steps():
    from gaugeopt.dds import CLOCKS, inverse_step_clock, log_spaced_steps

    assert set(CLOCKS) == {"arc-length", "inverse-step"}
    np.testing.assert_allclose(inverse_step_clock([10, 100, 1000]), [100.0, 10.0, 1.0])
    with pytest.raises(ValueError, match="increasing positive"):
        inverse_step_clock([10, 10, 20])
    steps = log_spaced_steps(10, 6000, 40)
    assert steps[0] == 10 and steps[-1] == 6000 and steps == sorted(set(steps))
    assert len(steps) == len(np.unique(np.geomspace(10, 6000, 40).astype(int)))  # the bridge's checkpoints
    # a power law in training time, t_true = s^(-1/2), reads on the inverse-step clock at half the rate
    s = np.asarray(log_spaced_steps(10, 10_000, 30), dtype=float)
    cell = read_cell(inverse_step_clock(s), (s ** -0.5) ** 4)
    assert cell.reads and cell.fit.slope == pytest.approx(2.0)


def test_recorder_clock_names():
    torch.manual_seed(0)
    model = DeepLinear(DeepLinearConfig(width=3, depth=2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    recorder = TrajectoryRecorder(model, x, x, loss=lambda o, y: 0.5 * (o - y).pow(2).sum(-1), sites=["layers.0"])
    for step in (1, 4, 16):
        with torch.no_grad():
            model.layers[0].weight.mul_(0.5)
        recorder.record(step)
    np.testing.assert_allclose(recorder.clock("inverse-step"), [16.0, 4.0, 1.0])
    np.testing.assert_allclose(recorder.clock("arc-length"), recorder.remaining_arc_length())
    assert recorder.readout(clock="inverse-step").t == (16.0, 4.0, 1.0)
    with pytest.raises(ValueError, match="unknown clock"):
        recorder.clock("wall-time")
