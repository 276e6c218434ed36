"""The GPU-aware autoscaler's decision (pure): engine load in, replicas over all packs out.

Load is what vLLM reports per replica: requests running plus requests waiting
(`vllm:num_requests_running`, `vllm:num_requests_waiting`), plus the requests queued at the
deployment's routers (`haproxy_backend_current_queue`): the router caps every engine at its
knee, so demand beyond it waits there, and a queue that lasts keeps the load above target.
A replica is "at its knee" when its load reaches `targetKneePercent` of the profile's knee batch. Packs fill in order
(core/packs.py), so the replica added lands in the last pack while that pack has a free
slot; the plan sized every pack's memory for all its slots, so a free slot always has the
memory. A new pack (another GPU) is taken only when every pack is full and at its knee.
Scale-in waits for the cooldown and removes the highest replicas, which the StatefulSet
drains (preStop) before the engine stops.

An engine whose metrics could not be read, or read NaN or infinite, is a `MetricsProblem`: it
counts as missing, and the MetricsAvailable condition names it and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from slmpack.api.models import AutoscalingSpec
from slmpack.core.packs import in_pack, layout, packs_for


@dataclass(frozen=True)
class EngineLoad:
    """One replica pod's engines, as its /metrics last read: one engine, or a pack pod's that reported."""

    pod: str
    running: float
    waiting: float
    tokens_per_s: float | None = None  # generated tokens per second since the previous read
    engines: int = 1

    @property
    def load(self) -> float:
        return self.running + self.waiting


@dataclass(frozen=True)
class MetricsProblem:
    """Why one replica's engine gave no load."""

    pod: str
    reason: str  # CamelCase: MetricsTimeout, MetricsTooLarge, NonFiniteMetric, MetricsStale...
    message: str


def finite_loads(loads: list[EngineLoad]) -> tuple[list[EngineLoad], list[MetricsProblem]]:
    """The loads the autoscaler can count, and a problem for each that is NaN or infinite."""
    counted = [e for e in loads if math.isfinite(e.load)]
    refused = [MetricsProblem(e.pod, "NonFiniteMetric", f"its load (running {e.running:g} + waiting {e.waiting:g}) "
                                                        "is not a finite number") for e in loads if e not in counted]
    return counted, refused


def metrics_condition(problems: list[MetricsProblem]) -> tuple[bool, str, str]:
    """(status, reason, message) of the MetricsAvailable condition."""
    if not problems:
        return True, "EnginesRead", "every ready replica's engine reports a finite load within the read's deadline " \
                                    "and body size limit"
    problems = sorted(problems, key=lambda p: p.pod)
    each = "; ".join(f"{p.pod}: {p.message} ({p.reason})" for p in problems)
    return False, problems[0].reason, f"{len(problems)} replica(s) count as without metrics (idle against scaling " \
                                      f"up, on target against scaling in): {each}"


@dataclass(frozen=True)
class ScalingDecision:
    replicas: int
    direction: str  # up | down | none
    reason: str  # CamelCase, the Event's reason and the metric's label
    message: str
    load_per_replica: float | None = None

    @property
    def changed(self) -> bool:
        return self.direction != "none"


def bounds(policy: AutoscalingSpec, per_pack: int, whole_packs: bool = False) -> tuple[int, int]:
    """The fewest and most replicas: minPacks packs with one replica in the last (or full, with whole
    packs), and maxPacks full packs."""
    fewest = policy.min_packs * per_pack if whole_packs else (policy.min_packs - 1) * per_pack + 1
    return fewest, policy.max_packs * per_pack


def decide_scale(policy: AutoscalingSpec, current: int, per_pack: int, knee_batch: int, pack_names: list[str],
                 loads: list[EngineLoad], ready: int, last_scale: datetime | None, now: datetime,
                 queued: float = 0.0, whole_packs: bool = False) -> ScalingDecision:
    """How many replicas to run over all packs, and why.

    `current` replicas are laid out over `pack_names` in order; `loads` are the pods read this
    time (a pack pod's reading covers its engines), `ready` the replicas (engines) that serve;
    `queued` the requests waiting at the deployment's routers, which the engines, capped at their
    knee, do not see. `whole_packs`: each pack is one pod, whose engine count cannot change without
    restarting all its engines, so packs are added and removed whole.
    """
    low, high = bounds(policy, per_pack, whole_packs)
    step = per_pack if whole_packs else 1
    if not low <= current <= high or current % step:
        target = min(max(_whole(current, step), low), high)
        unit = f" in whole packs of {per_pack}" if whole_packs else ""
        return ScalingDecision(target, "up" if target > current else "down", "OutOfBounds",
                               f"{current} replicas are outside {low}..{high}{unit} (minPacks {policy.min_packs}, "
                               f"maxPacks {policy.max_packs} of {per_pack} slots): {target} replicas")
    per_replica_target = knee_batch * policy.target_knee_percent / 100
    total = sum(e.load for e in loads) + queued
    mean = total / current
    # A replica that reported nothing (starting, or unschedulable) counts as idle against scaling up and as on
    # target against scaling in, as the HorizontalPodAutoscaler counts pods without metrics.
    missing = max(current - sum(e.engines for e in loads), 0)
    at_most = min(max(_whole(math.ceil((total + missing * per_replica_target) / per_replica_target), step), low),
                  high)
    tokens = sum(e.tokens_per_s or 0 for e in loads)
    numbers = (f"load {total:g} requests (running + waiting" + (f", {queued:g} of them queued at the router"
                                                                if queued else "")
               + f") over {current} replicas = {mean:.1f} per replica, "
               f"target {per_replica_target:g} ({policy.target_knee_percent}% of knee batch {knee_batch}), "
               f"{tokens:.0f} tokens/s")
    wanted = min(max(_whole(math.ceil(total / per_replica_target), step), low), high)
    by_pod = {e.pod: e for e in loads}
    sizes = layout(current, per_pack)
    if wanted > current:
        if ready < current:
            return ScalingDecision(current, "none", "ReplicaStarting",
                                   f"{numbers}; {ready}/{current} ready, waiting for them before adding more", mean)
        room = len(sizes) * per_pack
        if current < room:
            target = min(wanted, room)
            return ScalingDecision(target, "up", "PackHasFreeSlots",
                                   f"{numbers}: {target - current} more in pack {pack_names[len(sizes) - 1]}, "
                                   f"whose GPU has {room - current} free slot(s)", mean)
        busy = [name for name in pack_names[:len(sizes)] if _pack_load(name, by_pod) >= per_replica_target]
        if len(busy) < len(sizes):
            return ScalingDecision(current, "none", "PacksBelowKnee",
                                   f"{numbers}: all packs are full but {len(sizes) - len(busy)} are below the knee "
                                   "target, so no GPU is added", mean)
        target = min(wanted, room + per_pack)
        return ScalingDecision(target, "up", "AllPacksAtKnee",
                               f"{numbers}: every pack is full and at its knee, so pack {packs_for(target, per_pack)} "
                               f"takes another GPU with {target - current} replica(s)", mean)
    if missing and at_most >= current:
        return ScalingDecision(current, "none", "MetricsUnavailable",
                               f"{numbers}: {current - missing}/{current} replicas reported their engine metrics, "
                               f"holding {current}", mean)
    wanted = at_most  # scale in no further than the replicas without metrics allow
    if wanted < current:
        if last_scale is not None and (now - last_scale).total_seconds() < policy.scale_in_cooldown_seconds:
            left = policy.scale_in_cooldown_seconds - (now - last_scale).total_seconds()
            return ScalingDecision(current, "none", "CoolingDown",
                                   f"{numbers}: {wanted} would do, but the last scaling was under "
                                   f"{policy.scale_in_cooldown_seconds}s ago ({left:.0f}s left)", mean)
        freed = packs_for(current, per_pack) - packs_for(wanted, per_pack)
        gpus = f", freeing {freed} GPU(s)" if freed else ""
        return ScalingDecision(wanted, "down", "BelowTarget",
                               f"{numbers}: {wanted} replicas hold the target, the highest {current - wanted} "
                               f"drain and stop{gpus}", mean)
    return ScalingDecision(current, "none", "AtTarget", f"{numbers}: {current} replicas hold the target", mean)


def _whole(replicas: int, step: int) -> int:
    """Replicas rounded up to a multiple of step."""
    return -(-replicas // step) * step


def _pack_load(pack: str, by_pod: dict[str, EngineLoad]) -> float:
    """Mean load per replica (engine) of one pack."""
    mine = [e for pod, e in by_pod.items() if in_pack(pack, pod)]
    engines = sum(e.engines for e in mine)
    return sum(e.load for e in mine) / engines if engines else 0.0
