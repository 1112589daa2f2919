"""The statistics behind the verdicts: Student-t against scipy, paired intervals, verdict rules."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gaugeopt.experiments.statistics import (
    MIN_SEEDS,
    band_verdict,
    interval_verdict,
    mean_interval,
    paired_difference,
    student_t_cdf,
    student_t_quantile,
)

scipy_stats = pytest.importorskip("scipy.stats")


@settings(max_examples=200, deadline=None)
@given(st.floats(-30, 30), st.floats(0.5, 60))
def test_student_t_cdf_matches_scipy(value, df):
    # scipy's own t.cdf is off by ~1.5e-9 near 0 (t.cdf(1e-8, 1) = 0.5 + 4.7e-9, exactly 0.5 + 3.2e-9)
    assert student_t_cdf(value, df) == pytest.approx(scipy_stats.t.cdf(value, df), abs=1e-8)


@pytest.mark.parametrize("value", [1e-8, -1e-8, 1e-300, 0.0, 0.3, -2.0, 40.0])
def test_student_t_cdf_closed_forms_for_one_and_two_degrees_of_freedom(value):
    assert student_t_cdf(value, 1.0) == pytest.approx(0.5 + math.atan(value) / math.pi, rel=1e-13, abs=1e-16)
    assert student_t_cdf(value, 2.0) == pytest.approx(0.5 + value / (2 * math.sqrt(2 + value * value)),
                                                      rel=1e-13, abs=1e-16)


@pytest.mark.parametrize("df", [1, 2, 4, 10, 30])
@pytest.mark.parametrize("p", [0.025, 0.5, 0.9, 0.975, 0.995])
def test_student_t_quantile_matches_scipy(p, df):
    assert student_t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), abs=1e-8)


def test_paired_interval_is_the_t_interval_of_the_differences():
    ours, baseline = {0: 1.0, 1: 1.5, 2: 0.7, 3: 1.1}, {0: 2.0, 1: 2.1, 2: 1.9, 3: 2.4, 9: 5.0}
    interval = paired_difference(ours, baseline)
    differences = [-1.0, -0.6, -1.2, -1.3]
    low, high = scipy_stats.t.interval(0.95, 3, loc=sum(differences) / 4, scale=scipy_stats.sem(differences))
    assert interval.n == 4 and interval.seeds == ("0", "1", "2", "3")  # seed 9 has no pair
    assert interval.mean == pytest.approx(-1.025) and (interval.low, interval.high) == pytest.approx((low, high))


def test_verdicts_need_three_seeds_and_an_interval_on_the_paper_side():
    two = mean_interval([-1.0, -1.1])
    assert interval_verdict(two, direction="below").reproduced is None  # too few seeds
    assert interval_verdict(two, direction="below").label == "not decided"
    clear = mean_interval([-1.0, -1.1, -0.9])
    assert interval_verdict(clear, direction="below").reproduced is True
    assert interval_verdict(clear, direction="above").reproduced is False
    straddles = mean_interval([-1.0, 0.5, -0.2])
    verdict = interval_verdict(straddles, direction="below")
    assert verdict.reproduced is False and "contains 0" in verdict.reason
    assert band_verdict(mean_interval([1.01, 0.99, 1.0]), low=0.9, high=1.1).reproduced is True
    assert band_verdict(mean_interval([1.3, 0.8, 1.0]), low=0.9, high=1.1).reproduced is False
    assert MIN_SEEDS == 3


def test_one_value_has_no_interval_and_non_finite_values_are_dropped():
    single = mean_interval({"0": 2.0, "1": math.nan, "2": None})
    assert single.n == 1 and single.low is None and "no interval" in single.describe()
    with pytest.raises(ValueError, match="direction"):
        interval_verdict(single, direction="up")
