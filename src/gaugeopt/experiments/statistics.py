"""Statistics behind the verdicts: rank correlation, Student-t intervals, paired comparisons by seed.

A claim that compares two arms is read from *paired* differences: for every seed s both arms start
from the same weights and see the same batches, and ``d_s = ours_s - baseline_s``. With n seeds,
mean ``d_bar`` and sample standard deviation ``s_d``, the 95 % interval is

    d_bar +- t_{0.975, n-1} * s_d / sqrt(n)

(Student's t with n - 1 degrees of freedom). A claim is *reproduced* only when n >= ``MIN_SEEDS``
and the interval lies entirely on the paper's side of zero; with fewer seeds it is *not decided*.
A one-sample claim (a ratio that should equal a target) uses the same interval around the mean of
the per-seed values. A correlation is averaged on Fisher's z scale (``z = atanh(rho)``) and its
interval mapped back through ``tanh``, so it never leaves [-1, 1] (:func:`correlation_interval`).

Binary outcomes per seed (a seed groks or it does not) are compared by McNemar's exact test on the
discordant seeds (:func:`mcnemar_exact`), and times to an event with a budget (steps to grok) by
their survival curve with the runs that never get there censored at the budget
(:func:`survival_curve`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_SEEDS = 3
CONFIDENCE = 0.95


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if either side is constant."""
    def ranks(values: np.ndarray) -> np.ndarray:
        order = np.argsort(values, kind="mergesort")
        ranked = np.empty(values.size, dtype=np.float64)
        ranked[order] = np.arange(values.size, dtype=np.float64)
        for value in np.unique(values):  # average the ranks of ties
            tied = values == value
            ranked[tied] = ranked[tied].mean()
        return ranked

    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError("spearman_rho needs two 1-D sequences of equal length >= 2")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    ra, rb = ranks(a) - ranks(a).mean(), ranks(b) - ranks(b).mean()
    denominator = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else math.nan


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)`` for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"need a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def student_t_cdf(value: float, df: float) -> float:
    """``P(T <= value)`` for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    square = value * value
    if square < df:  # near 0: P(|T| < |value|) = I_{v^2 / (df + v^2)}(1/2, df/2), no cancellation
        central = regularized_incomplete_beta(0.5, df / 2, square / (df + square))
        return 0.5 + 0.5 * math.copysign(central, value)
    tail = 0.5 * regularized_incomplete_beta(df / 2, 0.5, df / (df + square))
    return 1.0 - tail if value >= 0 else tail


def student_t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t (bisection on the CDF to 1e-12)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must lie in (0, 1), got {probability}")
    if probability < 0.5:
        return -student_t_quantile(1.0 - probability, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class MeanInterval:
    """Mean of per-seed values with its Student-t interval (None bounds when n < 2)."""

    values: tuple[float, ...]
    seeds: tuple[str, ...]
    mean: float | None
    low: float | None
    high: float | None
    confidence: float

    @property
    def n(self) -> int:
        return len(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n": self.n}

    def describe(self, digits: int = 3) -> str:
        if self.mean is None:
            return "no value"
        if self.low is None:
            return f"{self.mean:.{digits}f} (n = {self.n}, no interval)"
        return (f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] "
                f"({self.confidence:.0%} CI, n = {self.n})")


def mean_interval(values: Mapping[Any, float | None] | Sequence[float | None],
                  confidence: float = CONFIDENCE) -> MeanInterval:
    """Mean and Student-t interval of the finite values (a mapping seed -> value, or a sequence)."""
    items = list(values.items()) if isinstance(values, Mapping) else list(enumerate(values))
    kept = [(str(k), float(v)) for k, v in items if v is not None and math.isfinite(float(v))]
    if not kept:
        return MeanInterval((), (), None, None, None, confidence)
    data = np.array([v for _, v in kept])
    mean = float(data.mean())
    if data.size < 2:
        return MeanInterval(tuple(data.tolist()), tuple(k for k, _ in kept), mean, None, None, confidence)
    half = student_t_quantile(0.5 + confidence / 2, data.size - 1) * float(data.std(ddof=1)) / math.sqrt(data.size)
    return MeanInterval(tuple(data.tolist()), tuple(k for k, _ in kept), mean, mean - half, mean + half,
                        confidence)


def paired_difference(ours: Mapping[Any, float | None], baseline: Mapping[Any, float | None],
                      confidence: float = CONFIDENCE) -> MeanInterval:
    """Mean and interval of ``ours[s] - baseline[s]`` over the seeds both arms have a value for."""
    seeds = [s for s in ours if s in baseline and ours[s] is not None and baseline[s] is not None]
    return mean_interval({s: float(ours[s]) - float(baseline[s]) for s in seeds}, confidence)


@dataclass(frozen=True)
class Verdict:
    """``reproduced`` (True / False / None = not decided) and the words the report shows."""

    reproduced: bool | None
    label: str
    reason: str


def interval_verdict(interval: MeanInterval, *, direction: str, threshold: float = 0.0,
                     min_seeds: int = MIN_SEEDS) -> Verdict:
    """Reproduced iff at least ``min_seeds`` values and the interval lies entirely on the paper's side.

    ``direction`` is ``"above"`` (the paper says the quantity exceeds ``threshold``) or ``"below"``.
    """
    if direction not in ("above", "below"):
        raise ValueError(f"direction must be 'above' or 'below', got {direction!r}")
    if interval.n < min_seeds:
        return Verdict(None, "not decided", f"{interval.n} seed(s); a verdict needs {min_seeds}")
    side = "above" if direction == "above" else "below"
    inside = interval.low > threshold if direction == "above" else interval.high < threshold
    if inside:
        return Verdict(True, "reproduced", f"the {interval.confidence:.0%} interval lies {side} {threshold:g}")
    opposite = interval.high < threshold if direction == "above" else interval.low > threshold
    return Verdict(False, "not reproduced",
                   f"the {interval.confidence:.0%} interval lies on the other side of {threshold:g}" if opposite
                   else f"the {interval.confidence:.0%} interval contains {threshold:g}")


def band_verdict(interval: MeanInterval, *, low: float, high: float, min_seeds: int = MIN_SEEDS) -> Verdict:
    """Reproduced iff at least ``min_seeds`` values and the interval lies inside ``[low, high]``."""
    if interval.n < min_seeds:
        return Verdict(None, "not decided", f"{interval.n} seed(s); a verdict needs {min_seeds}")
    if low <= interval.low and interval.high <= high:
        return Verdict(True, "reproduced", f"the {interval.confidence:.0%} interval lies in [{low:g}, {high:g}]")
    return Verdict(False, "not reproduced", f"the {interval.confidence:.0%} interval leaves [{low:g}, {high:g}]")


def paired_ratio(ours: Mapping[Any, float | None], baseline: Mapping[Any, float | None],
                 confidence: float = CONFIDENCE) -> MeanInterval:
    """Mean and interval of ``ours[s] / baseline[s]`` over the seeds both arms have a non-zero value for."""
    seeds = [s for s in ours if s in baseline and ours[s] is not None and baseline[s] not in (None, 0)]
    return mean_interval({s: float(ours[s]) / float(baseline[s]) for s in seeds}, confidence)


def direction_and_size_verdict(difference: MeanInterval, ratio: MeanInterval, *, direction: str,
                               max_ratio: float, min_seeds: int = MIN_SEEDS) -> Verdict:
    """A claim with a direction and a size, both fixed before the run.

    *Direction*: the interval of the paired difference lies on the paper's side of 0
    (:func:`interval_verdict`). *Size*: the interval of the per-seed ratio ours / baseline lies at or
    below ``max_ratio``. "reproduced" needs both; a difference on the right side whose size does not
    hold is "direction only" (``reproduced`` False); otherwise the direction verdict stands.
    """
    side = interval_verdict(difference, direction=direction, min_seeds=min_seeds)
    if side.reproduced is not True:
        return side
    if ratio.n >= min_seeds and ratio.high is not None and ratio.high <= max_ratio:
        return Verdict(True, "reproduced", f"{side.reason}, and the {ratio.confidence:.0%} interval of the ratio "
                                           f"lies at or below {max_ratio:g}")
    size = ("has no interval" if ratio.high is None else
            f"reaches {ratio.high:.3g} > {max_ratio:g}")
    return Verdict(False, "direction only", f"{side.reason}, but the {ratio.confidence:.0%} interval of the "
                                            f"ratio {size} (the size criterion)")


def correlation_interval(values: Mapping[Any, float | None] | Sequence[float | None], *, points: int,
                         confidence: float = CONFIDENCE) -> MeanInterval:
    """Mean and interval of per-seed correlations on Fisher's z scale, inside [-1, 1].

    Each seed's ``rho_s`` (computed from ``points`` pairs) becomes ``z_s = atanh(rho_s)``; the
    Student-t interval of the mean z (:func:`mean_interval`) is mapped back through ``tanh``, and so
    is the reported centre ``tanh(mean z)``. A perfect ordering (``|rho| = 1``, infinite z) enters
    as the midpoint between 1 and the largest smaller value a Spearman rho of ``points`` distinct
    pairs can take, ``1 - 6 / (points (points^2 - 1))``.
    """
    if points < 3:
        raise ValueError(f"a correlation interval needs correlations of at least 3 pairs, got points={points}")
    bound = 1.0 - 6.0 / (points * (points * points - 1))
    items = list(values.items()) if isinstance(values, Mapping) else list(enumerate(values))
    kept = {key: float(v) for key, v in items if v is not None and math.isfinite(float(v))}
    if any(abs(v) > 1.0 + 1e-12 for v in kept.values()):
        raise ValueError(f"correlations must lie in [-1, 1], got {sorted(kept.values())}")
    z = mean_interval({key: math.atanh(max(-bound, min(bound, v))) for key, v in kept.items()}, confidence)

    def back(value: float | None) -> float | None:
        return None if value is None else math.tanh(value)

    return MeanInterval(tuple(kept.values()), z.seeds, back(z.mean), back(z.low), back(z.high), confidence)


def correlation_verdict(interval: MeanInterval, *, threshold: float, min_seeds: int = MIN_SEEDS) -> Verdict:
    """A correlation claim of either sign: reproduced iff the interval lies beyond ``+threshold`` (when
    the centre is positive) or beyond ``-threshold`` (when it is negative)."""
    if (interval.mean or 0.0) >= 0:
        return interval_verdict(interval, direction="above", threshold=threshold, min_seeds=min_seeds)
    return interval_verdict(interval, direction="below", threshold=-threshold, min_seeds=min_seeds)


def binomial_tail(successes: int, trials: int) -> float:
    """``P(X >= successes)`` for ``X ~ Binomial(trials, 1/2)``, exactly (integer arithmetic)."""
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    return sum(math.comb(trials, k) for k in range(successes, trials + 1)) / 2**trials


@dataclass(frozen=True)
class PairedBinaryTest:
    """McNemar's exact test of a binary outcome paired by seed, one-sided in the paper's direction.

    ``ours_only`` seeds have the outcome under our arm and not under the baseline, ``baseline_only``
    the reverse. Under the null hypothesis each discordant seed falls either way with probability 1/2,
    so ``p_value = P(Binomial(ours_only + baseline_only, 1/2) >= ours_only)``.
    """

    seeds: tuple[str, ...]
    ours: int  # seeds with the outcome under our arm
    baseline: int
    ours_only: int
    baseline_only: int
    p_value: float

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def smallest_attainable_p(self) -> float:
        """The smallest p-value these seeds could give: every seed discordant in our favour."""
        return 0.5 ** self.n

    def describe(self) -> str:
        return (f"{self.ours}/{self.n} vs {self.baseline}/{self.n}; discordant seeds {self.ours_only} (ours only) "
                f"vs {self.baseline_only} (baseline only), exact McNemar p = {self.p_value:.3g} (one-sided)")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n": self.n}


def mcnemar_exact(ours: Mapping[Any, bool | None], baseline: Mapping[Any, bool | None]) -> PairedBinaryTest:
    """McNemar's exact test over the seeds both arms have an outcome for (see :class:`PairedBinaryTest`)."""
    seeds = [s for s in ours if s in baseline and ours[s] is not None and baseline[s] is not None]
    ours_only = sum(bool(ours[s]) and not bool(baseline[s]) for s in seeds)
    baseline_only = sum(bool(baseline[s]) and not bool(ours[s]) for s in seeds)
    return PairedBinaryTest(tuple(str(s) for s in seeds), sum(bool(ours[s]) for s in seeds),
                            sum(bool(baseline[s]) for s in seeds), ours_only, baseline_only,
                            binomial_tail(ours_only, ours_only + baseline_only))


def exact_test_verdict(test: PairedBinaryTest, *, alpha: float = 1 - CONFIDENCE) -> Verdict:
    """Reproduced iff the one-sided exact p-value is at most ``alpha``; not decided when even the best
    possible outcome of this many seeds (all discordant our way, ``2^-n``) could not reach it."""
    if test.smallest_attainable_p > alpha:
        needed = math.ceil(math.log2(1 / alpha))
        return Verdict(None, "not decided", f"{test.n} seed(s) cannot give p <= {alpha:g} even if every seed "
                                            f"favours one arm (2^-{test.n} = {test.smallest_attainable_p:.3g}); "
                                            f"a verdict needs at least {needed} seeds")
    if test.p_value <= alpha:
        return Verdict(True, "reproduced", f"exact McNemar p = {test.p_value:.3g} <= {alpha:g}")
    return Verdict(False, "not reproduced", f"exact McNemar p = {test.p_value:.3g} > {alpha:g}")


@dataclass(frozen=True)
class SurvivalCurve:
    """The fraction of runs that have not had the event by each step, with the budget stated.

    ``steps[i]`` and ``surviving[i]``: after step ``steps[i]`` a fraction ``surviving[i]`` of the runs
    is still without the event. Runs that never had it are censored at ``budget`` (they all ran the
    full budget, so the Kaplan-Meier estimate is the plain fraction).
    """

    steps: tuple[int, ...]
    surviving: tuple[float, ...]
    events: int
    runs: int
    budget: int
    median: int | None  # first step at which at most half the runs are left, None if never

    def stairs(self) -> tuple[list[int], list[float]]:
        """x and y of the step function from step 0 to the budget, for a line plot."""
        xs, ys = [0], [1.0]
        for step, value in zip(self.steps, self.surviving):
            xs += [step, step]
            ys += [ys[-1], value]
        xs.append(self.budget)
        ys.append(ys[-1])
        return xs, ys

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def survival_curve(event_steps: Mapping[Any, int | None] | Sequence[int | None], *, budget: int) -> SurvivalCurve:
    """Survival curve of steps-to-event over runs; ``None`` means no event within ``budget`` steps."""
    times = list(event_steps.values()) if isinstance(event_steps, Mapping) else list(event_steps)
    if budget <= 0 or not times:
        raise ValueError(f"need at least one run and a positive budget, got {len(times)} run(s), budget {budget}")
    if any(t is not None and not 0 <= t <= budget for t in times):
        raise ValueError(f"event steps must lie in [0, budget={budget}], got {times}")
    events = sorted(t for t in times if t is not None)
    steps = sorted(set(events))
    surviving = tuple(1.0 - sum(e <= s for e in events) / len(times) for s in steps)
    median = next((s for s, v in zip(steps, surviving) if v <= 0.5), None)
    return SurvivalCurve(tuple(steps), surviving, len(events), len(times), budget, median)
