"""Packs and the scale subresource on the real apiserver: `kubectl scale slmd/NAME --replicas=P` sets the packs,
and the operator converges to one StatefulSet per pack."""

import subprocess
from pathlib import Path

import pytest
import yaml
from e2e.cluster.nvidia_device_plugin import GpuNode
from kopf.testing import KopfRunner
from kubernetes import client

from tests.integration.test_operator import (  # noqa: F401 (the module's cluster fixture)
    Cluster,
    cluster,
    deployment,
    operator,
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
    wait(lambda: "scale" in (extensions.read_custom_resource_definition(CRD).spec.versions[0].subresources
                             .to_dict() or {}), 30, "the scale subresource to be served")
    yield cluster
    previous = cluster.sanitize_for_serialization(before)
    previous["metadata"] = {"name": CRD, "labels": previous["metadata"].get("labels"),
                            "resourceVersion": extensions.read_custom_resource_definition(CRD).metadata
                            .resource_version}
    previous.pop("status", None)
    extensions.replace_custom_resource_definition(CRD, previous)


@pytest.fixture
def k(scalable, namespace):
    return Cluster(scalable, namespace)


def kubectl(kubeconfig, *args) -> str:
    return subprocess.run([KUBECTL, "--kubeconfig", kubeconfig, *args], capture_output=True, text=True,
                          check=True).stdout


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
        pods = wait(lambda: len(k.core.list_namespaced_pod(k.ns).items) == 3 and k.core.list_namespaced_pod(k.ns),
                    60, "one replica per pack")
        assert all(service.spec.selector.items() <= p.metadata.labels.items() for p in pods.items)
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
