"""Confidence intervals, the stopping rule shared by probes and repeats, and the significance of a gain."""

import math
import random

import numpy as np
import pytest
from scipy import stats

from slmpack.core.stats import Precision, estimate, fieller_bounds, gain_test, holm, precise_enough, stop_reason


def test_the_interval_is_students_t_and_holds_the_true_mean_about_as_often_as_promised():
    rng = np.random.default_rng(7)
    trials, covered = 2000, 0
    for _ in range(trials):
        found = estimate(rng.normal(100, 10, size=4), confidence_percent=90)
        covered += found.ci_low <= 100 <= found.ci_high
    assert 0.87 < covered / trials < 0.93


def test_an_estimate_of_known_samples():
    found = estimate([10, 12, 14], confidence_percent=95)
    assert (found.samples, found.mean, found.stdev) == (3, 12, 2)
    # t(0.975, 2) = 4.303: half width 4.303 * 2 / sqrt(3)
    assert found.ci_high - 12 == pytest.approx(4.303 * 2 / math.sqrt(3), rel=1e-3)


def test_one_sample_has_no_interval_and_never_counts_as_precise():
    found = estimate([5.0])
    assert found.stdev is None and found.ci_low is None and found.relative_half_width == math.inf
    assert not precise_enough([5.0], Precision(min_samples=1, max_samples=10))


@pytest.mark.parametrize("samples, expected", [
    ([100, 101], False),  # fewer than min_samples
    ([100, 101, 99], True),  # ±2.5 % at 95 %
    ([100, 130, 70], False),  # wide spread: keep sampling
    ([100, 130, 70, 100, 130], True),  # the sample budget is spent
])
def test_sampling_stops_when_precise_or_when_the_budget_is_spent(samples, expected):
    assert precise_enough(samples, Precision(95, 5, min_samples=3, max_samples=5)) is expected


@pytest.mark.parametrize("samples, bar, expected", [
    ([100, 101], 50, None),  # fewer than min_samples, however far from the bar
    ([100, 120, 80], 50, "verdict"),  # ±20 %, too wide for 5 %, but wholly above 50
    ([100, 120, 80], 200, "verdict"),  # wholly below
    ([100, 120, 80], 100, None),  # the bar inside the interval: the side is not known yet
    ([100, 120, 80], None, None),  # no bar: only the precision counts
    ([100, 101, 99], 100, "precision"),  # narrow enough says so first
    ([100, 130, 70, 100, 130], 100, "samples"),
])
def test_a_sample_may_stop_once_its_interval_lies_wholly_on_one_side_of_a_bar(samples, bar, expected):
    assert stop_reason(samples, Precision(95, 5, min_samples=3, max_samples=5), bar) == expected


def test_a_precision_that_cannot_be_met_is_refused():
    with pytest.raises(ValueError, match="min samples"):
        Precision(min_samples=6, max_samples=5)
    with pytest.raises(ValueError, match="confidence"):
        Precision(confidence_percent=100)


def test_a_clear_gain_is_significant_and_its_ratio_interval_excludes_one():
    test = gain_test([760, 765, 758], [474, 470, 478], alpha=0.05)
    assert test.significant and test.p_value < 0.001
    assert test.ratio == pytest.approx(1.61, abs=0.01)
    assert 1 < test.ratio_low < test.ratio < test.ratio_high
    assert test.describe().startswith("1.61x (95% one-sided bounds")


def test_a_gain_inside_the_noise_is_not_significant():
    test = gain_test([520, 430, 490], [474, 470, 478])
    assert test.ratio > 1 and not test.significant
    assert test.ratio_low < 1


def test_the_bounds_shown_agree_with_the_decision():
    # Borderline gains, where a two-sided interval at the test's confidence would contain 1 for a
    # gain the one-sided test calls significant.
    rng = random.Random(7)
    seen = set()
    for _ in range(300):
        candidate = [rng.gauss(104, 5) for _ in range(5)]
        baseline = [rng.gauss(100, 5) for _ in range(5)]
        test = gain_test(candidate, baseline, alpha=rng.choice([0.05, 0.025, 0.0167]))
        assert test.significant == (test.ratio_low > 1), test.describe()
        seen.add(test.significant)
    assert seen == {True, False}


def test_a_loss_is_never_a_significant_gain():
    assert not gain_test([300, 301, 299], [474, 470, 478]).significant


def test_single_runs_cannot_show_significance():
    test = gain_test([800], [400])
    assert test.ratio == 2 and not test.significant and test.p_value is None


@pytest.mark.parametrize("cv", [0.03, 0.10])
def test_fiellers_bounds_cover_the_true_ratio_as_often_as_they_claim(cv):
    # Dividing the difference's interval by the baseline mean ignores the baseline's own error; Fieller's
    # interval does not. Each one-sided bound at 5% must miss the true ratio in about 5% of draws. At a true
    # ratio of 2 the naive bounds miss in 6.9 % (upper) and 7.9 % (lower) of these draws, Fieller's in 4 %.
    rng = random.Random(11)
    true_ratio, draws, low_misses, high_misses = 2.0, 2000, 0, 0
    for _ in range(draws):
        baseline = [rng.gauss(100, 100 * cv) for _ in range(3)]
        candidate = [rng.gauss(100 * true_ratio, 100 * true_ratio * cv) for _ in range(3)]
        low, high = fieller_bounds(candidate, baseline, alpha=0.05)
        low_misses += low > true_ratio
        high_misses += high is not None and high < true_ratio
    # Binomial standard error at 5% of 2000 draws is 0.49%; Welch's degrees of freedom make it a little
    # conservative.
    assert 0.03 <= low_misses / draws <= 0.06
    assert 0.03 <= high_misses / draws <= 0.06


def test_fieller_reaches_higher_than_the_difference_over_the_baseline_mean():
    # The review's case, CV 10 % with n = 3: the naive upper bound 1.283 against Fieller's 1.311.
    candidate, baseline = [120, 132, 108], [100, 110, 90]
    low, high = fieller_bounds(candidate, baseline, alpha=0.05)
    difference = stats.ttest_ind(candidate, baseline, equal_var=False).confidence_interval(0.90)
    naive_high = 1 + difference.high / 100
    assert low < 1.2 < naive_high < high


def test_holm_steps_down_from_the_smallest_p_value():
    steps = holm({2: 0.04, 3: 0.01, 4: 0.03})
    # Sorted 0.01, 0.03, 0.04 against 0.05/3, 0.05/2, 0.05/1: 3 is rejected, 4 is not (0.03 > 0.025), so the
    # procedure stops and 2 is not either, although 0.04 < 0.05 alone: the adjusted p-values are monotone.
    assert {k: round(s.p_adjusted, 3) for k, s in steps.items()} == {3: 0.03, 4: 0.06, 2: 0.06}
    assert {k: s.divisor for k, s in steps.items()} == {3: 3, 4: 2, 2: 1}
    assert [k for k, s in steps.items() if s.p_adjusted < 0.05] == [3]
