"""The readout rule of dds.md §3 (gaugeopt.dds.slopes) on trajectories with a known answer.

Fixed before any run: a cell is measurable when it falls by >= 0.5 decades over the smaller-t half of
its window, and reads when measurable with R^2 >= 0.9, >= 8 points, a positive slope and half-window
slopes within 25 %. It must read what was planted, at the planted rate, and nothing on a control.
"""

import numpy as np
import pytest
import torch

from gaugeopt.dds import rate_readout, read_cell
from gaugeopt.experiments.bridge import noisy_bridge_sgd, planted_cells
from gaugeopt.experiments.common import half_squared_error
from gaugeopt.experiments.rrr import read_rrr_path, rrr_checkpoint


@pytest.fixture(scope="module")
def sgd_bridge():
    # depth 3: planted A cells at layers 1..3 (slope 2l), G cells at layers 1, 2 (slope 2(L-l));
    # the output's G (label-noise residual) and every cell of the r = 0 run are controls.
    return noisy_bridge_sgd(depth=3, width=5, dead_counts=(1, 2), steps=3000, lr=0.1, checkpoints=30,
                            probe_samples=256, control=True, seed=0)


def test_sgd_bridge_reads_every_planted_cell_and_no_control(sgd_bridge):
    for run in sgd_bridge["runs"]:
        readout = run["readout"]
        assert readout["planted"] == len(planted_cells(3, run["dead"]))
        assert readout["planted_read"] == readout["planted"], (run["dead"], readout["summary"])
        assert readout["controls_read"] == 0, run["dead"]
    control = next(run for run in sgd_bridge["runs"] if run["dead"] == 0)
    assert control["readout"]["summary"].startswith("not measurable")


def test_sgd_bridge_reads_the_planted_rates(sgd_bridge):
    for run in sgd_bridge["runs"]:
        for cell, ratio in run["readout"]["slope_over_planted"].items():
            # the SGD path wanders off the diagonal a little: within 30 % of the planted slope
            assert ratio == pytest.approx(1.0, abs=0.3), (run["dead"], cell)
    # the count: logdet+ over lambda+_min reads the number of planted directions
    two = next(run for run in sgd_bridge["runs"] if run["dead"] == 2)["readout"]["cells"]
    slopes = {(c["site"], c["observable"]): c["fit"]["slope"] for c in two if c["fit"]}
    for site in ("layers.0:output", "layers.1:output"):
        for side in ("G", "A"):
            assert slopes[site, f"logdet_{side}"] / slopes[site, f"lambda_min_{side}"] == pytest.approx(2, rel=0.15)


@pytest.mark.parametrize("H", [2, 3, 5])
def test_rrr_singular_path_reads_the_planted_deficit_exactly(H):
    result = read_rrr_path(10, 5, H, 1, t_values=np.geomspace(0.3, 0.003, 12), seed=H)
    assert result["planted_read"] == result["planted"] == 6 and result["controls_read"] == 0
    for cell, ratio in result["slope_over_planted"].items():
        assert ratio == pytest.approx(1.0, abs=0.03), cell  # logdet slope 2 (H - 1): the deficit


def test_full_rank_rrr_is_a_control_that_reads_nothing():
    result = read_rrr_path(10, 5, 4, 4, t_values=np.geomspace(0.3, 0.003, 12), seed=0)
    assert result["planted"] == 0 and result["controls_read"] == 0
    assert result["summary"].startswith("not measurable")


def test_shuffled_t_is_a_control_that_reads_nothing():
    from gaugeopt.experiments.rrr import rrr_singular_path

    t, readings = rrr_singular_path(10, 5, 3, 1, t_values=np.geomspace(0.3, 0.003, 12), seed=1)
    shuffled = np.random.default_rng(0).permutation(t)
    assert rate_readout(shuffled, readings).readable_cells == 0
    assert rate_readout(t, readings).readable_cells == 6


def test_a_levelling_off_series_is_not_measurable():
    t = np.geomspace(1e-3, 1, 20)
    level = read_cell(t, t**2 + 1e-2)  # decays, then sits at 1e-2: the endpoint is not singular
    assert not level.measurable and not level.reads and level.reason.startswith("not measurable")
    steep = read_cell(t, t**2)
    # the smaller-t half holds the 10 smallest t, 9 log-steps of 3/19 decades: a fall of 2 x 27/19 decades
    assert steep.reads and steep.decay_decades == pytest.approx(2 * 27 / 19)


def test_the_window_rank_follows_the_same_eigenvalue_when_the_rank_flickers():
    """An eigenvalue hovering at the rel_tol threshold made lambda+_min jump between two eigenvalues."""
    from gaugeopt.dds.reading import DDSReading
    from gaugeopt.dds.observables import observables_from_eigenvalues

    t = np.geomspace(1e-2, 1, 12)
    readings = []
    for i, value in enumerate(t):
        hover = 1e-10 * (1.5 if i % 2 else 0.5)  # above, then below rel_tol = 1e-10
        eigenvalues = torch.tensor(sorted([hover, 1e-3 * value**2, 1.0]), dtype=torch.float64)
        row = observables_from_eigenvalues("s", eigenvalues, eigenvalues, samples=10, width=3)
        readings.append(DDSReading(rows=(row,), skipped={}, spectra={"s": {"A": eigenvalues, "G": eigenvalues}}))
    # rank+ flickers 2/3: lambda+_min alternates between the hovering eigenvalue and the decaying one
    assert {r.rows[0].rank_A for r in readings} == {2, 3}
    readout = rate_readout(t, readings, observables=["lambda_min_A"])
    cell = readout.cells[0]
    assert cell.rank == 3 and not cell.reads  # follows the hovering eigenvalue throughout: flat
    # without the spectra (rows only) the same series jumps by 7 orders of magnitude between points
    rows_only = [DDSReading(rows=r.rows, skipped={}) for r in readings]
    jumpy = rate_readout(t, rows_only, observables=["lambda_min_A"]).cells[0]
    assert jumpy.fit.r2 < 0.5


def test_excluded_cells_are_listed_not_counted():
    t = np.geomspace(0.3, 0.003, 12)
    from gaugeopt.experiments.rrr import rrr_singular_path

    t, readings = rrr_singular_path(10, 5, 3, 1, t_values=t, seed=2)
    readout = rate_readout(t, readings, exclude={"A:output:lambda_min_A": "a duplicate", "B:output": "probe artefact"})
    assert readout.total_cells == 3 and len(readout.excluded) == 5
    assert {e["reason"] for e in readout.excluded} == {"a duplicate", "probe artefact"}


def test_rrr_checkpoint_is_a_least_squares_minimum():
    model, x, y = rrr_checkpoint(10, 5, 3, 2, samples=200, noise=1.0, seed=0)
    loss = half_squared_error(model(x), y).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert max(float(g.abs().max()) for g in grads) < 1e-10
    torch.testing.assert_close(model.A.weight @ model.A.weight.T, model.B.weight.T @ model.B.weight)


def test_a_gradient_descent_rrr_trajectory_is_a_known_answer_on_its_true_t():
    # the noise-free approach of readout-clock: H - 1 = 2 excess units die together as (1 + 2 lr s)^(-1/2)
    from gaugeopt.experiments.common import score_against_planted
    from gaugeopt.experiments.rrr import rrr_gd_trajectory, rrr_planted_cells

    run = rrr_gd_trajectory(10, 5, 3, 1, steps=3000, lr=0.05, noise=1.0, checkpoints=30, seed=0)
    s = np.asarray(run.steps, dtype=float)
    np.testing.assert_allclose(run.t, (1 + 2 * 0.05 * s) ** -0.5, rtol=0.05)
    score = score_against_planted(rate_readout(run.t, run.readings, window=(run.t.min(), 0.6)),
                                  rrr_planted_cells(3, 1, 5))
    assert score["planted_read"] == score["planted"] == 6 and score["controls_read"] == 0
    assert all(ratio == pytest.approx(1.0, abs=0.05) for ratio in score["slope_over_planted"].values())
    assert score["proportionality"] < 0.05
    # the remaining arc length ends at 0 on the last recording, where the true t does not
    assert run.arc_length[-1] == 0.0 and run.t[-1] > 0.05
    assert list(run.clock("inverse-step")) == list(s[-1] / s)
