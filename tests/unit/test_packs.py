"""Packs across GPUs and nodes: one StatefulSet per GPU, all behind the one Service, each reporting its place."""

from datetime import timedelta

import yaml

from slmpack.core.autoscale import EngineLoad
from slmpack.core.conditions import ReplicaState
from slmpack.core.decide import ClusterSnapshot, decide, with_status
from slmpack.core.packs import layout
from tests.unit.test_decide import DATA, NOW, condition, deployment, node

ONE_GPU_NODES = (node("gpu-a", 1), node("gpu-b", 1))


def packs(count, replicas=2, **spec) -> dict:
    return deployment(replicas=replicas, packs=count, gpu={"product": "NVIDIA-H100-80GB-HBM3"}, **spec)


def statefulsets(decision) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in decision.apply if o["kind"] == "StatefulSet"}


def pinned_node(sts) -> str:
    return sts["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"]


def test_each_pack_is_a_statefulset_on_its_own_gpu_behind_one_service():
    decision = decide(packs(3), ClusterSnapshot(ONE_GPU_NODES + (node("gpu-8", 8),)), NOW)
    sets = statefulsets(decision)
    assert list(sets) == ["chat", "chat-pack-1", "chat-pack-2"]
    # One-GPU nodes first (one GPU per pack is guaranteed there), then the eight-GPU node.
    assert [pinned_node(s) for s in sets.values()] == ["gpu-b", "gpu-a", "gpu-8"]
    assert all(s["spec"]["replicas"] == 2 for s in sets.values())
    assert sets["chat-pack-1"]["spec"]["selector"]["matchLabels"]["slmpack.dev/pack"] == "1"
    service = next(o for o in decision.apply if o["kind"] == "Service")
    for sts in sets.values():
        assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert [(p.name, p.node, p.replicas) for p in decision.status.packs] == [
        ("chat", "gpu-b", 2), ("chat-pack-1", "gpu-a", 2), ("chat-pack-2", "gpu-8", 2)]
    assert decision.status.current_packs == 3 and decision.status.replicas == 6
    assert decision.status.selector == "app.kubernetes.io/name=slmpack-engine,slmpack.dev/deployment=chat"
    assert "6 replica(s) in 3 packs" in condition(decision, "Placed").message


def test_a_pack_keeps_its_node_when_a_better_node_joins():
    first = decide(packs(2), ClusterSnapshot((node("gpu-8", 8),)), NOW)
    assert [pinned_node(s) for s in statefulsets(first).values()] == ["gpu-8", "gpu-8"]
    later = decide(with_status(packs(2), first.status), ClusterSnapshot((node("gpu-8", 8),) + ONE_GPU_NODES), NOW)
    assert [pinned_node(s) for s in statefulsets(later).values()] == ["gpu-8", "gpu-8"]


def test_packs_beyond_the_free_gpus_wait_and_say_so():
    decision = decide(packs(3), ClusterSnapshot(ONE_GPU_NODES), NOW)
    assert list(statefulsets(decision)) == ["chat", "chat-pack-1"]
    placed = condition(decision, "Placed")
    assert (placed.status, placed.reason) == ("False", "NoFreeGPU") and "chat-pack-2" in placed.message
    assert decision.retry_after_seconds == 30 and decision.status.current_packs == 2


def stored_statefulset(name: str, controller_uid: str | None = "d-1") -> dict:
    owners = [{"apiVersion": "slmpack.dev/v1alpha1", "kind": "SLMDeployment", "name": "chat", "uid": controller_uid,
               "controller": True}] if controller_uid else []
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name, "namespace": "team", "uid": name, "ownerReferences": owners}}


def test_a_router_or_network_policy_of_another_controller_is_not_adopted():
    """Server-side apply would take over a same-named object that carries the deployment's labels: the router
    Deployment or the engines' NetworkPolicy of someone else is refused by name instead."""
    for kind, name, spec in (("Deployment", "chat-router", {}),
                             ("NetworkPolicy", "chat-engines", {"networkPolicy": {"allowFrom": [{}]}})):
        foreign = {**stored_statefulset(name, controller_uid="someone-else"), "kind": kind}
        snapshot = ClusterSnapshot(ONE_GPU_NODES, routers=(foreign,) if kind == "Deployment" else (),
                                   network_policies=(foreign,) if kind == "NetworkPolicy" else ())
        refused = condition(decide(packs(1, **spec), snapshot, NOW), "InvalidSpec")
        assert refused.status == "True" and f"{kind} {name} in team" in refused.message
        ours = {**stored_statefulset(name), "kind": kind}
        kept = ClusterSnapshot(ONE_GPU_NODES, routers=(ours,) if kind == "Deployment" else (),
                               network_policies=(ours,) if kind == "NetworkPolicy" else ())
        assert condition(decide(packs(1, **spec), kept, NOW), "InvalidSpec").status == "False"


def test_scaling_in_deletes_the_statefulset_of_the_pack_that_leaves():
    old = [stored_statefulset(n) for n in ("chat", "chat-pack-1")]
    decision = decide(packs(1), ClusterSnapshot(ONE_GPU_NODES, statefulsets=tuple(old)), NOW)
    assert list(statefulsets(decision)) == ["chat"]
    assert [o["metadata"]["name"] for o in decision.delete] == ["chat-pack-1"]
    assert "PackRemoved" in [e.reason for e in decision.events]


def test_cpu_replicas_start_together_but_a_pack_made_before_keeps_its_immutable_policy():
    cpu = packs(2, model={"name": "/models/SmolLM2-135M-Instruct"}, engine={"device": "cpu"})
    fresh = statefulsets(decide(cpu, ClusterSnapshot(ONE_GPU_NODES), NOW))
    assert [s["spec"]["podManagementPolicy"] for s in fresh.values()] == ["Parallel", "Parallel"]
    gpu = statefulsets(decide(packs(1), ClusterSnapshot(ONE_GPU_NODES), NOW))
    assert gpu["chat"]["spec"]["podManagementPolicy"] == "OrderedReady"
    # The apiserver refuses a change of the policy: a pack from before keeps OrderedReady, a new one is Parallel.
    old = {**stored_statefulset("chat"), "spec": {"podManagementPolicy": "OrderedReady"}}
    kept = statefulsets(decide(cpu, ClusterSnapshot(ONE_GPU_NODES, statefulsets=(old,)), NOW))
    assert [s["spec"]["podManagementPolicy"] for s in kept.values()] == ["OrderedReady", "Parallel"]


def test_a_statefulset_with_the_deployments_labels_but_another_controller_is_neither_deleted_nor_adopted():
    # Labels can be copied by anyone who may create a StatefulSet there; the controller reference cannot.
    copied = [stored_statefulset("chat-pack-1", controller_uid="someone-else"), stored_statefulset("chat-pack-2", None)]
    decision = decide(packs(1), ClusterSnapshot(ONE_GPU_NODES, statefulsets=tuple(copied)), NOW)
    assert decision.delete == [] and "PackRemoved" not in [e.reason for e in decision.events]
    taken = decide(packs(2), ClusterSnapshot(ONE_GPU_NODES, statefulsets=tuple(copied)), NOW)
    refused = condition(taken, "InvalidSpec")
    assert refused.status == "True" and "StatefulSet chat-pack-1 in team" in refused.message
    assert "not controlled by it" in refused.message and not statefulsets(taken)


def test_an_object_of_a_wanted_name_that_applying_found_not_ours_is_refused_and_looked_at_again():
    # Without the deployment's labels no watch shows it: the shell finds it when applying, and says so.
    taken = ClusterSnapshot(ONE_GPU_NODES, names_taken=(("Service", "chat"), ("ConfigMap", "unrelated")))
    decision = decide(packs(1), taken, NOW)
    refused = condition(decision, "InvalidSpec")
    assert refused.status == "True" and "Service chat in team exists but is not controlled by it" in refused.message
    assert "ConfigMap" not in refused.message  # a name the deployment does not want is none of its business
    assert decision.apply == [] and decision.retry_after_seconds == 30  # it may be deleted, unseen
    assert condition(decide(packs(1), ClusterSnapshot(ONE_GPU_NODES), NOW), "InvalidSpec").status == "False"


def test_each_pack_reports_its_gpu_and_readiness_and_two_packs_on_one_gpu_are_flagged():
    def pod(name, uuid, ready=True):
        return ReplicaState(name=name, ready=ready, node="gpu-8", gpu_uuids=(uuid,))

    apart = (pod("chat-0", "GPU-a"), pod("chat-1", "GPU-a"), pod("chat-pack-1-0", "GPU-b"),
             pod("chat-pack-1-1", "GPU-b", ready=False))
    decision = decide(packs(2), ClusterSnapshot((node("gpu-8", 8),), pods=apart), NOW)
    assert [(p.gpu_uuids, p.ready_replicas) for p in decision.status.packs] == [(["GPU-a"], 2), (["GPU-b"], 1)]
    assert condition(decision, "OneGPU").status == "True"
    together = apart[:3] + (pod("chat-pack-1-1", "GPU-a"),)
    shared = condition(decide(packs(2), ClusterSnapshot((node("gpu-8", 8),), pods=together), NOW), "OneGPU")
    assert (shared.status, shared.reason) == ("False", "PacksShareAGPU") and "GPU-a" in shared.message


def profiled(**spec) -> tuple[dict, ClusterSnapshot]:
    profile = yaml.safe_load((DATA / "profiles" / "smollm2-360m-h100.yaml").read_text())
    profile["metadata"].update(namespace="team", uid="p-1")
    body = deployment(profiling={"profileRef": "smollm2-360m-h100"}, gpu={"product": "NVIDIA-H100-80GB-HBM3"},
                      **spec)
    return body, ClusterSnapshot(ONE_GPU_NODES, (profile,))


def test_autoscaling_starts_with_one_replica_and_looks_again_every_period():
    body, cluster = profiled(autoscaling={"maxPacks": 2, "periodSeconds": 20})
    decision = decide(body, cluster, NOW)
    assert [s["spec"]["replicas"] for s in statefulsets(decision).values()] == [1]
    assert decision.status.autoscaling.replicas == 1 and decision.retry_after_seconds == 20
    assert decision.scaling.reason == "MetricsUnavailable"


def test_a_busy_autoscaled_pack_fills_its_gpu_then_takes_another_with_an_event_each_time():
    body, cluster = profiled(autoscaling={"maxPacks": 2})
    first = decide(body, cluster, NOW)
    per_pack = first.status.plan.replicas
    knee = first.status.plan.knee_batch_size
    assert per_pack > 1, "the profile fits several replicas on one GPU"
    busy = ClusterSnapshot(cluster.nodes, cluster.profiles, pods=(ReplicaState("chat-0", True),),
                           engine_loads=(EngineLoad("chat-0", running=knee, waiting=knee),))
    grown = decide(with_status(body, first.status), busy, NOW + timedelta(seconds=15))
    assert grown.scaling.direction == "up" and grown.scaling.reason == "PackHasFreeSlots"
    assert [s["spec"]["replicas"] for s in statefulsets(grown).values()] == layout(grown.status.autoscaling.replicas,
                                                                                   per_pack)
    assert len(statefulsets(grown)) == 1 and "ScaledUp" in [e.reason for e in grown.events]
    # Full and at the knee: the next replica takes the second GPU.
    full = with_status(body, grown.status)
    full["status"]["autoscaling"]["replicas"] = per_pack
    names = [f"chat-{i}" for i in range(per_pack)]
    at_knee = ClusterSnapshot(cluster.nodes, cluster.profiles, pods=tuple(ReplicaState(n, True) for n in names),
                              engine_loads=tuple(EngineLoad(n, running=knee, waiting=0) for n in names))
    wider = decide(full, at_knee, NOW + timedelta(seconds=30))
    assert wider.scaling.reason == "AllPacksAtKnee"
    assert [pinned_node(s) for s in statefulsets(wider).values()] == ["gpu-b", "gpu-a"]
    assert wider.status.current_packs == 2


def test_on_dra_each_pack_gets_its_own_claim_and_the_scheduler_picks_its_node():
    from tests.unit.test_dra import cluster, stored_deployment, stored_profile

    decision = decide(stored_deployment(packs=2), cluster(profiles=(stored_profile(),)), NOW)
    claims = [o["metadata"]["name"] for o in decision.create if o["kind"] == "ResourceClaim"]
    assert len(set(claims)) == 2
    named = [s["spec"]["template"]["spec"]["resourceClaims"][0]["resourceClaimName"]
             for s in statefulsets(decision).values()]
    assert named == claims
    assert not any("kubernetes.io/hostname" in s["spec"]["template"]["spec"]["nodeSelector"]
                   for s in statefulsets(decision).values())
    assert decision.delete == []


def test_the_scaling_examples_target_the_scale_subresource_and_the_autoscaling_example_is_valid():
    root = DATA.parents[1]
    crd = yaml.safe_load((root / "crds" / "slmdeployments.slmpack.dev.yaml").read_text())
    scale = crd["spec"]["versions"][0]["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.packs"
    hpa = yaml.safe_load((root / "examples" / "scaling" / "hpa.yaml").read_text())
    keda = yaml.safe_load((root / "examples" / "scaling" / "keda-scaledobject.yaml").read_text())
    for scaler in (hpa, keda):
        assert scaler["spec"]["scaleTargetRef"]["kind"] == "SLMDeployment"
        assert scaler["spec"]["scaleTargetRef"]["apiVersion"] == "slmpack.dev/v1alpha1"
    body = yaml.safe_load((root / "examples" / "slmdeployment-autoscaling.yaml").read_text())
    body["metadata"].update(namespace="team", uid="d-1")
    decision = decide(body, ClusterSnapshot(ONE_GPU_NODES), NOW)
    assert condition(decision, "InvalidSpec").status == "False"


def test_a_queue_at_the_routers_adds_replicas_once_it_has_lasted_a_period():
    """The engines, capped at their knee by the routers, show no demand beyond it: the routers' queue does. A
    queue seen once (a burst the engines absorb) adds nothing; one still there a period later does."""
    body, cluster = profiled(autoscaling={"maxPacks": 2, "periodSeconds": 15})
    first = decide(body, cluster, NOW)
    knee = first.status.plan.knee_batch_size
    queued = ClusterSnapshot(cluster.nodes, cluster.profiles, pods=(ReplicaState("chat-0", True),),
                             engine_loads=(EngineLoad("chat-0", running=knee * 8 // 10, waiting=0),  # on target
                                           EngineLoad("chat-router-a", running=0, waiting=3 * knee)),
                             router_pods=("chat-router-a",))
    seen = decide(with_status(body, first.status), queued, NOW + timedelta(seconds=15))
    assert seen.scaling.direction == "none" and seen.status.autoscaling.queued_since == NOW + timedelta(seconds=15)
    lasting = decide(with_status(body, seen.status), queued, NOW + timedelta(seconds=30))
    assert lasting.scaling.direction == "up" and "queued at the router" in lasting.scaling.message
    assert lasting.status.autoscaling.queued_since == NOW + timedelta(seconds=15)
    drained = ClusterSnapshot(cluster.nodes, cluster.profiles, pods=queued.pods,
                              engine_loads=queued.engine_loads[:1], router_pods=queued.router_pods)
    assert decide(with_status(body, seen.status), drained, NOW + timedelta(seconds=30)).status.autoscaling \
        .queued_since is None
