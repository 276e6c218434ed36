"""Repeated measurements: mean, spread and confidence interval, when to stop, and whether a gain is real (pure).

One mechanism serves every level of the profile. Inside a probe the samples are the
throughputs of consecutive windows of completed requests (batch means); across the runs
of a replication candidate the samples are the runs' throughputs. Either way, sampling
stops once the Student-t confidence interval of the mean is within the relative
precision asked for (and at least `min_samples` were taken), or at `max_samples`.

Whether k replicas beat one is Welch's one-sided t-test of their runs, with Holm's
correction over the replica counts tried and Fieller's bounds of the ratio: the
decision to pack is taken only when chance is an unlikely explanation of the gain.
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
    return stop_reason(samples, precision) is not None


def stop_reason(samples: Sequence[float], precision: Precision, bar: float | None = None) -> str | None:
    """Why sampling may stop, or None to go on: "samples" (the budget is spent), "precision" (the interval is
    narrow enough) or, given a `bar` the mean is compared with, "verdict": the interval lies wholly above or
    below it, so more samples could not change which side the mean is on."""
    if len(samples) >= precision.max_samples:
        return "samples"
    if len(samples) < max(precision.min_samples, 2):
        return None
    found = estimate(samples, precision.confidence_percent)
    if found.relative_half_width <= precision.relative_half_width_percent / 100:
        return "precision"
    if bar is not None and (found.ci_low > bar or found.ci_high < bar):
        return "verdict"
    return None


@dataclass(frozen=True)
class GainTest:
    """Is the candidate's mean larger than the baseline's? Welch's one-sided t-test at level alpha."""

    ratio: float  # candidate mean over baseline mean
    # Fieller's one-sided bounds of the ratio at the test's level (Welch's degrees of freedom): the gain is
    # significant exactly when ratio_low > 1, so the figures shown agree with the decision.
    ratio_low: float | None
    ratio_high: float | None
    p_value: float | None
    alpha: float
    significant: bool

    @property
    def confidence_percent(self) -> float:
        return round(100 * (1 - self.alpha), 2)

    def describe(self) -> str:
        high = f"{self.ratio_high:.2f}" if self.ratio_high is not None else "inf"
        interval = (f" ({self.confidence_percent:g}% one-sided bounds {self.ratio_low:.2f}-{high})"
                    if self.ratio_low is not None else "")
        p = f", p={self.p_value:.3g}" if self.p_value is not None else ""
        return f"{self.ratio:.2f}x{interval}{p}"


def variance(values: Sequence[float]) -> float:
    """The sample variance (n - 1 in the denominator)."""
    mean = math.fsum(values) / len(values)
    return math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)


def welch_df(candidate: Sequence[float], baseline: Sequence[float]) -> float:
    """Welch-Satterthwaite degrees of freedom of the difference of two means."""
    vc, vb = (variance(x) / len(x) for x in (candidate, baseline))
    if vc + vb == 0:
        return math.inf
    return (vc + vb) ** 2 / (vc ** 2 / (len(candidate) - 1) + vb ** 2 / (len(baseline) - 1))


def fieller_bounds(candidate: Sequence[float], baseline: Sequence[float],
                   alpha: float) -> tuple[float | None, float | None]:
    """One-sided bounds at level alpha of the ratio of two independent means, by Fieller's theorem.

    The set of ratios r with |mean_c - r mean_b| <= t sqrt(var_c + r^2 var_b) (t the one-sided
    quantile at Welch's degrees of freedom) is an interval when the baseline mean is itself
    clearly non-zero; otherwise the upper bound is unbounded (None). Dividing the difference's
    interval by the baseline mean instead ignores the baseline's own error and covers too little.
    """
    a, b = math.fsum(candidate) / len(candidate), math.fsum(baseline) / len(baseline)
    va, vb = variance(candidate) / len(candidate), variance(baseline) / len(baseline)
    df = welch_df(candidate, baseline)
    t = float(stats.t.ppf(1 - alpha, df)) if math.isfinite(df) else float(stats.norm.ppf(1 - alpha))
    lead = b * b - t * t * vb
    if lead <= 0:
        return None, None
    root = math.sqrt(max(a * a * vb + b * b * va - t * t * va * vb, 0.0)) * t
    return (a * b - root) / lead, (a * b + root) / lead


def gain_test(candidate: Sequence[float], baseline: Sequence[float], alpha: float = 0.05) -> GainTest:
    if not candidate or not baseline:
        raise ValueError("a gain needs runs of both the candidate and the baseline")
    if not 0 < alpha < 1:
        raise ValueError(f"the level must be in (0, 1), got {alpha}")
    mean_c, mean_b = math.fsum(candidate) / len(candidate), math.fsum(baseline) / len(baseline)
    ratio = mean_c / mean_b if mean_b else math.inf
    if len(candidate) < 2 or len(baseline) < 2:
        return GainTest(ratio, None, None, None, alpha, significant=False)
    result = stats.ttest_ind(candidate, baseline, equal_var=False, alternative="greater")
    p = float(result.pvalue)
    if math.isnan(p):  # no spread at all: the runs are identical or constant
        p = 0.0 if mean_c > mean_b else 1.0
    low, high = fieller_bounds(candidate, baseline, alpha) if mean_b else (None, None)
    return GainTest(ratio, low, high, p, alpha, significant=p < alpha and mean_c > mean_b)


@dataclass(frozen=True)
class HolmStep:
    """One hypothesis in Holm's step-down procedure."""

    p_adjusted: float  # rejected at family-wise level alpha exactly when this is below alpha
    divisor: int  # m - rank + 1: its own p-value is compared with alpha / divisor


def holm(p_values: dict[int, float]) -> dict[int, HolmStep]:
    """Holm's step-down correction of several p-values (ties go to the smaller key).

    Testing several candidates against one baseline at the full alpha each would pack by
    chance more often than alpha; Holm keeps the chance of any false gain within alpha, and
    rejects at least what Bonferroni rejects.
    """
    ordered = sorted(p_values.items(), key=lambda item: (item[1], item[0]))
    steps: dict[int, HolmStep] = {}
    running = 0.0
    for rank, (key, p) in enumerate(ordered):
        divisor = len(ordered) - rank
        running = max(running, min(1.0, divisor * p))
        steps[key] = HolmStep(running, divisor)
    return steps
