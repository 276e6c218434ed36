"""Confidence intervals, the stopping rule shared by probes and repeats, and the significance of a gain."""

import math
import random

import numpy as np
import pytest

from slmpack.core.stats import Precision, estimate, gain_test, precise_enough


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


def test_a_precision_that_cannot_be_met_is_refused():
    with pytest.raises(ValueError, match="min samples"):
        Precision(min_samples=6, max_samples=5)
    with pytest.raises(ValueError, match="confidence"):
        Precision(confidence_percent=100)


def test_a_clear_gain_is_significant_and_its_ratio_interval_excludes_one():
    test = gain_test([760, 765, 758], [474, 470, 478], confidence_percent=95)
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
        test = gain_test(candidate, baseline, confidence_percent=95)
        assert test.significant == (test.ratio_low > 1), test.describe()
        seen.add(test.significant)
    assert seen == {True, False}


def test_a_loss_is_never_a_significant_gain():
    assert not gain_test([300, 301, 299], [474, 470, 478]).significant


def test_single_runs_cannot_show_significance():
    test = gain_test([800], [400])
    assert test.ratio == 2 and not test.significant and test.p_value is None
