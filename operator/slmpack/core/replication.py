"""Replicate or not, and at which batch: decided from a profile's raw measurements (pure).

A profile stores the raw curve and the raw replication runs. Each deployment takes its
own knee from the curve (its knee rule and SLO) and its own replica count from the runs
(its SLO and confidence), so deployments with different SLOs share one profile.

Every replica count k was measured under the same offered load, so k = 1 at that load is
the baseline. k > 1 is chosen only when the best k > 1 within the SLO beats it by a
margin that is significant at the configured confidence (Welch's t-test of the runs);
otherwise one replica, and the explanation gives the numbers.
"""

from __future__ import annotations

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
from slmpack.core.stats import gain_test


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


def runs(point: ReplicationPoint) -> list[float]:
    return list(point.runs_tokens_per_s) or [point.aggregate_throughput_tokens_per_s]


def decide_replicas(replication: list[ReplicationPoint], slo: LatencySLO,
                    confidence_percent: int = 95) -> ReplicationDecision:
    """The replica count the runs support, with the test behind it."""
    by_k = {p.replicas: p for p in replication}
    eligible = {k: p for k, p in by_k.items() if slo_miss(p, slo) is None}
    candidates = [p for k, p in eligible.items() if k > 1]
    best = max(candidates, key=lambda p: p.aggregate_throughput_tokens_per_s, default=None)

    def one(why: str, **numbers) -> ReplicationDecision:
        return ReplicationDecision(replicas=1, confidence_percent=confidence_percent, explanation=why, **numbers)

    if best is None:
        misses = [slo_miss(p, slo) for k, p in sorted(by_k.items()) if k > 1]
        detail = "; ".join(m for m in misses if m) or "none was measured"
        return one(f"1 replica: no k > 1 was measured within the SLO ({detail})")
    baseline = eligible.get(1)
    if baseline is None:
        why = slo_miss(by_k[1], slo) if 1 in by_k else "one replica was not measured"
        return ReplicationDecision(
            replicas=best.replicas, best_candidate=best.replicas, confidence_percent=confidence_percent,
            explanation=f"{best.replicas} replicas: the best k within the SLO "
                        f"({best.aggregate_throughput_tokens_per_s:.0f} tok/s), and {why}")
    excluded = [slo_miss(p, slo) for k, p in sorted(by_k.items()) if k not in eligible]
    test = gain_test(runs(best), runs(baseline), confidence_percent)
    numbers = {"best_candidate": best.replicas, "ratio": round(test.ratio, 4), "p_value": test.p_value,
               "ratio_ci_low": round(test.ratio_low, 4) if test.ratio_low is not None else None,
               "ratio_ci_high": round(test.ratio_high, 4) if test.ratio_high is not None else None,
               "significant": test.significant}
    versus = (f"{best.replicas} replicas gave {best.aggregate_throughput_tokens_per_s:.0f} tok/s against "
              f"{baseline.aggregate_throughput_tokens_per_s:.0f} tok/s for one replica at the same load of "
              f"{best.offered_concurrency or '?'} concurrent requests: {test.describe()}, "
              f"{len(runs(best))} vs {len(runs(baseline))} runs"
              + (f" (left out: {'; '.join(excluded)})" if excluded else ""))
    if test.significant:
        return ReplicationDecision(replicas=best.replicas, confidence_percent=confidence_percent,
                                   explanation=f"{versus}; significant at {confidence_percent}%", **numbers)
    return one(f"1 replica: {versus}; not significant at {confidence_percent}%", **numbers)


@dataclass(frozen=True)
class Choice:
    """What a deployment takes from a profile: its knee, its replica count and the point measured for it."""

    knee: Knee | None
    decision: ReplicationDecision
    measured: ReplicationPoint | None  # the replication point of the chosen count, when it was measured

    @property
    def max_num_seqs(self) -> int | None:
        """The batch each replica was measured at, or the knee when the count was not measured."""
        if self.measured is not None:
            return self.measured.batch_size_per_replica
        return self.knee.batch_size if self.knee else None


def choose(profile: SLMProfileStatus, policy: ProfilingSpec) -> Choice:
    """The knee and replica count for one deployment's knee rule, SLO and confidence."""
    try:
        knee = find_knee(profile.points, knee_params(policy)) if profile.points else profile.knee
    except NoKneeError:
        knee = None
    decision = decide_replicas(profile.replication, policy.slo, policy.confidence_percent)
    measured = next((p for p in profile.replication if p.replicas == decision.replicas and slo_miss(p, policy.slo)
                     is None), None)
    return Choice(knee, decision, measured)
