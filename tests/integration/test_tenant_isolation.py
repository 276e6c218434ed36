"""What one tenant's deployment writes, on the real apiserver: secrets by reference, the engines' NetworkPolicy
and PodDisruptionBudget as the apiserver admits them, and children found by their controller, not their labels."""

import pytest
from kopf.testing import KopfRunner
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.integration.test_operator import (  # noqa: F401 (the module's cluster fixture)
    MISSING_IMAGE,
    Cluster,
    cluster,
    deployment,
    operator,
    wait,
)

pytestmark = [pytest.mark.cluster, pytest.mark.node]
API_KEY = {"name": "chat-api", "key": "key"}


@pytest.fixture
def k(cluster, namespace):  # noqa: F811
    return Cluster(cluster, namespace)


def network_policy(k, name):
    try:
        return client.NetworkingV1Api(k.core.api_client).read_namespaced_network_policy(name, k.ns)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def test_secrets_a_network_policy_and_a_disruption_budget_reach_the_apiserver(k):
    networking = client.NetworkingV1Api(k.core.api_client)
    # Someone's own policy with the deployment's labels and no controller: never the operator's to delete.
    networking.create_namespaced_network_policy(k.ns, {
        "metadata": {"name": "copied", "labels": {"slmpack.dev/deployment": "chat"}},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment("chat", replicas=2, apiKeySecretRef=API_KEY,
                            engine={"device": "cpu", "image": MISSING_IMAGE, "env": [
                                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]},
                            networkPolicy={"allowFrom": [{"podSelector": {"matchLabels": {"app": "router"}}}]}))
        sts = wait(lambda: k.statefulset("chat"), what="the StatefulSet")
        env = {e.name: e.value_from.secret_key_ref for e in sts.spec.template.spec.containers[0].env if e.value_from}
        assert (env["VLLM_API_KEY"].name, env["VLLM_API_KEY"].key) == ("chat-api", "key")
        assert (env["HF_TOKEN"].name, env["HF_TOKEN"].key) == ("hf", "token")
        policy = wait(lambda: network_policy(k, "chat-engines"), what="the engines' NetworkPolicy")
        assert policy.spec.pod_selector.match_labels["slmpack.dev/deployment"] == "chat"
        assert policy.spec.ingress[0].ports[0].port == 8000
        assert policy.metadata.owner_references[0].kind == "SLMDeployment"
        # Kubernetes 1.20 serves policy/v1beta1 only: the operator writes the version served.
        budget = wait(lambda: k.custom.list_namespaced_custom_object("policy", "v1beta1", k.ns,
                                                                     "poddisruptionbudgets")["items"],
                      what="the engines' PodDisruptionBudget")[0]
        assert budget["metadata"]["name"] == "chat-engines" and budget["spec"]["maxUnavailable"] == 1
        k.patch("chat", {"networkPolicy": None})
        wait(lambda: network_policy(k, "chat-engines") is None, 60, "the NetworkPolicy to be deleted")
        assert network_policy(k, "copied") is not None
        events = k.core.list_namespaced_event(k.ns).items
        assert not [e for e in events if "chat-api" in (e.message or "") and "key" in (e.message or "")]
    assert runner.exception is None, runner.output


def test_a_labelled_statefulset_of_another_controller_is_neither_deleted_nor_adopted(k):
    labels = {"app.kubernetes.io/name": "slmpack-engine", "slmpack.dev/deployment": "chat"}
    k.apps.create_namespaced_stateful_set(k.ns, {
        "metadata": {"name": "chat-pack-1", "labels": labels},
        "spec": {"replicas": 0, "serviceName": "x", "selector": {"matchLabels": {"app": "theirs"}},
                 "template": {"metadata": {"labels": {"app": "theirs"}},
                              "spec": {"containers": [{"name": "c", "image": "registry.invalid/x:0"}]}}}})
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment("chat", replicas=2))
        wait(lambda: k.statefulset("chat"), what="the StatefulSet of the first pack")
        assert k.statefulset("chat-pack-1").metadata.owner_references is None  # one pack wanted: theirs stays
        k.patch("chat", {"packs": 2})
        message = wait(lambda: next((c["message"] for c in k.status("chat").get("conditions") or []
                                     if c["type"] == "InvalidSpec" and c["status"] == "True"), None),
                       what="the refusal to adopt")
        assert "StatefulSet chat-pack-1" in message and "not controlled by it" in message
        assert k.statefulset("chat-pack-1").metadata.owner_references is None
    assert runner.exception is None, runner.output


def test_an_unlabelled_object_of_a_wanted_name_is_refused_and_a_child_changed_by_hand_is_put_back(k):
    # Someone's own Service named like the deployment, without its labels: no watch shows it, applying finds it.
    k.core.create_namespaced_service(k.ns, {"metadata": {"name": "own"},
                                           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment("own", replicas=1, routing={"mode": "service"},
                            engine={"device": "cpu", "image": MISSING_IMAGE}))
        message = wait(lambda: next((c["message"] for c in k.status("own").get("conditions") or []
                                     if c["type"] == "InvalidSpec" and c["status"] == "True"), None),
                       what="the refusal to adopt the Service")
        assert "Service own in" in message and "not controlled by it" in message
        service = k.core.read_namespaced_service("own", k.ns)
        assert service.spec.selector == {"app": "web"} and service.metadata.owner_references is None
        k.core.delete_namespaced_service("own", k.ns, _preload_content=False)  # 1.20 answers a Status
        wait(lambda: k.statefulset("own"), 60, "the StatefulSet once the name is free (looked at again in 30 s)")
        # A field the operator sets, changed by another writer: its own child, so it applies over the change.
        k.apps.patch_namespaced_stateful_set("own", k.ns, {"spec": {"replicas": 3}})
        wait(lambda: k.statefulset("own").spec.replicas == 1, 30, "the operator to put its replica count back")
    assert runner.exception is None, runner.output
