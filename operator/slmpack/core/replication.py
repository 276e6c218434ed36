"""Replicate or not, and at which batch: decided from a profile's raw measurements (pure).

A profile stores the raw curve and the raw replication runs. Each deployment takes its
own knee from the curve (its knee rule and SLO) and its own replica count from the runs
(its SLO and confidence), so deployments with different SLOs share one profile.

Every replica count k had the same budget (cores or GPU share, KV-cache bytes) and the
same offered load, with each replica capped at the same batch, so k = 1 is the baseline.
The test that k > 1 beats it is Welch's one-sided t-test, corrected by Holm over the
counts tried, on each count's first `test_runs` runs: a fixed number, so that stopping
the runs once they are precise cannot inflate the chance of a false gain. Among the
counts that pass, the smallest one that is not significantly below the best is chosen;
otherwise one replica, and the explanation gives the numbers. The ratio's bounds are
Fieller's at the level the chosen count was tested at, so they exclude 1 exactly when
its gain is significant.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from slmpack.api.models import (
    Knee,
    LatencySLO,
    ProfilingSpec,
    ReplicationDecision,
    ReplicationPoint,
    SLMProfileStatus,
)
from slmpack.core.knee import KneeParams, NoKneeError, find_knee
from slmpack.core.stats import GainTest, Precision, gain_test, holm, precise_enough
from slmpack.core.sweep import batch_grid, next_probe

# Runs of each count that the test uses, when the policy does not say (the CRD's minRepeats default).
DEFAULT_TEST_RUNS = 3
RUN_WINDOWS = 2  # a run's least length, in windows of the offered load
RUN_SECONDS = 20  # and in seconds at one replica's rate at the knee


def run_requests(offered: int, knee: Knee) -> int:
    """Requests in every run of every replica count: two windows of the offered load (each replica runs its full
    batch twice over), and at least RUN_SECONDS at the rate the sweep measured at the knee, so that a few
    seconds of a busy machine's noise do not decide a run. The decision tests the spread between runs, and only
    the first DEFAULT_TEST_RUNS of them, so a run longer than that only costs time."""
    return max(RUN_WINDOWS * offered, math.ceil(RUN_SECONDS * (knee.request_throughput_per_s or 0)))


def round_order(counts: int, round_index: int, warm: bool, rng: random.Random) -> list[int]:
    """The replica counts 1..counts in the order one round runs them, so that drift cancels between them.

    With every count's engines warm at once a round is a random permutation (randomised blocks).
    When a count's engines must be started in turn, rounds alternate ascending and descending
    (1, 2, 2, 1, 1, 2, ...: ABBA), so adjacent runs of one count share its engines and a linear
    drift falls equally on every count."""
    order = list(range(1, counts + 1))
    if warm:
        rng.shuffle(order)
    elif round_index % 2:
        order.reverse()
    return order


def replication_stop(points: list[ReplicationPoint], rounds: int, repeats: Precision, elapsed_seconds: float = 0.0,
                     budget_seconds: float = 0.0) -> str | None:
    """Why the rounds stop after `rounds` complete ones, or None to go on: every count's runs are precise enough (or
    it failed) once the minimum is reached (Precise), the budget of runs is spent (MaxRepeats), or the time budget
    ran out after the minimum (TimeBudget). The decision tests the first minimum runs whatever stops them."""
    if rounds >= repeats.max_samples:
        return "MaxRepeats"
    if rounds < repeats.min_samples:
        return None
    if all(p.error or precise_enough(p.runs_tokens_per_s, repeats) for p in points):
        return "Precise"
    if budget_seconds and elapsed_seconds >= budget_seconds:
        return "TimeBudget"
    return None


def knee_params(policy: ProfilingSpec) -> KneeParams:
    return KneeParams(policy.rule, policy.efficiency_threshold_percent, policy.latency_factor, policy.slo)


def slo_miss(point: ReplicationPoint, slo: LatencySLO) -> str | None:
    """Why a replication point is out of the running, or None when it measured and meets the SLO."""
    if point.error is not None:
        return f"k={point.replicas} failed: {point.error}"
    if not point.aggregate_throughput_tokens_per_s:
        return f"k={point.replicas} measured no throughput"
    if slo.p99_itl_ms and point.p99_itl_ms and point.p99_itl_ms > slo.p99_itl_ms:
        return f"k={point.replicas}: p99 ITL {point.p99_itl_ms:.0f} ms exceeds the SLO {slo.p99_itl_ms} ms"
    if slo.p99_ttft_ms and point.p99_ttft_ms and point.p99_ttft_ms > slo.p99_ttft_ms:
        return f"k={point.replicas}: p99 TTFT {point.p99_ttft_ms:.0f} ms exceeds the SLO {slo.p99_ttft_ms} ms"
    return None


def runs(point: ReplicationPoint, first: int | None = None) -> list[float]:
    """The point's runs in the order measured, the first `first` of them when given."""
    measured = list(point.runs_tokens_per_s) or [point.aggregate_throughput_tokens_per_s]
    return measured[:first] if first else measured


def decide_replicas(replication: list[ReplicationPoint], slo: LatencySLO, confidence_percent: int = 95,
                    test_runs: int = DEFAULT_TEST_RUNS) -> ReplicationDecision:
    """The replica count the runs support, with the test behind it."""
    alpha = 1 - confidence_percent / 100
    by_k = {p.replicas: p for p in replication}
    eligible = {k: p for k, p in by_k.items() if slo_miss(p, slo) is None}
    candidates = {k: p for k, p in eligible.items() if k > 1}

    def mean(k: int) -> float:
        return by_k[k].aggregate_throughput_tokens_per_s or 0.0

    if not candidates:
        misses = [slo_miss(p, slo) for k, p in sorted(by_k.items()) if k > 1]
        detail = "; ".join(m for m in misses if m) or "none was measured"
        return ReplicationDecision(replicas=1, confidence_percent=confidence_percent,
                                   explanation=f"1 replica: no k > 1 was measured within the SLO ({detail})")
    if 1 not in by_k:
        return ReplicationDecision(replicas=1, confidence_percent=confidence_percent,
                                   explanation="1 replica: one replica was not measured at this batch, so no count "
                                               "can be compared with it")
    baseline = eligible.get(1)
    if baseline is None:
        best = max(candidates, key=mean)
        why = slo_miss(by_k[1], slo)
        return ReplicationDecision(
            replicas=best, best_candidate=best, confidence_percent=confidence_percent,
            explanation=f"{best} replicas: the best k within the SLO ({mean(best):.0f} tok/s), and {why}")

    def versus(k: int, level: float) -> GainTest:
        return gain_test(runs(by_k[k], test_runs), runs(baseline, test_runs), level)

    tests = {k: versus(k, alpha) for k in candidates}
    steps = holm({k: test.p_value if test.p_value is not None else 1.0 for k, test in tests.items()})
    passed = [k for k in candidates if steps[k].p_adjusted < alpha and mean(k) > mean(1)]
    if passed:
        best = max(passed, key=mean)
        # More replicas cost more engines and memory: the fewest that are not significantly below the best.
        chosen = min(k for k in passed if not gain_test(runs(by_k[best], test_runs), runs(by_k[k], test_runs),
                                                         alpha).significant)
    else:
        chosen = max(candidates, key=mean)
    step = steps[chosen]
    test = versus(chosen, alpha / step.divisor)
    significant = chosen in passed
    excluded = [slo_miss(p, slo) for k, p in sorted(by_k.items()) if k not in eligible]
    tried = len(candidates)
    correction = (f"Holm-adjusted p={step.p_adjusted:.3g} over {tried} counts tried" if tried > 1
                  else "one count tried")
    text = (f"{chosen} replicas gave {mean(chosen):.0f} tok/s against {mean(1):.0f} tok/s for one replica at the "
            f"same load of {by_k[chosen].offered_concurrency or '?'} concurrent requests: {test.describe()}, "
            f"{correction}, first {min(test_runs, len(runs(by_k[chosen])))} vs "
            f"{min(test_runs, len(runs(baseline)))} runs tested"
            + (f"; {best} replicas were the best ({mean(best):.0f} tok/s) but not significantly above {chosen}"
               if significant and best != chosen else "")
            + (f" (left out: {'; '.join(excluded)})" if excluded else ""))
    numbers = {"best_candidate": chosen, "ratio": round(test.ratio, 4), "p_value": test.p_value,
               "p_value_adjusted": step.p_adjusted, "candidates_tested": tried, "runs_tested": test_runs,
               "ratio_ci_low": round(test.ratio_low, 4) if test.ratio_low is not None else None,
               "ratio_ci_high": round(test.ratio_high, 4) if test.ratio_high is not None else None,
               "bounds_confidence_percent": test.confidence_percent, "significant": significant}
    if significant:
        return ReplicationDecision(replicas=chosen, confidence_percent=confidence_percent,
                                   explanation=f"{text}; significant at {confidence_percent}%", **numbers)
    return ReplicationDecision(replicas=1, confidence_percent=confidence_percent,
                               explanation=f"1 replica: {text}; not significant at {confidence_percent}%", **numbers)


def missing_measurements(profile: SLMProfileStatus, policy: ProfilingSpec) -> str | None:
    """What this deployment's knee rule and SLO need that the shared profile has not measured, in words, or None:
    a probe to bracket its knee, or the replica counts at its knee. A profile with a knee but no curve (written by
    hand, or recorded) is taken as it is, as `choose` takes it."""
    if not profile.points:
        return None
    grid = batch_grid(policy.min_batch_size, policy.max_batch_size, policy.batch_sizes)
    measured = {p.batch_size: p for p in profile.points if p.batch_size in grid}
    if policy.batch_sizes:
        lacking = [b for b in grid if b not in measured]
        if lacking:
            return f"batch sizes {', '.join(map(str, lacking))} of spec.profiling.batchSizes"
    elif (probe := next_probe(grid, measured, knee_params(policy))) is not None:
        return f"a probe at batch {probe}, to bracket its knee"
    try:
        knee = find_knee(profile.points, knee_params(policy))
    except NoKneeError:
        return None
    if policy.max_replicas > 1 and profile.replication and not any(
            p.batch_size_per_replica == knee.batch_size for p in profile.replication):
        return f"the replica counts at this knee, batch {knee.batch_size}"
    return None


@dataclass(frozen=True)
class Choice:
    """What a deployment takes from a profile: its knee, its replica count and the point measured for it."""

    knee: Knee | None
    decision: ReplicationDecision
    measured: ReplicationPoint | None  # the replication point of the chosen count, when it was measured

    @property
    def max_num_seqs(self) -> int | None:
        """Each replica runs at the knee under the deployment's SLO, never a larger batch a run happened to use."""
        return self.knee.batch_size if self.knee else None


def choose(profile: SLMProfileStatus, policy: ProfilingSpec) -> Choice:
    """The knee and replica count for one deployment's knee rule, SLO and confidence.

    Only the replica counts measured at this deployment's knee decide: a stricter SLO has a
    smaller knee, and until the profile has runs there (`missing_measurements`) it gets one
    replica at its knee."""
    try:
        knee = find_knee(profile.points, knee_params(policy)) if profile.points else profile.knee
    except NoKneeError:
        knee = None
    at_knee = [p for p in profile.replication if knee is None or p.batch_size_per_replica == knee.batch_size]
    if knee is not None and profile.replication and not at_knee:
        measured_at = ", ".join(str(b) for b in sorted({p.batch_size_per_replica for p in profile.replication}))
        decision = ReplicationDecision(
            replicas=1, confidence_percent=policy.confidence_percent,
            explanation=f"1 replica: the replica counts were compared at a batch of {measured_at} per replica, "
                        f"not at this deployment's knee of {knee.batch_size}")
        return Choice(knee, decision, None)
    decision = decide_replicas(at_knee, policy.slo, policy.confidence_percent, policy.min_repeats)
    measured = next((p for p in at_knee if p.replicas == decision.replicas and slo_miss(p, policy.slo) is None),
                    None)
    return Choice(knee, decision, measured)
