"""The operator's whole decision, pure: a deployment and a cluster snapshot in, objects, status and Events out."""

from datetime import UTC, datetime
from pathlib import Path

import yaml

from slmpack.core.conditions import ReplicaState
from slmpack.core.decide import ClusterSnapshot, Event, ProfilingJob, decide, with_status
from slmpack.core.validation import GPUNode

NOW = datetime(2026, 1, 1, tzinfo=UTC)
DATA = Path(__file__).resolve().parents[1] / "data"
H100 = GPUNode("gpu-a", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.replicas": "1",
                         "nvidia.com/gpu.sharing-strategy": "mps", "nvidia.com/gpu.memory": "81559",
                         "nvidia.com/gpu.count": "1"}, {"nvidia.com/gpu": 1})


def deployment(**spec) -> dict:
    return {"apiVersion": "slmpack.dev/v1alpha1", "kind": "SLMDeployment",
            "metadata": {"name": "chat", "namespace": "team", "uid": "d-1", "generation": 3},
            "spec": {"model": {"name": "HuggingFaceTB/SmolLM2-360M-Instruct", "dtype": "bfloat16",
                               "maxModelLen": 4096},
                     "profiling": {"workload": {"inputTokens": 512, "outputTokens": 256}}, **spec}}


def kinds(objects) -> list[str]:
    return [o["kind"] for o in objects]


def condition(decision, type_):
    return next(c for c in decision.status.conditions if c.type == type_)


def test_a_refused_spec_creates_nothing_and_says_which_field_to_fix():
    decision = decide(deployment(profiling={"minBatchSize": 64, "maxBatchSize": 8}), ClusterSnapshot((H100,)), NOW)
    assert decision.apply == decision.create == []
    refused = condition(decision, "InvalidSpec")
    assert refused.status == "True" and refused.message.startswith("spec.profiling.minBatchSize")
    assert refused.observed_generation == 3
    assert decision.status.phase.value == "Failed"
    assert [e.reason for e in decision.events] == ["InvalidSpec"] and decision.events[0].warning
    assert decision.retry_after_seconds is None


def test_a_valid_spec_is_no_news_until_it_follows_a_refused_one():
    first = decide(deployment(), ClusterSnapshot((H100,)), NOW)
    assert condition(first, "InvalidSpec").reason == "SpecValid"
    assert "SpecValid" not in [e.reason for e in first.events]  # one request fewer per new deployment
    refused = decide(deployment(profiling={"minBatchSize": 64, "maxBatchSize": 8}), ClusterSnapshot((H100,)), NOW)
    fixed = decide(with_status(deployment(), refused.status), ClusterSnapshot((H100,)), NOW)
    assert "SpecValid" in [e.reason for e in fixed.events]


def test_no_matching_node_is_retried_later():
    decision = decide(deployment(gpu={"product": "NVIDIA-A100"}), ClusterSnapshot((H100,)), NOW)
    assert decision.create == [] and decision.retry_after_seconds == 30
    assert "no node offers" in condition(decision, "InvalidSpec").message


def test_without_a_profile_it_creates_one_then_its_job_once_the_profile_exists():
    first = decide(deployment(), ClusterSnapshot((H100,)), NOW)
    assert kinds(first.create) == ["SLMProfile"] and first.apply == []
    assert "ProfileCreated" in [e.reason for e in first.events]
    profile = {**first.create[0], "metadata": {**first.create[0]["metadata"], "uid": "p-1"}}
    second = decide(with_status(deployment(), first.status), ClusterSnapshot((H100,), (profile,)), NOW)
    assert kinds(second.create) == ["ServiceAccount", "RoleBinding", "Job"]
    assert second.create[2]["metadata"]["ownerReferences"][0]["uid"] == "p-1"
    assert second.status.phase.value == "Profiling"
    # Once the Job exists, nothing more is created, and an unchanged condition posts no Event again.
    job = ProfilingJob(name=second.create[2]["metadata"]["name"])
    third = decide(with_status(deployment(), second.status), ClusterSnapshot((H100,), (profile,), (job,)), NOW)
    assert third.create == [] and third.events == []


def test_a_failed_profiling_job_is_reported_with_its_reason_and_the_fix():
    created = decide(deployment(), ClusterSnapshot((H100,)), NOW).create[0]
    profile = {**created, "metadata": {**created["metadata"], "uid": "p-1"}, "status": {"phase": "Profiling"}}
    job = ProfilingJob(name=f"profile-{created['metadata']['name']}", failed=True,
                       failure_message="Job has reached the specified backoff limit")
    decision = decide(deployment(), ClusterSnapshot((H100,), (profile,), (job,)), NOW)
    failed = condition(decision, "ProfileReady")
    assert failed.reason == "ProfilingFailed" and "backoff limit" in failed.message
    assert f"Delete SLMProfile {created['metadata']['name']}" in failed.message
    assert decision.create == [] and decision.status.phase.value == "Failed"


def test_a_ready_profile_places_the_pack():
    profile = yaml.safe_load((DATA / "profiles" / "smollm2-360m-h100.yaml").read_text())
    profile["metadata"].update(namespace="team", uid="p-1")
    decision = decide(deployment(profiling={"profileRef": "smollm2-360m-h100"}), ClusterSnapshot((H100,), (profile,)),
                      NOW)
    assert kinds(decision.apply) == ["Service", "PodDisruptionBudget", "ServiceAccount", "RoleBinding", "Service",
                                     "ConfigMap", "Deployment", "PodDisruptionBudget", "StatefulSet"]
    assert decision.create == []
    assert condition(decision, "Placed").status == "True"
    assert decision.status.endpoint == "http://chat.team.svc:8000/v1"
    assert decision.profiling_seconds is None


def test_the_same_snapshot_gives_the_same_decision():
    snapshot = ClusterSnapshot((H100,))
    assert decide(deployment(), snapshot, NOW) == decide(deployment(), snapshot, NOW)


def node(name, gpus, replicas=4) -> GPUNode:
    return GPUNode(name, {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-SHARED", "nvidia.com/gpu.memory": "81559",
                          "nvidia.com/gpu.replicas": str(replicas), "nvidia.com/gpu.sharing-strategy": "mps",
                          "nvidia.com/gpu.count": str(gpus)}, {"nvidia.com/gpu": gpus * replicas})


def pod(name, *uuids, ready=True) -> ReplicaState:
    return ReplicaState(name=name, ready=ready, node="gpu-8", gpu_uuids=uuids)


def fixed(replicas=2) -> dict:
    return deployment(replicas=replicas, gpu={"product": "NVIDIA-H100-80GB-HBM3"})


def test_a_node_with_one_gpu_is_preferred_because_it_guarantees_one_gpu_per_pack():
    decision = decide(fixed(), ClusterSnapshot((node("gpu-8", 8, replicas=7), node("gpu-1", 1))), NOW)
    assert "on node gpu-1" in condition(decision, "Placed").message
    guaranteed = condition(decision, "OneGPU")
    assert (guaranteed.status, guaranteed.reason) == ("True", "SingleGPUNode")


def test_on_a_multi_gpu_node_one_gpu_is_not_claimed_until_every_replica_reports_the_same_uuid():
    cluster = ClusterSnapshot((node("gpu-8", 8),))
    waiting = decide(fixed(), cluster, NOW)
    assert (condition(waiting, "OneGPU").status, condition(waiting, "OneGPU").reason) == ("Unknown", "NotVerified")
    one = decide(fixed(), ClusterSnapshot(cluster.nodes, pods=(pod("chat-0", "GPU-a"), pod("chat-1", "GPU-a"))), NOW)
    assert (condition(one, "OneGPU").status, condition(one, "OneGPU").reason) == ("True", "OnOneGPU")
    assert [(r.name, r.gpu_uuids) for r in one.status.replica_gpus] == [("chat-0", ["GPU-a"]), ("chat-1", ["GPU-a"])]
    assert one.status.to_wire()["replicaGPUs"][0] == {"name": "chat-0", "node": "gpu-8", "gpuUUIDs": ["GPU-a"]}


def test_one_gpu_is_judged_from_where_the_engines_run_not_only_from_the_slots_they_hold():
    from dataclasses import replace

    cluster = ClusterSnapshot((node("gpu-8", 8),))
    # Both hold slots on GPU-a and their processes run there: one GPU, as the plugin's bookkeeping says.
    there = (replace(pod("chat-0", "GPU-a"), running_gpu_uuids=("GPU-a",)),
             replace(pod("chat-1", "GPU-a"), running_gpu_uuids=("GPU-a",)))
    assert condition(decide(fixed(), replace(cluster, pods=there), NOW), "OneGPU").reason == "OnOneGPU"
    # chat-1 holds a slot on GPU-b but, unpinned, runs on GPU-a: the slots alone would say "split".
    astray = (there[0], replace(pod("chat-1", "GPU-b"), running_gpu_uuids=("GPU-a",)))
    off = condition(decide(fixed(), replace(cluster, pods=astray), NOW), "OneGPU")
    assert (off.status, off.reason) == ("False", "RunsOffItsGPU")
    assert "chat-1 was given GPU-b but runs on GPU-a" in off.message and "slmpack engine" in off.message


def test_a_split_pack_is_a_condition_with_a_reason_a_warning_event_and_the_fix():
    split = decide(fixed(), ClusterSnapshot((node("gpu-8", 8),), pods=(pod("chat-0", "GPU-a"), pod("chat-1", "GPU-b"))),
                   NOW)
    one_gpu = condition(split, "OneGPU")
    assert (one_gpu.status, one_gpu.reason) == ("False", "SplitAcrossGPUs")
    assert "chat-0 on GPU-a; chat-1 on GPU-b" in one_gpu.message and "placement dra" in one_gpu.message
    assert Event("SplitAcrossGPUs", one_gpu.message, warning=True) in split.events
    assert split.status.phase.value == "Degraded"
    # Reported once: the same split on the next decision posts no second Event.
    again = decide(with_status(fixed(), split.status), ClusterSnapshot((node("gpu-8", 8),), pods=(
        pod("chat-0", "GPU-a"), pod("chat-1", "GPU-b"))), NOW)
    assert [e for e in again.events if e.reason == "SplitAcrossGPUs"] == []


def test_a_profile_that_does_not_fit_the_nodes_share_is_refused_before_the_pack_is_created():
    profile = yaml.safe_load((DATA / "profiles" / "smollm2-360m-h100.yaml").read_text())
    profile["metadata"].update(namespace="team", uid="p-1")
    profile["status"]["memory"]["weightsMib"] = 30000
    decision = decide(deployment(profiling={"profileRef": "smollm2-360m-h100"}),
                      ClusterSnapshot((node("gpu-1", 1),), (profile,)), NOW)
    assert decision.apply == []
    refused = condition(decision, "InvalidSpec")
    assert refused.status == "True" and refused.message.startswith("spec.model: 30000 MiB of weights")
    assert [e.reason for e in decision.events if e.warning] == ["InvalidSpec"]


def test_on_a_node_that_does_not_share_its_gpus_the_pack_is_one_replica_and_says_so():
    unshared = GPUNode("gpu-n", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.replicas": "1",
                                 "nvidia.com/gpu.sharing-strategy": "none", "nvidia.com/gpu.count": "8"},
                       {"nvidia.com/gpu": 8})
    decision = decide(fixed(1), ClusterSnapshot((unshared,)), NOW)
    assert "1 replica(s) on node gpu-n on a whole GPU (the node does not share its GPUs)" in \
        condition(decision, "Placed").message
    assert condition(decision, "OneGPU").reason == "SingleReplica"


def test_cpu_auto_dtype_follows_the_nodes_cpu_as_node_feature_discovery_labels_it():
    def profiled_dtype(labels):
        node = GPUNode("cpu-a", {**H100.labels, **labels}, {"nvidia.com/gpu": 1})
        cpu = deployment(model={"name": "/models/SmolLM2-135M-Instruct"}, engine={"device": "cpu"})
        (profile,) = decide(cpu, ClusterSnapshot((node,)), NOW).create
        return profile["spec"]["conditions"]["dtype"]

    nfd = "feature.node.kubernetes.io/cpu-cpuid."
    assert profiled_dtype({f"{nfd}AVX512F": "true", f"{nfd}AVX512BF16": "true"}) == "bfloat16"
    assert profiled_dtype({f"{nfd}AMXBF16": "true"}) == "bfloat16"
    assert profiled_dtype({f"{nfd}AVX2": "true"}) == "float32"  # no native bfloat16: it hardly batches
    assert profiled_dtype({}) == "float32"  # without NFD, the safe choice


def shared_profile() -> dict:
    """The operator's own profile, measured without an SLO on a recorded H100 curve, its counts at its knee."""
    from slmpack.api.models import ReplicationPoint, SLMProfileStatus
    from slmpack.core import profile_status
    from slmpack.core.knee import find_knee

    from .curves import load_curve

    points = load_curve("qwen2.5-0.5b-h100")
    knee = find_knee(points)
    runs = {1: [9000, 9100, 8900], 2: [12000, 12100, 11900]}
    status = SLMProfileStatus(
        points=points, knee=knee, conditions=profile_status.measured([], "measured", NOW),
        replication=[ReplicationPoint(replicas=k, batch_size_per_replica=knee.batch_size,
                                      offered_concurrency=2 * knee.batch_size, runs_tokens_per_s=r,
                                      aggregate_throughput_tokens_per_s=sum(r) / 3, p99_itl_ms=30)
                     for k, r in runs.items()])
    status.phase = profile_status.derive_phase(status.conditions)
    created = decide(deployment(), ClusterSnapshot((H100,)), NOW).create[0]
    return {**created, "metadata": {**created["metadata"], "uid": "p-1"}, "status": status.to_wire()}


def test_a_stricter_slo_extends_the_shared_profile_while_its_users_keep_it():
    from slmpack.api.models import ProfilingSpec, SLMProfileStatus
    from slmpack.core.replication import missing_measurements

    profile = shared_profile()
    relaxed = decide(deployment(), ClusterSnapshot((H100,), (profile,)), NOW)
    assert "StatefulSet" in kinds(relaxed.apply)
    knee = SLMProfileStatus.from_stored(profile["status"]).knee.batch_size
    strict_slo = {"workload": {"inputTokens": 512, "outputTokens": 256}, "slo": {"p99ItlMs": 20}}
    lacking = missing_measurements(SLMProfileStatus.from_stored(profile["status"]),
                                   ProfilingSpec.model_validate(strict_slo))
    assert lacking and ("batch" in lacking)
    strict = decide(deployment(profiling=strict_slo), ClusterSnapshot((H100,), (profile,)), NOW)
    job = strict.create[-1]
    assert kinds(strict.create) == ["ServiceAccount", "RoleBinding", "Job"] and strict.apply == []
    assert job["metadata"]["name"].startswith(f"profile-{profile['metadata']['name']}-for-")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--slo-p99-itl-ms") + 1] == "20"
    extending = condition(strict, "ProfileReady")
    assert extending.reason == "ProfileExtending" and "lacks" in extending.message
    # One Job per policy: the next look finds it and creates nothing.
    running = ProfilingJob(name=job["metadata"]["name"])
    again = decide(with_status(deployment(profiling=strict_slo), strict.status),
                   ClusterSnapshot((H100,), (profile,), (running,)), NOW)
    assert again.create == []
    # An extension that failed is said, and the deployment places from what the profile has.
    failed = ProfilingJob(name=job["metadata"]["name"], failed=True, failure_message="BackoffLimitExceeded")
    placed = decide(deployment(profiling=strict_slo), ClusterSnapshot((H100,), (profile,), (failed,)), NOW)
    assert "StatefulSet" in kinds(placed.apply)
    warning = condition(placed, "ProfileReady")
    assert warning.reason == "ProfileExtensionFailed" and "BackoffLimitExceeded" in warning.message
    assert placed.status.plan.knee_batch_size < knee


def test_a_profile_with_a_knee_but_no_curve_is_taken_as_it_is():
    from slmpack.api.models import ProfilingSpec, SLMProfileStatus
    from slmpack.core.replication import missing_measurements

    recorded = yaml.safe_load((DATA / "profiles" / "smollm2-360m-h100.yaml").read_text())["status"]
    assert not recorded.get("points")
    strict = ProfilingSpec.model_validate({"slo": {"p99ItlMs": 5}})
    assert missing_measurements(SLMProfileStatus.from_stored(recorded), strict) is None


def test_the_profilers_binding_is_named_for_the_release_role_so_a_reinstall_binds_anew():
    profile = {**decide(deployment(), ClusterSnapshot((H100,)), NOW).create[0]}
    profile["metadata"] = {**profile["metadata"], "uid": "p-1"}
    bindings = {}
    for role in ("old-slmpack-profiler", "new-slmpack-profiler"):
        created = decide(deployment(), ClusterSnapshot((H100,), (profile,)), NOW, profiler_cluster_role=role).create
        [binding] = [o for o in created if o["kind"] == "RoleBinding"]
        bindings[binding["metadata"]["name"]] = binding["roleRef"]["name"]
    # A roleRef cannot change: a binding of the same name to the old role would refuse the new one (409).
    assert bindings == {"old-slmpack-profiler": "old-slmpack-profiler", "new-slmpack-profiler": "new-slmpack-profiler"}


def test_a_replica_the_scheduler_cannot_place_is_named_with_the_schedulers_reason():
    cluster = ClusterSnapshot((node("gpu-8", 8),))
    reason = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    waiting = ReplicaState("chat-1", ready=False, unschedulable=reason)
    decision = decide(fixed(), ClusterSnapshot(cluster.nodes, pods=(pod("chat-0", "GPU-a"), waiting)), NOW)
    available = condition(decision, "Available")
    assert (available.status, available.reason) == ("False", "ReplicaUnschedulable")
    assert available.message == f"1/2 replicas ready; replica chat-1 waits for a node: {reason}"
    assert decision.status.phase.value == "Deploying"  # slots that stopping pods hold come free
    assert [e.warning for e in decision.events if e.reason == "ReplicaUnschedulable"] == [True]
    # A failing replica says more than a waiting one.
    crashing = ReplicaState("chat-0", ready=False, waiting_reason="CrashLoopBackOff", restarts=3)
    assert condition(decide(fixed(), ClusterSnapshot(cluster.nodes, pods=(crashing, waiting)), NOW),
                     "Available").reason == "ReplicaFailing"
