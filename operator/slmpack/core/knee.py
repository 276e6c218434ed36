"""Knee finding on a measured throughput/latency curve (pure).

The default rule is BCA's: keep batch B while
  efficiency  T(B) / (B · T(1)) > ε          (ε = 20 %)
  latency     mean ITL(B) ≤ L · mean ITL(B≈32)  (L = 5)
and the knee is the largest B that passes both. T is request throughput where it is
known, output token throughput otherwise. When B = 1 was not probed, the smallest
probed batch b0 stands in: efficiency = T(B)·b0 / (B·T(b0)).

Kneedle (the `kneed` package) is the alternative rule. A latency SLO (p99 ITL or
p99 TTFT) caps whichever rule is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from slmpack.api.models import Knee, KneeRule, LatencySLO, ProfilePoint

LATENCY_REFERENCE_BATCH = 32


@dataclass(frozen=True)
class KneeParams:
    rule: KneeRule = KneeRule.bca
    efficiency_threshold_percent: int = 20
    latency_factor: int = 5
    slo: LatencySLO = field(default_factory=LatencySLO)

    def describe(self) -> str:
        if self.rule == KneeRule.kneedle:
            text = "kneedle"
        else:
            text = f"bca(eps={self.efficiency_threshold_percent}%, L={self.latency_factor})"
        caps = [f"p99 ITL<={self.slo.p99_itl_ms}ms" if self.slo.p99_itl_ms else "",
                f"p99 TTFT<={self.slo.p99_ttft_ms}ms" if self.slo.p99_ttft_ms else ""]
        caps = [c for c in caps if c]
        return text + (f" capped by SLO {', '.join(caps)}" if caps else "")


BCA_DEFAULTS = KneeParams()


def usable(points: Iterable[ProfilePoint]) -> list[ProfilePoint]:
    """Points that measured something, sorted by batch size."""
    return sorted((p for p in points if p.error is None and throughput(p)), key=lambda p: p.batch_size)


def throughput(point: ProfilePoint) -> float | None:
    return point.request_throughput_per_s or point.output_throughput_tokens_per_s


def mean_itl(point: ProfilePoint) -> float | None:
    return point.itl_ms.mean if point.itl_ms else None


def latency_reference(points: Sequence[ProfilePoint]) -> ProfilePoint | None:
    """The probed point nearest batch 32 (the smaller one on a tie)."""
    with_itl = [p for p in points if mean_itl(p)]
    if not with_itl:
        return None
    return min(with_itl, key=lambda p: (abs(p.batch_size - LATENCY_REFERENCE_BATCH), p.batch_size))


def bca_failure(point: ProfilePoint, base: ProfilePoint, reference: ProfilePoint | None,
                params: KneeParams) -> str | None:
    """Why `point` fails BCA's tests against the base (B=1) and reference (B≈32) points, or None."""
    if point.error is not None or not throughput(point):
        return f"B={point.batch_size} failed: {point.error or 'no throughput measured'}"
    efficiency = throughput(point) * base.batch_size / (point.batch_size * throughput(base))
    if efficiency * 100 <= params.efficiency_threshold_percent:
        return (f"B={point.batch_size}: efficiency {efficiency:.0%} is not above "
                f"{params.efficiency_threshold_percent}%")
    if reference is not None and mean_itl(point) is not None:
        limit = params.latency_factor * mean_itl(reference)
        if mean_itl(point) > limit:
            return (f"B={point.batch_size}: mean ITL {mean_itl(point):.1f} ms exceeds {params.latency_factor} x "
                    f"ITL(B={reference.batch_size}) = {limit:.1f} ms")
    return None


def efficiency_bar(batch: int, base: ProfilePoint, params: KneeParams) -> float | None:
    """The output tokens/s a probe at `batch` must exceed to pass BCA's efficiency test, ε · B · T(b0) / b0, or
    None without a base throughput. Tokens, not requests: the unit of a probe's windows; the test is the same
    while every request asks for the same number of tokens, as the profiler's do."""
    if base.error is not None or not base.output_throughput_tokens_per_s:
        return None
    return params.efficiency_threshold_percent / 100 * batch * base.output_throughput_tokens_per_s / base.batch_size


def slo_failure(point: ProfilePoint, slo: LatencySLO) -> str | None:
    if slo.p99_itl_ms and point.itl_ms and point.itl_ms.p99 and point.itl_ms.p99 > slo.p99_itl_ms:
        return f"B={point.batch_size}: p99 ITL {point.itl_ms.p99:.1f} ms exceeds the SLO {slo.p99_itl_ms} ms"
    if slo.p99_ttft_ms and point.ttft_ms and point.ttft_ms.p99 and point.ttft_ms.p99 > slo.p99_ttft_ms:
        return f"B={point.batch_size}: p99 TTFT {point.ttft_ms.p99:.1f} ms exceeds the SLO {slo.p99_ttft_ms} ms"
    return None


def pareto_frontier(points: Iterable[ProfilePoint]) -> list[ProfilePoint]:
    """Points no other point beats on both output throughput (higher) and mean ITL (lower)."""
    candidates = [p for p in usable(points) if p.output_throughput_tokens_per_s and mean_itl(p)]

    def dominated(p: ProfilePoint) -> bool:
        return any(q.output_throughput_tokens_per_s >= p.output_throughput_tokens_per_s
                   and mean_itl(q) <= mean_itl(p)
                   and (q.output_throughput_tokens_per_s, mean_itl(q)) != (p.output_throughput_tokens_per_s,
                                                                           mean_itl(p))
                   for q in candidates)

    return [p for p in candidates if not dominated(p)]


class NoKneeError(ValueError):
    """The curve has no usable point to choose a knee from."""


def find_knee(points: Iterable[ProfilePoint], params: KneeParams = BCA_DEFAULTS) -> Knee:
    curve = usable(points)
    if not curve:
        raise NoKneeError("no batch size was measured successfully, so there is no knee")
    base, reference = curve[0], latency_reference(curve)

    def failure(point: ProfilePoint) -> str | None:
        return slo_failure(point, params.slo) or (
            bca_failure(point, base, reference, params) if params.rule == KneeRule.bca else None)

    if params.rule == KneeRule.kneedle:
        chosen, reason = _kneedle(curve), "kneedle: the point of maximum curvature of throughput over batch"
    else:
        passing = [p for p in curve if bca_failure(p, base, reference, params) is None]
        chosen, reason = (passing[-1] if passing else base), None
    # The SLO caps the knee: step down to the largest batch at or below it that meets the SLO.
    within_slo = [p for p in curve if p.batch_size <= chosen.batch_size and slo_failure(p, params.slo) is None]
    slo_met = bool(within_slo)
    if slo_failure(chosen, params.slo):
        chosen = within_slo[-1] if within_slo else base
    if not slo_met:
        reason = f"no probed batch meets the SLO: {slo_failure(base, params.slo)}"
    elif reason is None:
        larger = [p for p in curve if p.batch_size > chosen.batch_size]
        reason = failure(larger[0]) if larger else "the largest batch probed passes"
    return Knee(
        batch_size=chosen.batch_size,
        rule=params.describe(),
        reason=reason or "",
        slo_met=slo_met,
        throughput_tokens_per_s=chosen.output_throughput_tokens_per_s,
        request_throughput_per_s=chosen.request_throughput_per_s,
        mean_itl_ms=mean_itl(chosen),
        p99_itl_ms=chosen.itl_ms.p99 if chosen.itl_ms else None,
        kv_cache_usage_percent=chosen.kv_cache_usage_percent,
    )


def _kneedle(curve: Sequence[ProfilePoint]) -> ProfilePoint:
    from kneed import KneeLocator  # a pure-numpy package; imported lazily to keep the default path light

    if len(curve) < 3:
        return curve[-1]
    x = [p.batch_size for p in curve]
    y = [throughput(p) for p in curve]
    located = KneeLocator(x, y, curve="concave", direction="increasing", interp_method="interp1d").knee
    return next((p for p in curve if p.batch_size == located), curve[-1])
