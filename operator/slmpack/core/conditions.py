"""Status conditions in the Kubernetes API conventions' shape, and the phase derived from them (pure).

Conditions are the truth; `phase` is only a one-word summary for printer columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from slmpack.api.models import Condition, Phase

PROFILE_READY = "ProfileReady"
PLACED = "Placed"
AVAILABLE = "Available"
INVALID_SPEC = "InvalidSpec"
ONE_GPU = "OneGPU"
SLO_MET = "SLOMet"
METRICS_AVAILABLE = "MetricsAvailable"  # with spec.autoscaling: whether every engine's load could be read


def set_condition(conditions: list[Condition], type_: str, status: bool | str, reason: str, message: str,
                  now: datetime, generation: int | None = None) -> list[Condition]:
    """Return the conditions with `type_` set; the transition time moves only when the status changes."""
    status = status if isinstance(status, str) else ("True" if status else "False")
    previous = next((c for c in conditions if c.type == type_), None)
    changed_at = previous.last_transition_time if previous and previous.status == status else now
    updated = Condition(type=type_, status=status, reason=reason, message=message,
                        last_transition_time=changed_at, observed_generation=generation)
    return [c for c in conditions if c.type != type_] + [updated]


def without_condition(conditions: list[Condition], type_: str) -> list[Condition]:
    return [c for c in conditions if c.type != type_]


def get_condition(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: list[Condition], type_: str) -> bool:
    condition = get_condition(conditions, type_)
    return condition is not None and condition.status == "True"


def derive_phase(conditions: list[Condition]) -> Phase:
    """The one-word summary of the conditions."""
    if is_true(conditions, INVALID_SPEC):
        return Phase.failed
    profile = get_condition(conditions, PROFILE_READY)
    if profile is not None and profile.status == "False":
        return Phase.failed if profile.reason in {"ProfilingFailed", "ProfileUnreadable"} else Phase.profiling
    one_gpu = get_condition(conditions, ONE_GPU)
    if one_gpu is not None and one_gpu.status == "False":
        return Phase.degraded
    available = get_condition(conditions, AVAILABLE)
    if available is not None and available.status == "True":
        return Phase.ready
    if available is not None and available.reason in {"ReplicaFailing", "Degraded"}:
        return Phase.degraded
    if is_true(conditions, PLACED):
        return Phase.deploying
    return Phase.pending


# ---------------------------------------------------------------- replicas


@dataclass(frozen=True)
class ReplicaState:
    """What the operator reads of one engine pod."""

    name: str
    ready: bool
    waiting_reason: str | None = None  # e.g. CrashLoopBackOff, ImagePullBackOff
    last_termination_reason: str | None = None  # e.g. OOMKilled, Error
    restarts: int = 0
    unschedulable: str | None = None  # the scheduler's message while it finds no node for the pod
    node: str | None = None  # the node it was scheduled to
    gpu_uuids: tuple[str, ...] = ()  # the GPUs its containers got, as the node's exporter publishes them
    running_gpu_uuids: tuple[str, ...] = ()  # the GPUs its processes run on (NVML), where the exporter sees them
    claims: tuple[str, ...] = ()  # the ResourceClaims it names (DRA placement)
    ip: str | None = None  # the pod's IP, where the autoscaler reads its engine's /metrics
    uid: str = ""  # the pod's UID, which names it in the exporters' GPU assignments
    metrics_port: int | None = None  # where the pod is scraped (prometheus.io/port): a pack pod's supervisor


FAILING_WAITING_REASONS = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "ErrImageNeverPull",
                           "CreateContainerConfigError", "CreateContainerError", "InvalidImageName"}


def replica_problem(replicas: list[ReplicaState]) -> str | None:
    """The first failing replica, in words, or None when none is failing."""
    for replica in sorted(replicas, key=lambda r: r.name):
        if replica.waiting_reason in FAILING_WAITING_REASONS:
            last = f" (last exit: {replica.last_termination_reason})" if replica.last_termination_reason else ""
            return f"replica {replica.name} is in {replica.waiting_reason}{last} after {replica.restarts} restarts"
        if replica.last_termination_reason == "OOMKilled" and not replica.ready:
            return f"replica {replica.name} was OOMKilled: raise its memory limit or lower the replicas per GPU"
    return None


def unplaced_replica(replicas: list[ReplicaState]) -> str | None:
    """The first replica the scheduler finds no node for, in words, or None when every one has a node."""
    for replica in sorted(replicas, key=lambda r: r.name):
        if replica.unschedulable is not None:
            return f"replica {replica.name} waits for a node: {replica.unschedulable}"
    return None
