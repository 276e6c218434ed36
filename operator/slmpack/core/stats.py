"""Repeated measurements: mean, spread and confidence interval, when to stop, and whether a gain is real (pure).

One mechanism serves every level of the profile. Inside a probe the samples are the
throughputs of consecutive windows of completed requests (batch means); across the runs
of a replication candidate the samples are the runs' throughputs. Either way, sampling
stops once the Student-t confidence interval of the mean is within the relative
precision asked for (and at least `min_samples` were taken), or at `max_samples`.

Whether k replicas beat one is Welch's one-sided t-test of their runs at the
configured confidence: the decision to pack is taken only when chance is an unlikely
explanation of the gain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Precision:
    """When a mean is known well enough: the one stopping rule of probes and repeats."""

    confidence_percent: int = 95
    relative_half_width_percent: int = 5  # the interval's half width, as a share of the mean
    min_samples: int = 3
    max_samples: int = 10

    def __post_init__(self) -> None:
        if not 50 <= self.confidence_percent < 100:
            raise ValueError(f"confidence must be in [50, 100) percent, got {self.confidence_percent}")
        if not 1 <= self.min_samples <= self.max_samples:
            raise ValueError(f"need 1 <= min samples ({self.min_samples}) <= max samples ({self.max_samples})")


@dataclass(frozen=True)
class Estimate:
    """The mean of samples with its spread and a two-sided Student-t confidence interval."""

    samples: int
    mean: float
    stdev: float | None  # None with one sample
    ci_low: float | None
    ci_high: float | None
    confidence_percent: int

    @property
    def relative_half_width(self) -> float:
        """Half the interval over the mean; infinite while the interval is unknown."""
        if self.ci_low is None or self.ci_high is None or self.mean == 0:
            return math.inf
        return (self.ci_high - self.ci_low) / 2 / abs(self.mean)


def estimate(samples: Sequence[float], confidence_percent: int = 95) -> Estimate:
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("no samples to estimate from")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(n, mean, None, None, None, confidence_percent)
    stdev = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence_percent / 200, n - 1)) * stdev / math.sqrt(n)
    return Estimate(n, mean, stdev, mean - half, mean + half, confidence_percent)


def precise_enough(samples: Sequence[float], precision: Precision) -> bool:
    """True when sampling may stop: the interval is narrow enough, or the sample budget is spent."""
    if len(samples) >= precision.max_samples:
        return True
    if len(samples) < max(precision.min_samples, 2):
        return False
    found = estimate(samples, precision.confidence_percent)
    return found.relative_half_width <= precision.relative_half_width_percent / 100


@dataclass(frozen=True)
class GainTest:
    """Is the candidate's mean larger than the baseline's? Welch's one-sided t-test."""

    ratio: float  # candidate mean over baseline mean
    # One-sided bounds of the ratio at the test's confidence (baseline mean held fixed): the gain is
    # significant exactly when ratio_low > 1, so the figures shown agree with the decision.
    ratio_low: float | None
    ratio_high: float | None
    p_value: float | None
    confidence_percent: int
    significant: bool

    def describe(self) -> str:
        interval = (f" ({self.confidence_percent}% one-sided bounds {self.ratio_low:.2f}-{self.ratio_high:.2f})"
                    if self.ratio_low is not None else "")
        p = f", p={self.p_value:.3g}" if self.p_value is not None else ""
        return f"{self.ratio:.2f}x{interval}{p}"


def gain_test(candidate: Sequence[float], baseline: Sequence[float], confidence_percent: int = 95) -> GainTest:
    if not candidate or not baseline:
        raise ValueError("a gain needs runs of both the candidate and the baseline")
    mean_c, mean_b = math.fsum(candidate) / len(candidate), math.fsum(baseline) / len(baseline)
    ratio = mean_c / mean_b if mean_b else math.inf
    if len(candidate) < 2 or len(baseline) < 2:
        return GainTest(ratio, None, None, None, confidence_percent, significant=False)
    result = stats.ttest_ind(candidate, baseline, equal_var=False, alternative="greater")
    p = float(result.pvalue)
    if math.isnan(p):  # no spread at all: the runs are identical or constant
        p = 0.0 if mean_c > mean_b else 1.0
    # Each end of the two-sided interval at 1 - 2(1 - confidence) is a one-sided bound at the confidence.
    two_sided = stats.ttest_ind(candidate, baseline, equal_var=False).confidence_interval(
        1 - 2 * (1 - confidence_percent / 100))
    low, high = (float(v) for v in (two_sided.low, two_sided.high))
    ratio_low = 1 + low / mean_b if mean_b and not math.isnan(low) else None
    ratio_high = 1 + high / mean_b if mean_b and not math.isnan(high) else None
    return GainTest(ratio, ratio_low, ratio_high, p, confidence_percent,
                    significant=p < 1 - confidence_percent / 100 and mean_c > mean_b)
