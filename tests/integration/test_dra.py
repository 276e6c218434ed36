"""DRA against the real local apiserver (Kubernetes 1.20, which serves no resource.k8s.io).

What can be real here: discovery of the served versions, the operator's condition on a
cluster without DRA, and the adapter's list and conditional delete of claims, which the
apiserver's generic machinery serves the same for a built-in type and for a stand-in
CustomResourceDefinition of the same group, version and name.
"""

import contextlib
import os

import pytest
from kopf.testing import KopfRunner
from kubernetes import client, utils
from kubernetes.client.rest import ApiException
from kubernetes.config import kube_config

from slmpack.adapters.kube import Kube
from tests.integration.test_operator import ROOT, Cluster, deployment, operator, wait

pytestmark = [pytest.mark.cluster]

CLAIMS = "resourceclaims.resource.k8s.io"
# Only resourceclaims, so discovery of resource.k8s.io shows nothing else a DRA deployment would read.
STAND_IN = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": CLAIMS, "labels": {"slmpack.dev/test": "true"},
                 # The apiserver admits a CRD in a *.k8s.io group only with this annotation.
                 "annotations": {"api-approved.kubernetes.io": "unapproved, test stand-in for the built-in type"}},
    "spec": {"group": "resource.k8s.io", "scope": "Namespaced",
             "names": {"plural": "resourceclaims", "singular": "resourceclaim", "kind": "ResourceClaim"},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                 "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
}


def test_discovery_finds_no_resource_api_on_this_cluster(api_client):
    kube = Kube(api_client)
    assert kube.served_versions("resource.k8s.io") == []
    assert kube.served_versions("apps") == ["apps/v1"]


@pytest.fixture
def k(kubeconfig, api_client, namespace):
    """The CRDs served and the operator pointed at this cluster; no GPU node is needed under DRA."""
    os.environ["KUBECONFIG"] = str(kubeconfig)
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(kubeconfig)
    extensions = client.ApiextensionsV1Api(api_client)
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        with contextlib.suppress(utils.FailToCreateError):  # already there
            utils.create_from_yaml(api_client, str(path))
    wait(lambda: all(any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])
                     for crd in extensions.list_custom_resource_definition(
                         label_selector="app.kubernetes.io/part-of=slmpack").items), 60, "the CRDs")
    return Cluster(api_client, namespace)


def test_a_dra_deployment_on_a_cluster_without_dra_says_so_and_creates_nothing(k):
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment("dra", placement="dra", engine={"device": "gpu"}))
        placed = wait(lambda: next((c for c in k.status("dra").get("conditions", []) if c["type"] == "Placed"), None),
                      what="the Placed condition")
        assert (placed["status"], placed["reason"]) == ("False", "DRANotServed")
        assert "Kubernetes 1.32 or later" in placed["message"]
        assert k.status("dra")["phase"] == "Pending"
        assert k.profiles() == [] and k.jobs() == [] and k.apps.list_namespaced_stateful_set(k.ns).items == []
    assert runner.exception is None, runner.output


@pytest.fixture
def claims_api(api_client):
    extensions = client.ApiextensionsV1Api(api_client)
    extensions.create_custom_resource_definition(STAND_IN)
    try:
        wait(lambda: any(c.type == "Established" and c.status == "True"
                         for c in extensions.read_custom_resource_definition(CLAIMS).status.conditions or []),
             60, "the stand-in ResourceClaim type")
        yield Kube(api_client)
    finally:
        extensions.delete_custom_resource_definition(CLAIMS)


def test_unused_claims_are_listed_and_deleted_only_as_read(claims_api, namespace):
    custom = claims_api.custom
    labels = {"app.kubernetes.io/name": "slmpack-engine", "slmpack.dev/deployment": "chat"}
    for name in ("chat-gpu-old", "chat-gpu-new"):
        custom.create_namespaced_custom_object("resource.k8s.io", "v1", namespace, "resourceclaims", {
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "labels": labels}, "spec": {"devices": {"requests": []}}})
    custom.create_namespaced_custom_object("resource.k8s.io", "v1", namespace, "resourceclaims", {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": "someone-else"}})

    read = {c["metadata"]["name"]: c for c in claims_api.resource_claims("resource.k8s.io/v1", namespace, labels)}
    assert sorted(read) == ["chat-gpu-new", "chat-gpu-old"]
    old = read["chat-gpu-old"]
    assert old["apiVersion"] == "resource.k8s.io/v1"

    # Changed since it was read (as when the scheduler reserves it for a pod): not deleted.
    custom.patch_namespaced_custom_object("resource.k8s.io", "v1", namespace, "resourceclaims", "chat-gpu-old",
                                          {"status": {"reservedFor": [{"resource": "pods", "name": "chat-0"}]}})
    assert claims_api.delete_unused_claim(old) is False
    assert custom.get_namespaced_custom_object("resource.k8s.io", "v1", namespace, "resourceclaims", "chat-gpu-old")

    fresh = {c["metadata"]["name"]: c for c in claims_api.resource_claims("resource.k8s.io/v1", namespace, labels)}
    assert claims_api.delete_unused_claim(fresh["chat-gpu-old"]) is True
    with pytest.raises(ApiException) as gone:
        custom.get_namespaced_custom_object("resource.k8s.io", "v1", namespace, "resourceclaims", "chat-gpu-old")
    assert gone.value.status == 404
    assert claims_api.delete_unused_claim(fresh["chat-gpu-old"]) is False  # already gone: nothing to do
    assert [c["metadata"]["name"] for c in claims_api.resource_claims("resource.k8s.io/v1", namespace, labels)] == [
        "chat-gpu-new"]
