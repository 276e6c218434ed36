"""Every device-plugin node configuration (sharing none/mps/time-slicing x R x G) rendered through the
operator's decision: each pod it would create requests exactly one slot, lands only on a node whose GFD
labels match, and leaves /dev/shm to MPS; a configuration it cannot serve is refused with the message
its InvalidSpec condition carries, before anything is created."""

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from slmpack.cli import main
from slmpack.controller.render import load_documents, node_from_object, profile_as_stored, render
from slmpack.core.conditions import INVALID_SPEC, get_condition

DATA = Path(__file__).resolve().parents[1] / "data"
NODE_FILES = sorted((DATA / "nodes").glob("*.yaml"))
PROFILE = load_documents(DATA / "profiles" / "smollm2-360m-h100.yaml")[0]
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def deployment(**spec) -> dict:
    return {"apiVersion": "slmpack.dev/v1alpha1", "kind": "SLMDeployment",
            "metadata": {"name": "chat", "namespace": "team", "uid": "d-1", "generation": 1},
            "spec": {"model": {"name": "HuggingFaceTB/SmolLM2-360M-Instruct", "dtype": "bfloat16",
                               "maxModelLen": 4096},
                     "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}, "sharing": "mps",
                     "profiling": {"workload": {"inputTokens": 512, "outputTokens": 256}}, **spec}}


def pod_specs(objects):
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Job", "StatefulSet")]


def tolerated(pod: dict, taint: dict) -> bool:
    """The scheduler's TaintToleration check (kubernetes staging/src/k8s.io/api/core/v1/toleration.go)."""
    return any((not t.get("effect") or t["effect"] == taint["effect"])
               and (not t.get("key") or t["key"] == taint["key"])
               and (t.get("operator") == "Exists" or t.get("value", "") == taint.get("value", ""))
               for t in pod.get("tolerations", []))


def schedulable(pod: dict, labels: dict, taints: list[dict] = ()) -> bool:
    """What the scheduler checks of a pod against a node: its NoSchedule taints, nodeSelector, required affinity."""
    if any(t["effect"] in ("NoSchedule", "NoExecute") and not tolerated(pod, t) for t in taints):
        return False
    if any(labels.get(k) != v for k, v in pod.get("nodeSelector", {}).items()):
        return False
    terms = pod.get("affinity", {}).get("nodeAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])
    return not terms or any(all(labels.get(e["key"]) in e["values"] for e in t["matchExpressions"]) for t in terms)


def configuration(path: Path):
    node = node_from_object(load_documents(path)[0])
    return node, node.labels["nvidia.com/gpu.sharing-strategy"], node.sharing_slots


@pytest.mark.parametrize("path", NODE_FILES, ids=[p.stem for p in NODE_FILES])
@pytest.mark.parametrize("spec", [{}, {"sharing": "time-slicing"}, {"replicas": 2}, {"replicas": 7}],
                         ids=["auto-mps", "auto-time-slicing", "fixed-2", "fixed-7"])
@pytest.mark.parametrize("measured", [False, True], ids=["profiling", "profiled"])
def test_every_pod_is_admissible_or_the_spec_is_refused_first(path, spec, measured):
    node, strategy, slots = configuration(path)
    profiles = [profile_as_stored(PROFILE, "team")] if measured else []
    objects, decision = render(deployment(**spec), [node], profiles, NOW)
    refused = get_condition(decision.status.conditions, INVALID_SPEC)

    wanted = spec.get("sharing", "mps")
    if strategy not in (wanted, "none"):
        assert refused.status == "True" and objects == []
        assert refused.message.startswith("spec.gpu: no node offers")
        assert f"sharing-strategy={wanted}" in refused.message
        return
    if spec.get("replicas", 1) > slots:
        assert refused.status == "True" and objects == []
        assert refused.message.startswith(f"spec.replicas ({spec['replicas']}) exceeds the {slots} sharing slots")
        return
    assert refused.status == "False", refused.message
    pods = pod_specs(objects)
    assert pods, [o["kind"] for o in objects]
    for pod in pods:
        container, *holders = pod["containers"]  # a profiling pod holds a slot per further engine
        assert [c["resources"]["limits"]["nvidia.com/gpu"] for c in pod["containers"]] == ["1"] * (1 + len(holders))
        assert len(pod["containers"]) <= min(4, slots)
        assert schedulable(pod, node.labels, node.taints)
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert ("/dev/shm" in mounts) == (strategy != "mps")
        assert not [e for e in container["env"] if e["name"].startswith("CUDA_MPS_")]
        # Under CDI nvidia-cdi-hook writes the container's root while creating it (kserve PR #5711).
        assert container["securityContext"]["readOnlyRootFilesystem"] is False
    for obj in objects:
        if obj["kind"] == "Job":  # k co-located replicas are measured only up to what a pack may hold
            args = obj["spec"]["template"]["spec"]["containers"][0]["args"]
            assert int(args[args.index("--max-replicas") + 1]) == min(4, slots)
            # A node that shares nothing: the profiler starts no MPS daemon of its own for it.
            assert args[args.index("--sharing") + 1] == ("none" if strategy == "none" else wanted)
            assert args[args.index("--placement") + 1] == "device-plugin"
    plan = decision.status.plan
    if plan is not None:
        assert plan.replicas <= slots
        assert plan.gpu_memory_utilization * 81559 <= 81559 // slots if strategy == "mps" else True
        # A fixed count skips the profile, and with it the memory model that sizes the KV cache in bytes.
        assert (plan.kv_cache_memory_bytes or 0) > 0 if "replicas" not in spec else plan.kv_cache_memory_bytes is None
        if strategy == "mps" and plan.replicas < slots:
            assert f"{plan.replicas} of the GPU's {slots} MPS slots used" in plan.explanation


def test_the_product_matches_with_and_without_gfds_shared_suffix():
    plain, shared = (node_from_object(load_documents(DATA / "nodes" / f"h100-mps-r{r}-g1.yaml")[0]) for r in (1, 4))
    assert shared.labels["nvidia.com/gpu.product"].endswith("-SHARED")
    for node in (plain, shared):
        (pod,) = pod_specs(render(deployment(), [node], [], NOW)[0])
        assert schedulable(pod, node.labels)
        assert not schedulable(pod, {**node.labels, "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB-SHARED"})


def test_a_renamed_shared_resource_is_requested_by_its_name():
    # renameByDefault: the plugin advertises nvidia.com/gpu.shared and GFD keeps the product unsuffixed.
    obj = load_documents(DATA / "nodes" / "h100-time-slicing-r4-g1.yaml")[0]
    obj["metadata"]["labels"]["nvidia.com/gpu.product"] = "NVIDIA-H100-80GB-HBM3"
    obj["status"]["allocatable"] = {"nvidia.com/gpu.shared": "4"}
    node = node_from_object(obj)
    spec = {"sharing": "time-slicing", "replicas": 4, "gpu": {"product": "NVIDIA-H100-80GB-HBM3",
                                                              "resourceName": "nvidia.com/gpu.shared"}}
    objects, decision = render(deployment(**spec), [node], [], NOW)
    (pod,) = pod_specs(objects)
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu.shared": "1"}
    assert decision.status.plan.replicas == 4
    _, default_name = render(deployment(**{**spec, "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}}), [node], [], NOW)
    assert "set spec.gpu.resourceName" in get_condition(default_name.status.conditions, INVALID_SPEC).message


def test_render_prints_the_refusal_it_would_write_and_exits_non_zero(tmp_path, capsys):
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(deployment(replicas=2)))
    node_file = DATA / "nodes" / "h100-none-r1-g8.yaml"
    code = main(["render", "-f", str(path), "--node", str(node_file)])
    out, err = capsys.readouterr()
    _, decision = render(deployment(replicas=2), [node_from_object(load_documents(node_file)[0])], [], NOW)
    assert code == 1 and out == ""
    assert err.strip() == get_condition(decision.status.conditions, INVALID_SPEC).message
    assert "which does not share its GPUs" in err


TAINTED = [node_from_object(load_documents(DATA / "nodes" / f"h100-tainted-mps-r4-g{g}.yaml")[0]) for g in (1, 8)]
PLAIN_PLUGIN = node_from_object(load_documents(DATA / "nodes" / "h100-plugin-mps-r4-g1.yaml")[0])


@pytest.mark.parametrize("node", TAINTED, ids=lambda n: n.name)
def test_a_tainted_gpu_pool_is_tolerated_as_the_admission_plugin_would(node):
    # ExtendedResourceToleration may be off, and adds nothing for a DRA claim: every GPU pod carries it itself.
    assert node.taints == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    for pod in pod_specs(render(deployment(), [node], [], NOW)[0]):
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert schedulable(pod, node.labels, node.taints)


def test_under_dra_the_gpu_toleration_is_added_once_beside_the_specs_own():
    spec = {"placement": "dra", "scheduling": {"tolerations": [{"key": "team", "operator": "Exists"}]}}
    objects, decision = render(deployment(**spec), [], [], NOW)
    assert get_condition(decision.status.conditions, INVALID_SPEC).status == "False"
    for pod in pod_specs(objects):
        assert pod["tolerations"] == [{"key": "team", "operator": "Exists"},
                                      {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    own = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}
    objects, _ = render(deployment(placement="dra", scheduling={"tolerations": [own]}), [], [], NOW)
    assert all(pod["tolerations"] == [own] for pod in pod_specs(objects))


def test_a_taint_nothing_tolerates_keeps_the_node_out_and_says_so():
    obj = load_documents(DATA / "nodes" / "h100-tainted-mps-r4-g1.yaml")[0]
    obj["spec"]["taints"].append({"key": "dedicated", "value": "batch", "effect": "NoSchedule"})
    node = node_from_object(obj)
    objects, decision = render(deployment(), [node], [], NOW)
    refused = get_condition(decision.status.conditions, INVALID_SPEC)
    assert objects == [] and "tainted dedicated:NoSchedule: add spec.scheduling.tolerations" in refused.message
    toleration = {"key": "dedicated", "operator": "Equal", "value": "batch", "effect": "NoSchedule"}
    objects, _ = render(deployment(scheduling={"tolerations": [toleration]}), [node], [], NOW)
    assert objects and all(schedulable(pod, node.labels, node.taints) for pod in pod_specs(objects))


def test_scheduling_settings_reach_the_engines_and_the_profiling_job():
    scheduling = {"runtimeClassName": "nvidia", "priorityClassName": "inference", "imagePullSecrets": ["registry"],
                  "nodeAffinity": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}
    for profiles in ([], [profile_as_stored(PROFILE, "team")]):
        objects, _ = render(deployment(scheduling=scheduling), [PLAIN_PLUGIN], profiles, NOW)
        kinds = {o["kind"] for o in objects}
        assert kinds & {"Job", "StatefulSet"}
        for pod in pod_specs(objects):
            assert (pod["runtimeClassName"], pod["priorityClassName"]) == ("nvidia", "inference")
            assert pod["imagePullSecrets"] == [{"name": "registry"}]
            assert schedulable(pod, {**PLAIN_PLUGIN.labels, "topology.kubernetes.io/zone": "a"})
            assert not schedulable(pod, {**PLAIN_PLUGIN.labels, "topology.kubernetes.io/zone": "b"})


def test_a_plain_device_plugin_node_without_gpu_present_is_served():
    # Only the GPU Operator writes nvidia.com/gpu.present; nothing here may depend on it.
    assert "nvidia.com/gpu.present" not in PLAIN_PLUGIN.labels
    objects, decision = render(deployment(), [PLAIN_PLUGIN], [profile_as_stored(PROFILE, "team")], NOW)
    assert get_condition(decision.status.conditions, INVALID_SPEC).status == "False"
    assert all(schedulable(pod, PLAIN_PLUGIN.labels) for pod in pod_specs(objects))
    assert all("runtimeClassName" not in pod for pod in pod_specs(objects))
