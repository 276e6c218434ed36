"""The HorizontalPodAutoscaler's replica count for a Pods metric (pure), as kube-controller-manager 1.20 computes it.

The test bed's Kubernetes 1.20 has no custom-metrics API, so the autoscaling benchmark runs this algorithm itself
and writes its answer through the SLMDeployment's scale subresource, where a real HPA would write it. It follows
pkg/controller/podautoscaler of Kubernetes 1.20.2:
- replica_calculator.go, calcPlainMetricReplicas and groupPods for a non-CPU metric: deleted and failed pods are
  ignored, Pending pods are unready, Running pods without a sample are missing, the rest are ready;
- a ratio within the tolerance (0.1) keeps the current count; on a scale-up unready and missing pods count as 0,
  on a scale-down missing pods count as on target; a recount that flips the direction keeps the current count;
- horizontal.go, stabilizeRecommendation: the highest recommendation within the downscale stabilization window,
  and normalizeDesiredReplicas: a scale-up at most max(2 x current, 4), then minReplicas..maxReplicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance's default
SCALE_UP_LIMIT_FACTOR, SCALE_UP_LIMIT_MINIMUM = 2.0, 4.0


@dataclass(frozen=True)
class PodSample:
    name: str
    phase: str  # the pod's status.phase
    value: float | None  # the metric for this pod; None when it reported none
    deleting: bool = False


def metric_replicas(current: int, pods: list[PodSample], target: float, tolerance: float = TOLERANCE) -> int:
    """calcPlainMetricReplicas: the replicas that bring the pods' mean `value` to `target`."""
    metrics: dict[str, float] = {}
    unready, missing = [], []
    for pod in pods:
        if pod.deleting or pod.phase == "Failed":
            continue
        if pod.phase == "Pending":
            unready.append(pod.name)
        elif pod.value is None:
            missing.append(pod.name)
        else:
            metrics[pod.name] = pod.value
    if not metrics:
        return current  # "did not receive metrics for any ready pods": the HPA changes nothing
    ratio = sum(metrics.values()) / (target * len(metrics))
    rebalance_unready = bool(unready) and ratio > 1.0
    if not rebalance_unready and not missing:
        return current if abs(1.0 - ratio) <= tolerance else math.ceil(ratio * len(metrics))
    for name in missing:
        metrics[name] = target if ratio < 1.0 else 0.0
    if rebalance_unready:
        for name in unready:
            metrics[name] = 0.0
    recounted = sum(metrics.values()) / (target * len(metrics))
    if abs(1.0 - recounted) <= tolerance or (ratio < 1.0 < recounted) or (ratio > 1.0 > recounted):
        return current
    return math.ceil(recounted * len(metrics))


@dataclass
class Hpa:
    """One HorizontalPodAutoscaler's state between syncs: its recommendations within the window."""

    target: float
    min_replicas: int
    max_replicas: int
    downscale_window_s: float = 300.0  # --horizontal-pod-autoscaler-downscale-stabilization's default
    recommendations: list[tuple[float, int]] = field(default_factory=list)  # (time, replicas)

    def sync(self, now: float, current: int, pods: list[PodSample]) -> int:
        """The replicas this sync writes to the scale subresource."""
        proposed = metric_replicas(current, pods, self.target)
        self.recommendations = [(t, r) for t, r in self.recommendations if t >= now - self.downscale_window_s]
        stabilized = max([proposed] + [r for _, r in self.recommendations])
        self.recommendations.append((now, proposed))
        up_limit = int(max(SCALE_UP_LIMIT_FACTOR * current, SCALE_UP_LIMIT_MINIMUM))
        return max(self.min_replicas, min(stabilized, up_limit, self.max_replicas))
