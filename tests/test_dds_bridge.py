"""Known answers on the deep-linear bridge (dds.md §4), float64."""

import pytest

from gaugeopt.experiments.bridge import constructed_bridge, noisy_bridge_sgd
from gaugeopt.experiments.statistics import spearman_rho

DEPTH = 4


@pytest.fixture(scope="module")
def bridge():
    return constructed_bridge(depth=DEPTH, width=6, dead_counts=(1, 2, 3, 4), samples=128, seed=0)


def test_lambda_min_G_slope_is_twice_the_remaining_depth(bridge):
    for run in bridge["runs"]:
        for layer in run["layers"]:
            slope = layer["fits"]["lambda_min_G"]["slope"]
            assert slope == pytest.approx(2 * (DEPTH - layer["layer"]), rel=0.10), (run["dead"], layer["layer"])
            # the forward (activation) factor decays as t^(2l)
            assert layer["fits"]["lambda_min_A"]["slope"] == pytest.approx(2 * layer["layer"], rel=0.10)
            assert layer["fits"]["lambda_min_G"]["r2"] > 0.99


def test_logdet_counts_dead_directions_and_lambda_min_is_rank_blind(bridge):
    ratios = {(entry["dead"], entry["layer"]): entry for entry in bridge["ratios"]}
    for dead in (2, 3, 4):
        for layer in range(1, DEPTH):
            entry = ratios[(dead, layer)]
            assert entry["logdet_G_ratio"] == pytest.approx(dead, rel=0.10)
            assert entry["lambda_min_G_ratio"] == pytest.approx(1.0, rel=0.10)


def test_results_are_json_ready(bridge):
    import json

    text = json.dumps(bridge)
    assert '"benchmark": "constructed_bridge"' in text


def test_spearman_rho_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = [3.0, 1.0, 2.0, 2.0, 5.0, 4.0]
    y = [1.0, 0.5, 0.7, 0.9, 3.0, 2.0]
    assert spearman_rho(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert spearman_rho([1.0, 1.0], [1.0, 2.0]) != spearman_rho([1.0, 1.0], [1.0, 2.0])  # NaN


@pytest.mark.slow
def test_sgd_noisy_bridge_ratios():
    result = noisy_bridge_sgd(dead_counts=(1, 2, 3, 4), steps=20000, seed=0)
    for entry in result["ratios"]:
        assert entry["logdet_G_ratio"] == pytest.approx(entry["dead"], rel=0.15)
        assert entry["lambda_min_G_ratio"] == pytest.approx(1.0, rel=0.15)
