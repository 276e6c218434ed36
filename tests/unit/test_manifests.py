"""Manifest builders: what the cluster is asked to run."""

from datetime import UTC, datetime, timedelta

from slmpack.api.models import Plan, SLMDeploymentSpec
from slmpack.core.conditions import (
    AVAILABLE,
    INVALID_SPEC,
    PLACED,
    PROFILE_READY,
    derive_phase,
    set_condition,
)
from slmpack.core.manifests import (
    Owner,
    build_profiling_job,
    build_service,
    build_statefulset,
    profile_conditions,
    profile_name,
)
from slmpack.core.validation import GPUNode

OWNER = Owner(kind="SLMDeployment", name="chat", uid="u-1", namespace="team")
NODE = GPUNode("gpu-node-1", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-SHARED",
                              "nvidia.com/gpu.replicas": "4", "nvidia.com/gpu.sharing-strategy": "mps",
                              "nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "1"}, {"nvidia.com/gpu": 4})
PLAN = Plan(knee_batch_size=64, replicas=3, max_num_seqs=64, gpu_memory_utilization=0.3,
            memory_per_replica_mib=24467, mps_active_thread_percentage=34, mps_pinned_memory_limit_mib=24467)


def spec(**overrides) -> SLMDeploymentSpec:
    return SLMDeploymentSpec.model_validate({"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                                             "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}, **overrides})


def engine(statefulset):
    return statefulset["spec"]["template"]["spec"]["containers"][0]


def test_statefulset_packs_replicas_on_one_node_and_starts_them_in_order():
    sts = build_statefulset(OWNER, spec(), PLAN, node=NODE)
    pod = sts["spec"]["template"]["spec"]
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "OrderedReady"
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": "gpu-node-1"}
    # GFD labels a shared GPU's product X-SHARED: the affinity matches both forms, and the sharing it was sized for.
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        {"matchExpressions": [
            {"key": "nvidia.com/gpu.product", "operator": "In",
             "values": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-80GB-HBM3-SHARED"]},
            {"key": "nvidia.com/gpu.sharing-strategy", "operator": "In", "values": ["mps"]},
            {"key": "nvidia.com/gpu.replicas", "operator": "In", "values": ["4"]},
            {"key": "nvidia.com/gpu.memory", "operator": "In", "values": ["81559"]}]}]
    args = engine(sts)["args"]
    assert args[args.index("--max-num-seqs") + 1] == "64"
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.3"
    assert engine(sts)["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    # The MPS limits are the daemon's defaults, which clients get without asking: no CUDA_MPS_* env.
    assert not [e for e in engine(sts)["env"] if e["name"].startswith("CUDA_MPS_")]
    assert engine(sts)["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert sts["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_pods_run_non_root_under_seccomp_with_no_capabilities():
    sts = build_statefulset(OWNER, spec(), PLAN, node=None)
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert engine(sts)["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                              "capabilities": {"drop": ["ALL"]}}


def test_cpu_mode_sets_the_kv_cache_space_and_no_gpu_flags():
    cpu_plan = PLAN.model_copy(update={"gpu_memory_utilization": None, "mps_active_thread_percentage": None,
                                       "mps_pinned_memory_limit_mib": None})
    sts = build_statefulset(OWNER, spec(engine={"device": "cpu", "cpuKvCacheSpaceGib": 2}), cpu_plan, None)
    assert {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "2"} in engine(sts)["env"]
    assert "--gpu-memory-utilization" not in engine(sts)["args"]
    assert engine(sts)["image"] == "slmpack/engine-cpu:0.1.0"
    # No measured thread count: unbound all the same, or every replica's threads would be pinned to core 0.
    env = {e["name"]: e["value"] for e in engine(sts)["env"]}
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and "OMP_NUM_THREADS" not in env
    assert not {"VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS"} & {e["name"] for e in engine(
        build_statefulset(OWNER, spec(), PLAN, None))["env"]}


def test_service_selects_the_engine_pods():
    service = build_service(OWNER, spec())
    sts = build_statefulset(OWNER, spec(), PLAN, None)
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["port"] == 8000


def test_profile_key_ignores_the_deployment_but_not_the_workload():
    a = profile_conditions(spec(), 81559)
    b = profile_conditions(spec(port=9000, replicas="auto"), 81559)
    c = profile_conditions(spec(profiling={"workload": {"inputTokens": 1024}}), 81559)
    assert a.key() == b.key() != c.key()
    assert profile_name(a).startswith("smollm2-135m-instruct-")


def test_profiling_job_requests_one_slot_as_a_replica_does_and_writes_the_profile():
    profiled = spec(profiling={"maxBatchSize": 64}, resources={"limits": {"memory": "6Gi", "cpu": "2"}})
    conditions = profile_conditions(profiled, 81559)
    owner = Owner(kind="SLMProfile", name=profile_name(conditions), uid="p-1", namespace="team")
    job = build_profiling_job(owner, conditions, profiled, NODE)
    container = job["spec"]["template"]["spec"]["containers"][0]
    # Up to maxReplicas engines run in the Job's one pod: one replica's memory limit would kill them.
    # One slot: the device plugin refuses more than one under MPS.
    assert container["resources"]["limits"] == {"cpu": "2", "nvidia.com/gpu": "1"}
    assert container["args"][container["args"].index("--write-profile") + 1] == f"team/{owner.name}"
    assert container["args"][container["args"].index("--max-batch") + 1] == "64"
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "slmpack-profiler"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "SLMProfile"


def test_phase_is_derived_from_conditions_and_transition_times_hold():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    conditions = set_condition([], PROFILE_READY, False, "Profiling", "sweeping", t0)
    assert derive_phase(conditions).value == "Profiling"
    conditions = set_condition(conditions, PROFILE_READY, True, "ProfileMeasured", "", t0 + timedelta(1))
    conditions = set_condition(conditions, PLACED, True, "StatefulSetApplied", "", t0 + timedelta(1))
    assert derive_phase(conditions).value == "Deploying"
    again = set_condition(conditions, PLACED, True, "StatefulSetApplied", "", t0 + timedelta(2))
    assert [c.last_transition_time for c in again if c.type == PLACED] == [t0 + timedelta(1)]
    ready = set_condition(conditions, AVAILABLE, True, "ReplicasReady", "", t0)
    assert derive_phase(ready).value == "Ready"
    degraded = set_condition(conditions, AVAILABLE, False, "ReplicaFailing", "OOMKilled", t0)
    assert derive_phase(degraded).value == "Degraded"
    assert derive_phase(set_condition(ready, INVALID_SPEC, True, "X", "", t0)).value == "Failed"


def test_mps_clients_leave_dev_shm_to_the_mps_server_and_others_get_their_own():
    def shm(obj):
        pod = (obj["spec"]["template"]["spec"])
        return [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]

    sliced = GPUNode("ts", {"nvidia.com/gpu.sharing-strategy": "time-slicing"}, {"nvidia.com/gpu": 4})
    conditions = profile_conditions(spec(), 81559)
    job_owner = Owner(kind="SLMProfile", name="p", uid="p-1", namespace="team")
    # Under the plugin's MPS the plugin mounts the node's MPS shm at /dev/shm; an emptyDir would hide it.
    assert shm(build_statefulset(OWNER, spec(), PLAN, NODE)) == []
    assert shm(build_profiling_job(job_owner, conditions, spec(), NODE)) == []
    assert shm(build_statefulset(OWNER, spec(placement="dra"), PLAN, None)) == []
    assert shm(build_statefulset(OWNER, spec(sharing="time-slicing"), PLAN, sliced)) != []
    assert shm(build_statefulset(OWNER, spec(engine={"device": "cpu"}), PLAN, NODE)) != []


def test_a_known_kv_cache_size_is_passed_in_bytes():
    sized = PLAN.model_copy(update={"kv_cache_memory_bytes": 17179869184})
    args = engine(build_statefulset(OWNER, spec(), sized, NODE))["args"]
    assert args[args.index("--kv-cache-memory-bytes") + 1] == "17179869184"
    assert "--kv-cache-memory-bytes" not in engine(build_statefulset(OWNER, spec(), PLAN, NODE))["args"]


def test_the_engine_cache_is_one_volume_for_the_profiling_job_and_the_replicas():
    cached = spec(engine={"cache": {"hostPath": "/var/lib/slmpack/engine-cache"}})
    conditions = profile_conditions(cached, 81559, 4)
    job_pod = build_profiling_job(OWNER, conditions, cached, NODE)["spec"]["template"]["spec"]
    replica_pod = build_statefulset(OWNER, cached, PLAN, NODE)["spec"]["template"]["spec"]
    for pod in (job_pod, replica_pod):
        (volume,) = [v for v in pod["volumes"] if v["name"] == "engine-cache"]
        # Must exist: a directory the kubelet made would be root's, and the engine could not write it.
        assert volume["hostPath"] == {"path": "/var/lib/slmpack/engine-cache", "type": "Directory"}
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "engine-cache"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["VLLM_CACHE_ROOT"].startswith(mount["mountPath"] + "/") and not mount.get("readOnly")
        assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(mount["mountPath"] + "/")
        assert "VLLM_USE_AOT_COMPILE" not in env  # on a GPU, vLLM's own choice
    # The cache changes no measurement: the profile is the same one with or without it.
    assert profile_name(conditions) == profile_name(profile_conditions(spec(), 81559, 4))
    claimed = spec(engine={"cache": {"persistentVolumeClaim": "vllm-cache"}})
    replica_pod = build_statefulset(OWNER, claimed, PLAN, NODE)["spec"]["template"]["spec"]
    assert {"name": "engine-cache", "persistentVolumeClaim": {"claimName": "vllm-cache"}} in replica_pod["volumes"]
    cpu = spec(engine={"device": "cpu", "cache": {"hostPath": "/var/lib/slmpack/engine-cache"}})
    cpu_env = {e["name"]: e["value"] for e in
               build_statefulset(OWNER, cpu, PLAN, None)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert cpu_env["VLLM_USE_AOT_COMPILE"] == "0"  # vllm-cpu reloads only its non-AOT cache
    uncached = build_statefulset(OWNER, spec(), PLAN, NODE)["spec"]["template"]["spec"]
    assert "VLLM_CACHE_ROOT" not in {e["name"] for e in uncached["containers"][0]["env"]}
