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


# -- correlations, exact tests for binary outcomes, survival, direction and size ------------------

from gaugeopt.experiments.statistics import (  # noqa: E402
    binomial_tail,
    correlation_interval,
    correlation_verdict,
    direction_and_size_verdict,
    exact_test_verdict,
    mcnemar_exact,
    paired_ratio,
    survival_curve,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=1, max_size=8), st.integers(3, 20))
def test_a_correlation_interval_never_leaves_minus_one_to_one(values, points):
    interval = correlation_interval(values, points=points)
    for bound in (interval.mean, interval.low, interval.high):
        assert bound is None or -1.0 <= bound <= 1.0


def test_correlation_interval_is_the_t_interval_of_fisher_z_mapped_back():
    rho = [0.5, 0.6, 0.8]
    z = [math.atanh(r) for r in rho]
    low, high = scipy_stats.t.interval(0.95, 2, loc=sum(z) / 3, scale=scipy_stats.sem(z))
    interval = correlation_interval(rho, points=6)
    assert interval.mean == pytest.approx(math.tanh(sum(z) / 3))
    assert (interval.low, interval.high) == pytest.approx((math.tanh(low), math.tanh(high)))
    assert interval.values == tuple(rho)


def test_a_perfect_ordering_enters_halfway_to_the_next_attainable_rho():
    # Spearman on 4 distinct points: the values below 1 are 1 - 12 k / 60; the next one is 0.8
    interval = correlation_interval([1.0, 1.0, 1.0], points=4)
    assert interval.mean == pytest.approx(0.9) and interval.low == pytest.approx(0.9)
    # the plain t-interval of [1, 1, 0.9] leaves [-1, 1]; the z interval does not
    assert mean_interval([1.0, 1.0, 0.9]).high > 1.0
    assert correlation_interval([1.0, 1.0, 0.9], points=14).high < 1.0
    with pytest.raises(ValueError, match="at least 3 pairs"):
        correlation_interval([0.5], points=2)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        correlation_interval([1.5, 0.2], points=5)


def test_correlation_verdict_reads_either_sign():
    assert correlation_verdict(correlation_interval([-0.97, -0.95, -0.99], points=14), threshold=0.8).reproduced
    assert correlation_verdict(correlation_interval([0.97, 0.95, 0.99], points=14), threshold=0.8).reproduced
    assert correlation_verdict(correlation_interval([0.9, 0.2, 0.99], points=14), threshold=0.8).reproduced is False


@pytest.mark.parametrize("successes, trials", [(0, 0), (3, 3), (10, 10), (7, 12), (2, 9), (0, 5)])
def test_binomial_tail_matches_scipy(successes, trials):
    expected = 1.0 if trials == 0 else scipy_stats.binomtest(successes, trials, 0.5, alternative="greater").pvalue
    assert binomial_tail(successes, trials) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_counts_discordant_seeds_and_gives_the_exact_one_sided_p():
    # the paper's grokking figure: 10/11 seeds with DDCMuon, 0/11 with Muon
    ours = {s: s != 3 for s in range(11)}
    base = {s: False for s in range(11)}
    test = mcnemar_exact(ours, base)
    assert (test.ours, test.baseline, test.ours_only, test.baseline_only) == (10, 0, 10, 0)
    assert test.p_value == pytest.approx(2.0**-10)
    assert exact_test_verdict(test).reproduced is True
    # concordant seeds carry no information: 3 both, 1 ours only, 1 baseline only
    mixed = mcnemar_exact({0: 1, 1: 1, 2: 1, 3: 1, 4: 0}, {0: 1, 1: 1, 2: 1, 3: 0, 4: 1})
    assert (mixed.ours_only, mixed.baseline_only) == (1, 1) and mixed.p_value == pytest.approx(0.75)
    assert exact_test_verdict(mixed).reproduced is False


def test_three_seeds_cannot_decide_an_exact_test():
    best = mcnemar_exact({0: True, 1: True, 2: True}, {0: False, 1: False, 2: False})
    assert best.p_value == pytest.approx(1 / 8)
    verdict = exact_test_verdict(best)
    assert verdict.reproduced is None and "at least 5 seeds" in verdict.reason
    five = mcnemar_exact(dict.fromkeys(range(5), True), dict.fromkeys(range(5), False))
    assert five.p_value == pytest.approx(1 / 32) and exact_test_verdict(five).reproduced is True


def test_survival_curve_counts_runs_left_and_censors_at_the_budget():
    curve = survival_curve({0: 300, 1: None, 2: 100, 3: 300, 4: None}, budget=1000)
    assert curve.steps == (100, 300) and curve.surviving == pytest.approx((0.8, 0.4))
    assert (curve.events, curve.runs, curve.median) == (3, 5, 300)
    xs, ys = curve.stairs()
    assert xs == [0, 100, 100, 300, 300, 1000] and ys == pytest.approx([1, 1, 0.8, 0.8, 0.4, 0.4])
    assert survival_curve([None, None], budget=10).median is None
    with pytest.raises(ValueError, match="budget"):
        survival_curve([20], budget=10)


def test_a_size_criterion_turns_a_right_direction_into_direction_only():
    ours, base = {0: 4.2, 1: 4.4, 2: 4.3}, {0: 4.7, 1: 4.8, 2: 4.75}  # the gap 4.32 vs 4.75 of an earlier run
    verdict = direction_and_size_verdict(paired_difference(ours, base), paired_ratio(ours, base),
                                         direction="below", max_ratio=0.5)
    assert verdict.reproduced is False and verdict.label == "direction only" and "size criterion" in verdict.reason
    small = {0: 0.6, 1: 0.7, 2: 0.65}  # the paper's size: 0.67 vs 5.88
    big = {0: 5.8, 1: 5.9, 2: 6.0}
    assert direction_and_size_verdict(paired_difference(small, big), paired_ratio(small, big),
                                      direction="below", max_ratio=0.5).label == "reproduced"
    wrong = direction_and_size_verdict(paired_difference(big, small), paired_ratio(big, small),
                                       direction="below", max_ratio=0.5)
    assert wrong.label == "not reproduced"
