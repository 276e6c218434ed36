"""Manifest builders: what the cluster is asked to run."""

from datetime import UTC, datetime, timedelta

import pytest

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
    DEFAULT_ENGINE_UID,
    DRAIN_SECONDS,
    FINISH_SECONDS,
    Owner,
    build_pack_pod,
    build_profiling_job,
    build_service,
    build_statefulset,
    engine_uid_setting,
    profile_conditions,
    profile_name,
)
from slmpack.core.packpod import SUPERVISOR_CONFIG_ENV, SupervisorConfig
from slmpack.core.router import ROUTER_DRAIN_SECONDS, RouterImages, build_router
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
    assert sts["spec"]["podManagementPolicy"] == "OrderedReady"  # each measures what its neighbours left
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
    # A GPU container's root stays writable: nvidia-cdi-hook writes there under CDI (kserve PR #5711).
    assert engine(sts)["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
                                              "capabilities": {"drop": ["ALL"]}}
    cpu = build_statefulset(OWNER, spec(engine={"device": "cpu"}), PLAN, node=None)
    assert engine(cpu)["securityContext"]["readOnlyRootFilesystem"] is True


def pod_identity(workload: dict) -> tuple[int, int, int]:
    context = workload["spec"]["template"]["spec"]["securityContext"]
    return context["runAsUser"], context["runAsGroup"], context["fsGroup"]


def test_replicas_pack_pods_and_profilers_run_as_the_engine_uid_they_are_given():
    # An MPS server serves one UID at a time: every pod on the GPU must share it, whatever the cluster chose.
    conditions = profile_conditions(spec(), 81559)
    job_owner = Owner(kind="SLMProfile", name=profile_name(conditions), uid="p-1", namespace="team")
    built = [build_statefulset(OWNER, spec(), PLAN, NODE, uid=4242),
             build_statefulset(OWNER, spec(placement="dra"), PLAN, None, "claim", uid=4242),
             build_pack_pod(OWNER, spec(placement="pack-pod", routing={"mode": "router"}), PLAN, None, uid=4242),
             build_profiling_job(job_owner, conditions, spec(), NODE, uid=4242),
             build_profiling_job(job_owner, conditions, spec(placement="dra"), None, claim_template="t", uid=4242)]
    assert [pod_identity(w) for w in built] == [(4242, 4242, 4242)] * len(built)
    assert pod_identity(build_statefulset(OWNER, spec(), PLAN, NODE)) == (10001, 10001, 10001)


@pytest.mark.parametrize("setting, uid", [("", DEFAULT_ENGINE_UID), ("20000", 20000), ("1", 1),
                                          ("2147483647", 2147483647)])
def test_the_engine_uid_setting_is_a_non_root_uid_empty_meaning_the_default(setting, uid):
    assert engine_uid_setting(setting) == uid


@pytest.mark.parametrize("setting", ["0", "-1", "2147483648", "ten", "10001.0"])
def test_an_engine_uid_setting_of_root_or_no_uid_is_refused(setting):
    with pytest.raises(ValueError, match="engine UID"):
        engine_uid_setting(setting)


def test_cpu_mode_sets_the_kv_cache_space_and_no_gpu_flags():
    cpu_plan = PLAN.model_copy(update={"gpu_memory_utilization": None, "mps_active_thread_percentage": None,
                                       "mps_pinned_memory_limit_mib": None, "kv_cache_memory_bytes": 2**30})
    sts = build_statefulset(OWNER, spec(engine={"device": "cpu", "cpuKvCacheSpaceGib": 2}), cpu_plan, None)
    args = engine(sts)["args"]
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(2**30)
    # The legacy whole-GiB variable would override the argument in vLLM CPU.
    assert "VLLM_CPU_KVCACHE_SPACE" not in {e["name"] for e in engine(sts)["env"]}
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
        container = pod["containers"][0]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "engine-cache"]
        assert mount["subPath"] == OWNER.namespace  # the node's cache is shared; each namespace writes its own part
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["VLLM_CACHE_ROOT"].startswith(mount["mountPath"] + "/") and not mount.get("readOnly")
        assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(mount["mountPath"] + "/")
        assert "VLLM_USE_AOT_COMPILE" not in env  # on a GPU, vLLM's own choice
    # The cache changes no measurement: the profile is the same one with or without it.
    assert profile_name(conditions) == profile_name(profile_conditions(spec(), 81559, 4))
    claimed = spec(engine={"cache": {"persistentVolumeClaim": "vllm-cache"}})
    replica_pod = build_statefulset(OWNER, claimed, PLAN, NODE)["spec"]["template"]["spec"]
    assert {"name": "engine-cache", "persistentVolumeClaim": {"claimName": "vllm-cache"}} in replica_pod["volumes"]
    assert "subPath" not in next(m for m in replica_pod["containers"][0]["volumeMounts"] if m["name"] == "engine-cache")
    cpu = spec(engine={"device": "cpu", "cache": {"hostPath": "/var/lib/slmpack/engine-cache"}})
    cpu_env = {e["name"]: e["value"] for e in
               build_statefulset(OWNER, cpu, PLAN, None)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert cpu_env["VLLM_USE_AOT_COMPILE"] == "0"  # vllm-cpu reloads only its non-AOT cache
    uncached = build_statefulset(OWNER, spec(), PLAN, NODE)["spec"]["template"]["spec"]
    assert "VLLM_CACHE_ROOT" not in {e["name"] for e in uncached["containers"][0]["env"]}


def test_the_profiling_pod_holds_a_slot_for_every_engine_it_may_run():
    from slmpack.core.manifests import HOLD_SLOT

    # An MPS node with R = 4 and maxReplicas 3: the profiler's container and two holders, one slot each.
    three = spec(profiling={"maxReplicas": 3})
    pod = build_profiling_job(OWNER, profile_conditions(three, 81559, 4), three, NODE)["spec"]["template"]["spec"]
    profiler, *holders = pod["containers"]
    assert [c["name"] for c in holders] == ["slot-1", "slot-2"]
    assert [c["resources"]["limits"]["nvidia.com/gpu"] for c in pod["containers"]] == ["1", "1", "1"]
    assert all(c["command"] == ["sh", "-c", HOLD_SLOT] and c["image"] == profiler["image"] for c in holders)
    assert all(c["securityContext"] == profiler["securityContext"] for c in holders)
    assert profiler["args"][profiler["args"].index("--held-slots") + 1] == "/slots"
    assert {"name": "slots", "mountPath": "/slots"} in profiler["volumeMounts"]
    assert profiler["command"][:2] == ["sh", "-c"] and profiler["command"][-1] == "slmpack"
    # Never more than the node's R slots, and none where nothing is shared or one engine is all it runs.
    assert len(build_profiling_job(OWNER, profile_conditions(spec(profiling={"maxReplicas": 8}), 81559, 4),
                                   spec(profiling={"maxReplicas": 8}), NODE)["spec"]["template"]["spec"][
        "containers"]) == 4
    one = spec(profiling={"maxReplicas": 1})
    single = build_profiling_job(OWNER, profile_conditions(one, 81559, 4), one, NODE)["spec"]["template"]["spec"]
    assert len(single["containers"]) == 1 and "--held-slots" not in single["containers"][0]["args"]


def test_a_slot_holder_reports_its_gpu_and_ends_once_the_profiler_has_ended_however_it_ended(tmp_path):
    """The holder's and the profiler's shell scripts, run as the containers run them (the directory moved):
    the holder waits while the profiler lives, and ends once it is gone, killed or stopped; a SIGTERM to the
    profiler's container reaches the profiler, which stops its engines then."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from slmpack.core.manifests import HOLD_SLOT, PROFILE_THEN_RELEASE

    def holder():
        return subprocess.Popen(["sh", "-c", HOLD_SLOT.replace("/slots", str(tmp_path))],
                                env={"SLOT": "slot-1", "NVIDIA_VISIBLE_DEVICES": "GPU-a", "PATH": "/usr/bin:/bin"})

    def profiler(body: str):
        return subprocess.Popen(["sh", "-c", PROFILE_THEN_RELEASE.replace("/slots", str(tmp_path)), "profiler",
                                 sys.executable, "-c", body])

    from slmpack.profiler.slots import holder_gpus

    # Killed outright (as by the OOM killer): the shell above it still says it has ended, with the kill's status.
    waiting, running = holder(), profiler("import time; time.sleep(60)")
    try:
        assert holder_gpus(tmp_path, 1, timeout_s=10) == ["GPU-a"]
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(2)
        def parent(stat: Path) -> str | None:
            try:
                return stat.read_text().rsplit(")", 1)[-1].split()[1]
            except OSError:  # gone meanwhile
                return None

        (child,) = [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
                    if parent(stat) == str(running.pid)]
        os.kill(child, signal.SIGKILL)
        assert running.wait(10) == 128 + signal.SIGKILL and waiting.wait(10) == 0
    finally:
        for process in (waiting, running):
            process.kill()
    # Stopped: SIGTERM to the container's first process reaches the profiler, whose handler decides the status.
    (tmp_path / "done").unlink()
    running = profiler("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); "
                       f"open({str(tmp_path / 'up')!r}, 'w').close(); time.sleep(60)")
    try:
        for _ in range(100):
            if (tmp_path / "up").exists():
                break
            time.sleep(0.1)
        running.send_signal(signal.SIGTERM)
        assert running.wait(10) == 143 and (tmp_path / "done").exists()
    finally:
        running.kill()


def test_a_stopping_engine_finishes_its_requests_within_the_pods_grace():
    """vLLM aborts what it holds on SIGTERM unless --shutdown-timeout says how long to finish it: every engine
    gets it, and every pod's grace period (the pack pod's supervisor's too, and the routers' in front) covers
    the drain before the SIGTERM and that time."""
    finish = ["--shutdown-timeout", str(FINISH_SECONDS)]
    pod = build_statefulset(OWNER, spec(), PLAN, None)["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--shutdown-timeout"):][:2] == finish
    assert pod["terminationGracePeriodSeconds"] >= DRAIN_SECONDS + FINISH_SECONDS

    pack = build_pack_pod(OWNER, spec(placement="pack-pod"), PLAN, None)["spec"]["template"]["spec"]
    config = SupervisorConfig.model_validate_json(
        next(e["value"] for e in pack["containers"][0]["env"] if e["name"] == SUPERVISOR_CONFIG_ENV))
    assert all(e.command[e.command.index("--shutdown-timeout"):][:2] == finish for e in config.engines)
    assert config.stop_grace_seconds > FINISH_SECONDS
    assert pack["terminationGracePeriodSeconds"] >= config.drain_seconds + config.stop_grace_seconds

    router = build_router(OWNER, spec(), PLAN, RouterImages("haproxy", "agent"))["spec"]["template"]["spec"]
    assert router["terminationGracePeriodSeconds"] >= ROUTER_DRAIN_SECONDS + FINISH_SECONDS
