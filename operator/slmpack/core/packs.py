"""Packs: how many replicas each pack runs, which node each pack is pinned to, and what each reports (pure).

A pack is one StatefulSet whose replicas share one physical GPU. An SLMDeployment runs
P packs behind its one Service. Each pack keeps its node while that node still matches,
so adding or removing a pack never moves the others.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from slmpack.api.models import Device, PackStatus, Placement, SLMDeploymentSpec
from slmpack.core.conditions import ReplicaState
from slmpack.core.validation import MEMORY, REPLICAS, SHARING_STRATEGY, GPUNode, node_matches

# A pack is sized for the plan on one node, so every pack's node must look the same to the planner.
PLAN_LABELS = (SHARING_STRATEGY, REPLICAS, MEMORY)


def layout(replicas: int, per_pack: int) -> list[int]:
    """Replicas per pack when `replicas` fill packs of `per_pack` slots in order: full packs, then the rest."""
    if replicas <= 0:
        return []
    full, rest = divmod(replicas, per_pack)
    return [per_pack] * full + ([rest] if rest else [])


def packs_for(replicas: int, per_pack: int) -> int:
    return math.ceil(replicas / per_pack)


def gpus_on(node: GPUNode, spec: SLMDeploymentSpec) -> int:
    """How many packs a node holds: one per physical GPU (nvidia.com/gpu.count), else per R slots allocatable."""
    if node.gpu_count:
        return node.gpu_count
    return max(1, node.allocatable.get(spec.gpu.resource_name, 0) // node.sharing_slots)


def assign_nodes(spec: SLMDeploymentSpec, plan_node: GPUNode, nodes: Sequence[GPUNode], count: int,
                 previous: dict[int, str]) -> list[GPUNode | None]:
    """The node of each of `count` packs; None for a pack no node has a free GPU for.

    A pack keeps its `previous` node while that node still fits the plan; new packs go to the
    node the plan was made for first, then to the nodes `choose_node` prefers, one pack per GPU.
    On the CPU, every pack runs on the plan's node (no GPU bounds it).
    """
    if spec.engine.device == Device.cpu:
        return [plan_node] * count
    same_plan = [n for n in nodes if node_matches(spec, n)
                 and all(n.labels.get(k) == plan_node.labels.get(k) for k in PLAN_LABELS)]
    ranked = sorted(same_plan, key=lambda n: (n.name == plan_node.name, n.gpu_count == 1, n.sharing_slots, n.name),
                    reverse=True)
    by_name = {n.name: n for n in ranked}
    free = {n.name: gpus_on(n, spec) for n in ranked}
    chosen: list[GPUNode | None] = [None] * count
    for pack in range(count):
        kept = by_name.get(previous.get(pack, ""))
        if kept is not None and free[kept.name] > 0:
            chosen[pack] = kept
            free[kept.name] -= 1
    for pack in range(count):
        if chosen[pack] is None:
            node = next((n for n in ranked if free[n.name] > 0), None)
            if node is not None:
                chosen[pack] = node
                free[node.name] -= 1
    return chosen


def in_pack(pack: str, pod: str) -> bool:
    """Whether the pod belongs to the pack: a StatefulSet names its pods `<name>-<ordinal>`."""
    return re.fullmatch(re.escape(pack) + r"-[0-9]+", pod) is not None


def pods_of(pack: str, pods: Iterable[ReplicaState]) -> list[ReplicaState]:
    return sorted((p for p in pods if in_pack(pack, p.name)), key=lambda p: p.name)


def ready_engines(name: str, planned: int, pods: Iterable[ReplicaState], pack_pod: bool) -> int:
    """The pack's engines that serve: its ready replica pods, or all `planned` engines of its ready pack pod
    (whose supervisor is ready once every engine has started; one that crashed is restarted meanwhile)."""
    mine = pods_of(name, pods)
    return planned * any(p.ready for p in mine) if pack_pod else sum(p.ready for p in mine)


def pack_status(name: str, node: GPUNode | None, planned: int, pods: Iterable[ReplicaState],
                pack_pod: bool = False) -> PackStatus:
    mine = pods_of(name, pods)
    nodes = sorted({p.node for p in mine if p.node})
    return PackStatus(name=name, node=node.name if node else (nodes[0] if len(nodes) == 1 else None),
                      gpu_uuids=sorted({u for p in mine for u in p.gpu_uuids}), replicas=planned,
                      ready_replicas=ready_engines(name, planned, mine, pack_pod))


def pinned(spec: SLMDeploymentSpec) -> bool:
    """Whether the operator pins each pack to a node: under DRA the scheduler picks it with the claim."""
    return spec.placement in (Placement.device_plugin, Placement.pack_pod)
