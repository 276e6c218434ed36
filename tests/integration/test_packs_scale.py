"""Packs and the scale subresource on the real apiserver: `kubectl scale slmd/NAME --replicas=P` sets the packs,
and the operator converges to one StatefulSet per pack. The built-in autoscaler, on the emulated three-GPU node,
fills a pack before it takes another GPU and scales in by draining, with traffic through the Service."""

import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from e2e.cluster.nvidia_device_plugin import GpuNode
from kopf.testing import KopfRunner
from kubernetes import client
from prometheus_client import REGISTRY

from tests.fixtures.cluster import local_image
from tests.fixtures.fake_engine import ENGINE_CPU, fake_engine_spec
from tests.integration.test_operator import (  # noqa: F401 (the module's cluster fixture)
    Cluster,
    Traffic,
    cluster,
    deployment,
    operator,
    ready_profile,
    wait,
)

pytestmark = [pytest.mark.cluster, pytest.mark.node]

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = Path.home() / ".cache/slmpack/k8s-1.20.2/bin/kubectl"
CRD = "slmdeployments.slmpack.dev"


@pytest.fixture(scope="module")
def scalable(cluster, emulated_plugin):  # noqa: F811
    """Three GPUs on the node, one pack each; this checkout's SLMDeployment CRD (with spec.packs and the scale
    subresource) while the tests run, the one the cluster had before put back after."""
    emulated_plugin.start(GpuNode(gpus=3, sharing="mps", replicas=4))
    extensions = client.ApiextensionsV1Api(cluster)
    before = extensions.read_custom_resource_definition(CRD)
    ours = yaml.safe_load((ROOT / "crds" / f"{CRD}.yaml").read_text())
    ours["metadata"]["resourceVersion"] = before.metadata.resource_version
    extensions.replace_custom_resource_definition(CRD, ours)
    # Served once discovery lists it: what kubectl scale looks the subresource up in.
    wait(lambda: "slmdeployments/scale" in served_resources(cluster), 60, "the scale subresource to be served")
    yield cluster
    previous = cluster.sanitize_for_serialization(before)
    previous["metadata"] = {"name": CRD, "labels": previous["metadata"].get("labels"),
                            "resourceVersion": extensions.read_custom_resource_definition(CRD).metadata
                            .resource_version}
    previous.pop("status", None)
    extensions.replace_custom_resource_definition(CRD, previous)


def served_resources(api: client.ApiClient) -> set[str]:
    return {r.name for r in client.CustomObjectsApi(api).get_api_resources("slmpack.dev", "v1alpha1").resources}


@pytest.fixture
def k(scalable, namespace):
    return Cluster(scalable, namespace)


def kubectl(kubeconfig, *args) -> str:
    # A fresh discovery cache: one from an earlier kubectl may predate the scale subresource.
    with tempfile.TemporaryDirectory(prefix="slmpack-kubectl-cache-") as cache:
        done = subprocess.run([KUBECTL, "--kubeconfig", kubeconfig, "--cache-dir", cache, *args],
                              capture_output=True, text=True)
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def pack_sets(k) -> list[str]:
    return sorted(s.metadata.name for s in k.apps.list_namespaced_stateful_set(k.ns).items)


def test_kubectl_scale_sets_the_packs_and_the_operator_converges(k, node_kubeconfig):
    # An image that cannot be pulled: the test is about the objects, not about starting engines.
    body = deployment("chat", replicas=1, engine={"device": "cpu", "image": "registry.invalid/absent:0"})
    with KopfRunner(operator(k.ns)) as runner:
        k.create(body)
        wait(lambda: k.status("chat").get("currentPacks") == 1, 60, "one pack")
        kubectl(node_kubeconfig, "-n", k.ns, "scale", "slmd/chat", "--replicas=3")
        assert k.get("chat")["spec"]["packs"] == 3
        wait(lambda: pack_sets(k) == ["chat", "chat-pack-1", "chat-pack-2"], 60, "a StatefulSet per pack")
        status = wait(lambda: k.status("chat").get("currentPacks") == 3 and k.status("chat"), 60, "three packs")
        assert [p["name"] for p in status["packs"]] == ["chat", "chat-pack-1", "chat-pack-2"]
        assert all(p["node"] and p["replicas"] == 1 for p in status["packs"])
        # The Service selects every pack's pods; HPA and KEDA find them through the scale subresource.
        service = k.core.read_namespaced_service("chat", k.ns)
        pods = wait(lambda: len(engine_pods(k)) == 3 and engine_pods(k), 60, "one replica per pack")
        assert all(service.spec.selector.items() <= p.metadata.labels.items() for p in pods)
        scale = k.custom.get_namespaced_custom_object_scale("slmpack.dev", "v1alpha1", k.ns, "slmdeployments", "chat")
        assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3
        selected = k.core.list_namespaced_pod(k.ns, label_selector=scale["status"]["selector"]).items
        assert len(selected) == 3
        assert "3" in kubectl(node_kubeconfig, "-n", k.ns, "get", "slmd", "chat", "-o",
                              "custom-columns=PACKS:.status.currentPacks")

        kubectl(node_kubeconfig, "-n", k.ns, "scale", "slmd/chat", "--replicas=1")
        wait(lambda: pack_sets(k) == ["chat"], 60, "the leaving packs' StatefulSets deleted")
        wait(lambda: k.status("chat").get("currentPacks") == 1, 60, "one pack in status")
    assert runner.exception is None, runner.output


def test_kubectl_explain_names_packs_as_the_unit_of_scale(scalable, node_kubeconfig):
    def explained():
        # The apiserver republishes its OpenAPI a few seconds after a CRD changes.
        shown = subprocess.run([KUBECTL, "--kubeconfig", node_kubeconfig, "explain", "slmdeployment.spec.packs"],
                               capture_output=True, text=True)
        return " ".join(shown.stdout.split()) or shown.stderr

    assert "The unit of the scale subresource" in wait(lambda: "unit of" in explained() and explained(), 60,
                                                       "kubectl explain to show spec.packs")


def engine_pods(k) -> list:
    """The engine pods of the namespace: the deployment's router pods run beside them."""
    return k.core.list_namespaced_pod(k.ns, label_selector="app.kubernetes.io/name=slmpack-engine").items


def decisions(direction: str, reason: str) -> float:
    return REGISTRY.get_sample_value("slmpack_operator_scaling_decisions_total",
                                     {"direction": direction, "reason": reason}) or 0.0


def test_the_autoscaler_fills_a_pack_then_takes_another_and_drains_on_scale_in(k, fake_engines):
    local_image(ENGINE_CPU)
    ready_profile(k, "knee-8", knee=8)
    body = deployment("auto", replicas="auto", **fake_engine_spec(fake_engines), profiling={"profileRef": "knee-8"},
                      autoscaling={"maxPacks": 2, "periodSeconds": 5, "scaleInCooldownSeconds": 0})
    below_target = decisions("down", "BelowTarget")
    with KopfRunner(operator(k.ns)) as runner:
        k.create(body)
        status = wait(lambda: k.status("auto").get("autoscaling") and k.status("auto"), 60, "the autoscaler")
        per_pack = status["plan"]["replicas"]
        assert pack_sets(k) == ["auto"] and k.statefulset("auto").spec.replicas == 1
        wait(lambda: k.status("auto").get("readyReplicas") == 1, 180, "the first replica ready")
        (fake_engines / "load").write_text("30")  # far above 80 % of the knee batch of 8
        if per_pack > 1:  # the profile's two-replica gain may not hold a second slot's worth
            wait(lambda: k.statefulset("auto").spec.replicas == 2, 60, "a second replica in the first pack")
            assert pack_sets(k) == ["auto"], "the first pack's free slot is used before another GPU"
        wait(lambda: pack_sets(k) == ["auto", "auto-pack-1"], 180, "a second pack once the first is full")
        wait(lambda: k.status("auto").get("readyReplicas") == per_pack + 1, 180, "the second pack's replica ready")

        # Scale-in with requests flowing through the Service: leaving replicas drain, none fails.
        traffic = Traffic(f"http://{k.core.read_namespaced_service('auto', k.ns).spec.cluster_ip}:8000/v1/completions")
        traffic.start()
        wait(lambda: traffic.ok >= 10, 60, "traffic through the Service")
        (fake_engines / "load").write_text("0")
        wait(lambda: pack_sets(k) == ["auto"], 180, "the second pack removed after the load falls")
        wait(lambda: k.statefulset("auto").spec.replicas == 1, 60, "one replica left")
        wait(lambda: len(engine_pods(k)) == 1, 120, "the leaving replicas gone")
        traffic.stop.set()
        traffic.join(70)
        assert traffic.failures == [], f"{len(traffic.failures)} failed of {traffic.ok + len(traffic.failures)}"

        events = sorted(k.core.list_namespaced_event(k.ns).items, key=lambda e: e.metadata.creation_timestamp)
        assert {"ScaledUp", "ScaledDown"} <= {e.reason for e in events}
        first_up = next(e.message for e in events if e.reason == "ScaledUp")
        assert "1 -> 2 replicas" in first_up
        assert ("PackHasFreeSlots" if per_pack > 1 else "AllPacksAtKnee") in first_up, (per_pack, first_up)
        assert "AllPacksAtKnee" in " ".join(e.message for e in events if e.reason == "ScaledUp")
        assert decisions("down", "BelowTarget") > below_target, "the scale-in counted by reason"
    assert runner.exception is None, runner.output


def test_an_engine_reporting_nan_is_a_condition_and_the_autoscaler_holds(k, fake_engines):
    local_image(ENGINE_CPU)
    ready_profile(k, "knee-8", knee=8)
    body = deployment("nan", replicas="auto", **fake_engine_spec(fake_engines), profiling={"profileRef": "knee-8"},
                      autoscaling={"maxPacks": 2, "periodSeconds": 5, "scaleInCooldownSeconds": 0})

    def metrics_available():
        return next((c for c in k.status("nan").get("conditions", []) if c["type"] == "MetricsAvailable"), {})

    with KopfRunner(operator(k.ns)) as runner:
        k.create(body)
        wait(lambda: k.status("nan").get("readyReplicas") == 1, 180, "the first replica ready")
        wait(lambda: metrics_available().get("status") == "True", 60, "the engine's load read")
        (fake_engines / "load").write_text("NaN")
        wait(lambda: metrics_available().get("reason") == "NonFiniteMetric", 60, "the NaN reported")
        condition = metrics_available()
        assert condition["status"] == "False" and "vllm:num_requests_running is nan" in condition["message"]
        assert k.status("nan")["autoscaling"]["reason"] == "MetricsUnavailable"
        assert k.statefulset("nan").spec.replicas == 1, "no scaling on a NaN"
        warnings = [e for e in k.core.list_namespaced_event(k.ns).items if e.reason == "NonFiniteMetric"]
        assert warnings and warnings[0].type == "Warning"
        (fake_engines / "load").write_text("0")
        wait(lambda: metrics_available().get("status") == "True", 60, "the engine read again")
    assert runner.exception is None, runner.output
    assert "Traceback" not in runner.output
