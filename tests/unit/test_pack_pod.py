"""Placement pack-pod, pure: on a plain device-plugin node that shares nothing, each pack is one pod with one whole
GPU whose supervisor runs the plan's engines with the plan's caps; the router reaches each engine port; the
profiling Job holds a whole GPU and runs its own MPS daemon; nodes whose plugin shares are not taken."""

import json
from pathlib import Path

import pytest
import yaml

from slmpack.api.models import Plan, SLMDeploymentSpec
from slmpack.controller.render import node_from_object
from slmpack.core.conditions import ReplicaState
from slmpack.core.decide import ClusterSnapshot, decide
from slmpack.core.manifests import Owner, build_pack_pod
from slmpack.core.packpod import SUPERVISOR_CONFIG_ENV, SupervisorConfig
from tests.unit.test_decide import NOW, condition, deployment

DATA = Path(__file__).resolve().parents[1] / "data"
PLAIN = node_from_object(yaml.safe_load((DATA / "nodes" / "h100-plugin-none-r1-g8.yaml").read_text()))
MPS_NODE = node_from_object(yaml.safe_load((DATA / "nodes" / "h100-plugin-mps-r4-g1.yaml").read_text()))


def profile() -> dict:
    found = yaml.safe_load((DATA / "profiles" / "smollm2-360m-h100-pack-pod.yaml").read_text())
    found["metadata"].update(namespace="team", uid="p-1")
    return found


def pack_pod(**spec) -> dict:
    return deployment(placement="pack-pod", gpu={"product": "NVIDIA-H100-80GB-HBM3"},
                      profiling={"profileRef": "smollm2-360m-h100-pack-pod",
                                 "workload": {"inputTokens": 512, "outputTokens": 256}}, **spec)


def of_kind(objects, kind, name=None):
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def supervisor_of(statefulset) -> SupervisorConfig:
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    raw = next(e["value"] for e in container["env"] if e["name"] == SUPERVISOR_CONFIG_ENV)
    return SupervisorConfig.model_validate_json(raw)


def test_one_pod_per_pack_holds_one_whole_gpu_and_runs_the_plans_engines_with_the_plans_caps():
    decision = decide(pack_pod(), ClusterSnapshot((PLAIN,), (profile(),)), NOW)
    plan = decision.status.plan
    assert plan.replicas == 4 and plan.mps_active_thread_percentage == 25
    [pack] = of_kind(decision.apply, "StatefulSet")
    assert pack["spec"]["replicas"] == 1
    pod = pack["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["slmpack", "supervise"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu.sharing-strategy", "operator": "In", "values": ["none"]} in \
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
            "matchExpressions"]
    assert any(v["name"] == "dshm" for v in pod["volumes"])  # the pod's own shm: its daemon and clients share it
    config = supervisor_of(pack)
    assert config.mps and [e.port for e in config.engines] == [8000, 8001, 8002, 8003]
    for engine in config.engines:
        assert engine.caps.mps_active_thread_percentage == 25
        assert engine.caps.mps_pinned_memory_limit_mib == plan.mps_pinned_memory_limit_mib
        assert engine.caps.kv_cache_memory_bytes == plan.kv_cache_memory_bytes
        assert "--kv-cache-memory-bytes" not in engine.command  # each engine's own, from its caps
        assert engine.command[engine.command.index("--port") + 1] == str(engine.port)
    assert [p["name"] for p in container["ports"]] == ["engine-0", "engine-1", "engine-2", "engine-3", "supervisor"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "supervisor"}
    one_gpu = condition(decision, "OneGPU")
    assert (one_gpu.status, one_gpu.reason) == ("True", "OnePodOneGPU")


def test_the_router_reaches_each_engine_port_and_checks_each_engine():
    decision = decide(pack_pod(), ClusterSnapshot((PLAIN,), (profile(),)), NOW)
    [engines] = of_kind(decision.apply, "Service", "chat-engines")
    assert [(p["name"], p["port"]) for p in engines["spec"]["ports"]] == [
        ("engine-0", 8000), ("engine-1", 8001), ("engine-2", 8002), ("engine-3", 8003)]
    [router] = of_kind(decision.apply, "Deployment")
    args = router["spec"]["template"]["spec"]["containers"][1]["args"]
    assert args.count("--port-name") == 4 and "--health-check" in args
    # Only the router reaches the engines, one port each: the Service selects the routers from the start.
    [service] = of_kind(decision.apply, "Service", "chat")
    assert service["spec"]["selector"]["app.kubernetes.io/name"] == "slmpack-router"


def test_secrets_reach_the_engines_and_the_network_policy_opens_every_engine_port():
    """A secretKeyRef and the API key reach the pack pod's engines through the container's environment, which
    they inherit, never through the supervisor's configuration; the policy opens each engine's port and the
    supervisor's, whose /metrics the operator reads."""
    hf_token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    decision = decide(pack_pod(engine={"env": [hf_token]}, apiKeySecretRef={"name": "key", "key": "k"},
                               networkPolicy={"allowFrom": [{"podSelector": {"matchLabels": {"app": "web"}}}]}),
                      ClusterSnapshot((PLAIN,), (profile(),)), NOW)
    [pack] = of_kind(decision.apply, "StatefulSet")
    [container] = pack["spec"]["template"]["spec"]["containers"]
    by_name = {e["name"]: e for e in container["env"]}
    assert by_name["HF_TOKEN"] == hf_token
    assert by_name["VLLM_API_KEY"] == {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "key",
                                                                                             "key": "k"}}}
    assert all("HF_TOKEN" not in e.env and "VLLM_API_KEY" not in e.env for e in supervisor_of(pack).engines)
    assert container["resources"]["requests"]["ephemeral-storage"] == "1Gi"
    [policy] = [p for p in of_kind(decision.apply, "NetworkPolicy") if p["metadata"]["name"] == "chat-engines"]
    [rule] = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [8000, 8001, 8002, 8003, supervisor_of(pack).port]


def test_ready_engines_count_the_ready_pack_pods_engines():
    snapshot = ClusterSnapshot((PLAIN,), (profile(),), pods=(ReplicaState("chat-0", ready=True, node=PLAIN.name),))
    decision = decide(pack_pod(), snapshot, NOW)
    assert decision.status.ready_replicas == 4 and decision.status.packs[0].ready_replicas == 4
    assert condition(decision, "Available").status == "True"


def test_autoscaled_pack_pods_start_full_and_a_busy_one_adds_a_whole_second_pack_pod():
    from datetime import timedelta

    from slmpack.core.autoscale import EngineLoad
    from slmpack.core.decide import with_status

    body = pack_pod(autoscaling={"maxPacks": 2})
    first = decide(body, ClusterSnapshot((PLAIN,), (profile(),)), NOW)
    per_pack = first.status.plan.replicas
    # Its engines change only with the pod, so the first pack pod starts with all of them.
    assert first.status.autoscaling.replicas == per_pack > 1
    assert len(supervisor_of(of_kind(first.apply, "StatefulSet", "chat")[0]).engines) == per_pack
    knee = first.status.plan.knee_batch_size
    # One reading from the pod's supervisor covers its engines, all at the knee.
    busy = ClusterSnapshot((PLAIN,), (profile(),), pods=(ReplicaState("chat-0", ready=True, node=PLAIN.name),),
                           engine_loads=(EngineLoad("chat-0", running=knee * per_pack, waiting=0, engines=per_pack),))
    grown = decide(with_status(body, first.status), busy, NOW + timedelta(seconds=15))
    assert (grown.scaling.reason, grown.status.autoscaling.replicas) == ("AllPacksAtKnee", 2 * per_pack)
    assert [len(supervisor_of(s).engines) for s in of_kind(grown.apply, "StatefulSet")] == [per_pack, per_pack]


def test_time_slicing_runs_no_daemon_and_no_mps_caps():
    decision = decide(pack_pod(sharing="time-slicing"), ClusterSnapshot((PLAIN,), (profile(),)), NOW)
    config = supervisor_of(of_kind(decision.apply, "StatefulSet")[0])
    assert not config.mps
    assert all(e.caps.mps_active_thread_percentage is None and e.caps.kv_cache_memory_bytes for e in config.engines)


def test_a_node_whose_plugin_shares_its_gpus_is_not_taken_and_the_message_says_why():
    decision = decide(pack_pod(), ClusterSnapshot((MPS_NODE,), (profile(),)), NOW)
    invalid = condition(decision, "InvalidSpec")
    assert invalid.status == "True" and "nvidia.com/gpu.sharing-strategy=none" in invalid.message


def test_routing_without_the_router_is_refused_naming_the_field():
    decision = decide(pack_pod(routing={"mode": "service"}), ClusterSnapshot((PLAIN,), (profile(),)), NOW)
    assert "spec.routing.mode" in condition(decision, "InvalidSpec").message


def test_the_profiling_job_holds_a_whole_gpu_and_runs_its_own_daemon_with_each_counts_caps():
    spec = deployment(placement="pack-pod", gpu={"product": "NVIDIA-H100-80GB-HBM3"})
    first = decide(spec, ClusterSnapshot((PLAIN,)), NOW)
    [made] = of_kind(first.create, "SLMProfile")
    made["metadata"]["uid"] = "p-1"
    decision = decide(spec, ClusterSnapshot((PLAIN,), (made,)), NOW)
    [job] = of_kind(decision.create, "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--placement") + 1] == "pack-pod" and args[args.index("--sharing") + 1] == "mps"
    assert "--sharing-slots" not in args and args[args.index("--max-replicas") + 1] == "4"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert made["spec"]["conditions"].get("sharingSlots") is None


@pytest.mark.parametrize("port", [8087, 8090])
def test_the_supervisors_port_stays_clear_of_the_engines(port):
    spec = SLMDeploymentSpec.model_validate({"model": {"name": "m"}, "placement": "pack-pod", "port": port})
    plan = Plan(replicas=4, max_num_seqs=8)
    config = supervisor_of(build_pack_pod(Owner("SLMDeployment", "chat", "u", "team"), spec, plan, None))
    assert config.port not in {e.port for e in config.engines}
    assert json.loads(config.model_dump_json())["engines"][3]["port"] == port + 3
