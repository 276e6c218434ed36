"""Pod Security "restricted", checked statically: Kubernetes 1.20 has no PodSecurity admission.

The rules are those of https://kubernetes.io/docs/concepts/security/pod-security-standards/ (baseline
and restricted, latest), as k8s.io/pod-security-admission checks them. The chart's pods and the pods
the operator writes must pass them all; the exporter, which needs the host, may break only the rules
listed for it, which is why its namespace must be labelled privileged (README, Security model).
"""

import pytest

from slmpack.api.models import Plan, SLMDeploymentSpec
from slmpack.core.decide import ClusterSnapshot, decide
from slmpack.core.manifests import Owner, build_profiling_job, build_statefulset, profile_conditions
from slmpack.core.validation import GPUNode
from tests.unit.test_chart import helm, render  # noqa: F401  (the helm fixture)
from tests.unit.test_decide import NOW

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}


def violations(pod: dict) -> set[str]:
    """The restricted profile's rules this pod spec breaks, one word each."""
    found = set()
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        found.add("hostNamespaces")
    for volume in pod.get("volumes") or []:
        kind = next(k for k in volume if k != "name")
        if kind == "hostPath":
            found.add("hostPathVolumes")
        elif kind not in RESTRICTED_VOLUMES:
            found.add("restrictedVolumes")
    pod_context = pod.get("securityContext") or {}
    containers = (pod.get("initContainers") or []) + pod["containers"]
    for container in containers:
        context = container.get("securityContext") or {}
        if context.get("privileged"):
            found.add("privileged")
        if any(p.get("hostPort") for p in container.get("ports") or []):
            found.add("hostPorts")
        added = set((context.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPABILITIES:
            found.add("capabilities (baseline)")
        if added - {"NET_BIND_SERVICE"} or "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
            found.add("capabilities")
        if context.get("allowPrivilegeEscalation") is not False:
            found.add("allowPrivilegeEscalation")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            found.add("runAsNonRoot")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.add("runAsUser")
        seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.add("seccompProfile")
        if context.get("procMount", "Default") != "Default":
            found.add("procMount")
    return found


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
            if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job")}


def test_the_chart_pods_are_restricted_but_the_exporter_on_gpu_nodes(helm):  # noqa: F811
    pods = pod_specs(render(helm, "monitoring.prometheus.enabled=true", "exporter.engineCacheHostPath=/var/cache/x"))
    assert set(pods) == {"demo-slmpack-operator", "demo-slmpack-prometheus", "demo-slmpack-exporter"}
    assert violations(pods["demo-slmpack-operator"]) == set()
    assert violations(pods["demo-slmpack-prometheus"]) == set()
    # NVML's host PIDs, the kubelet's root-only PodResources socket, the engine cache it hands to the engines' group.
    assert violations(pods["demo-slmpack-exporter"]) == {"hostNamespaces", "hostPathVolumes", "runAsNonRoot",
                                                         "runAsUser", "capabilities"}


def test_in_cpu_dev_mode_the_exporter_is_restricted_too(helm):  # noqa: F811
    assert violations(pod_specs(render(helm, "devMode.cpu=true"))["demo-slmpack-exporter"]) == set()


def test_every_chart_container_requests_cpu_and_memory_and_has_a_memory_limit(helm):  # noqa: F811
    pods = pod_specs(render(helm, "monitoring.prometheus.enabled=true", "exporter.engineCacheHostPath=/var/cache/x"))
    for name, pod in pods.items():
        for container in (pod.get("initContainers") or []) + pod["containers"]:
            resources = container.get("resources") or {}
            assert {"cpu", "memory"} <= (resources.get("requests") or {}).keys(), (name, container["name"])
            assert "memory" in (resources.get("limits") or {}), (name, container["name"])


def test_the_exporter_outranks_tenant_pods_on_its_node(helm):  # noqa: F811
    exporter = pod_specs(render(helm))["demo-slmpack-exporter"]
    assert exporter["priorityClassName"] == "system-node-critical"
    assert "priorityClassName" not in pod_specs(render(helm, "exporter.priorityClassName="))["demo-slmpack-exporter"]


NODES = {
    "mps": GPUNode("gpu-a", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-SHARED", "nvidia.com/gpu.memory": "81559",
                             "nvidia.com/gpu.replicas": "4", "nvidia.com/gpu.sharing-strategy": "mps",
                             "nvidia.com/gpu.count": "1"}, {"nvidia.com/gpu": 4}),
    "time-slicing": GPUNode("gpu-b", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-SHARED",
                                      "nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.replicas": "4",
                                      "nvidia.com/gpu.sharing-strategy": "time-slicing", "nvidia.com/gpu.count": "1"},
                            {"nvidia.com/gpu": 4}),
}


@pytest.mark.parametrize("spec", [
    {"engine": {"device": "cpu"}},
    {"sharing": "mps"},
    {"sharing": "time-slicing"},
    {"engine": {"cache": {"persistentVolumeClaim": "cache"}, "env": [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]},
     "model": {"name": "/models/m", "volume": {"persistentVolumeClaim": "models"}}, "apiKeySecretRef": {
        "name": "k", "key": "k"}},
])
def test_the_pods_the_operator_writes_are_restricted_without_host_paths(spec):
    parsed = SLMDeploymentSpec.model_validate({"model": {"name": "m"}, **spec})
    node = NODES.get(parsed.sharing.value) if parsed.engine.device.value == "gpu" else None
    statefulset = build_statefulset(Owner("SLMDeployment", "chat", "d-1", "team"), parsed,
                                    Plan(replicas=2, max_num_seqs=8), node)
    job = build_profiling_job(Owner("SLMProfile", "p", "p-1", "team"), profile_conditions(parsed, None), parsed, node)
    for pod in (statefulset["spec"]["template"]["spec"], job["spec"]["template"]["spec"]):
        assert violations(pod) == set()
        engine, *holders = pod["containers"]  # the profiling pod's slot holders beside its profiler
        assert engine["resources"]["requests"]["ephemeral-storage"] == "1Gi"
        assert all(h["resources"]["requests"]["ephemeral-storage"] == "1Mi" for h in holders)
        for volume in pod["volumes"]:
            if "emptyDir" in volume:
                assert volume["emptyDir"]["sizeLimit"] in ("20Gi", "1Gi", "1Mi")


def test_a_host_path_model_is_the_one_thing_outside_restricted():
    parsed = SLMDeploymentSpec.model_validate({"model": {"name": "/models/m", "volume": {"hostPath": "/data/m"}}})
    statefulset = build_statefulset(Owner("SLMDeployment", "chat", "d-1", "team"), parsed,
                                    Plan(replicas=1, max_num_seqs=8), NODES["mps"])
    assert violations(statefulset["spec"]["template"]["spec"]) == {"hostPathVolumes"}


def test_the_checker_sees_what_breaks_the_rules():
    root = {"securityContext": {"runAsUser": 0}, "containers": [{"name": "c", "ports": [{"hostPort": 80}],
                                                                "securityContext": {"privileged": True}}],
            "volumes": [{"name": "v", "gitRepo": {"repository": "x"}}]}
    assert violations(root) == {"hostPorts", "privileged", "allowPrivilegeEscalation", "runAsNonRoot", "runAsUser",
                                "seccompProfile", "capabilities", "restrictedVolumes"}


def test_the_routers_and_the_pack_pods_are_restricted_too():
    """Every pod template the operator applies for a routed deployment, in both placements: the routers'
    Deployment beside the replica packs, or beside the pack pods."""
    from tests.unit.test_decide import deployment, node
    from tests.unit.test_pack_pod import PLAIN, pack_pod, profile

    packs = decide(deployment(replicas=2), ClusterSnapshot((node("gpu-a", 1),)), NOW)
    pack_pods = decide(pack_pod(), ClusterSnapshot((PLAIN,), (profile(),)), NOW)
    for decision in (packs, pack_pods):
        kinds = sorted(o["kind"] for o in decision.apply if o["kind"] in ("StatefulSet", "Deployment"))
        assert kinds == ["Deployment", "StatefulSet"]  # the routers, and one pack
        for workload in (o for o in decision.apply if o["kind"] in kinds):
            pod = workload["spec"]["template"]["spec"]
            assert violations(pod) == set(), workload["metadata"]["name"]
            assert all(c["resources"]["requests"].get("ephemeral-storage") for c in pod["containers"])
