"""The test bed itself: what operators rely on, checked against the real apiserver and node."""

import urllib.request

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.fixtures.cluster import wait

pytestmark = pytest.mark.cluster

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.testbed.slmpack.dev"},
    "spec": {"group": "testbed.slmpack.dev", "scope": "Namespaced",
             "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
             "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                           "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                               "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                               "status": {"type": "object", "properties": {"seen": {"type": "integer"}}}}}}}]},
}


@pytest.fixture(scope="module")
def widgets(api_client):
    extensions = client.ApiextensionsV1Api(api_client)
    try:
        extensions.create_custom_resource_definition(WIDGET_CRD)
    except ApiException as error:
        if error.status != 409:
            raise
    custom = client.CustomObjectsApi(api_client)
    wait(lambda: _served(custom), 30, "the Widget CRD to be served")
    return custom


def _served(custom):
    try:
        custom.list_cluster_custom_object("testbed.slmpack.dev", "v1", "widgets")
        return True
    except ApiException:
        return False


def widget(name, size=1):
    return {"apiVersion": "testbed.slmpack.dev/v1", "kind": "Widget", "metadata": {"name": name},
            "spec": {"size": size}}


def test_status_subresource_writes_status_only(widgets, namespace):
    args = ("testbed.slmpack.dev", "v1", namespace, "widgets")
    widgets.create_namespaced_custom_object(*args, widget("w", 1))
    widgets.patch_namespaced_custom_object_status(*args, "w", {"status": {"seen": 7}, "spec": {"size": 99}})
    stored = widgets.get_namespaced_custom_object(*args, "w")
    assert stored["status"] == {"seen": 7}
    assert stored["spec"] == {"size": 1}, "a /status write must not change spec"


def test_stale_resource_version_is_a_conflict(widgets, namespace):
    args = ("testbed.slmpack.dev", "v1", namespace, "widgets")
    created = widgets.create_namespaced_custom_object(*args, widget("w", 1))
    stale = created["metadata"]["resourceVersion"]
    widgets.replace_namespaced_custom_object(*args, "w", {**created, "spec": {"size": 2}})
    with pytest.raises(ApiException) as error:
        widgets.replace_namespaced_custom_object(
            *args, "w", {**created, "metadata": {**created["metadata"], "resourceVersion": stale}, "spec": {"size": 3}})
    assert error.value.status == 409


def test_garbage_collection_follows_owner_references(api_client, namespace):
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "child", "ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}]}})
    core.delete_namespaced_config_map("owner", namespace)

    def child_gone():
        try:
            core.read_namespaced_config_map("child", namespace)
            return False
        except ApiException as error:
            return error.status == 404

    wait(child_gone, 60, "the garbage collector to delete the child")


@pytest.mark.node
def test_a_local_image_runs_on_the_node_and_logs(api_client, namespace, busybox_image):
    core = client.CoreV1Api(api_client)
    core.create_namespaced_pod(namespace, {"metadata": {"name": "hello"}, "spec": {
        "restartPolicy": "Never", "containers": [{"name": "hello", "image": busybox_image,
                                                  "imagePullPolicy": "Never",
                                                  "command": ["sh", "-c", "echo hello from the node"]}]}})
    wait(lambda: core.read_namespaced_pod("hello", namespace).status.phase == "Succeeded", 90, "the pod to finish")
    assert core.read_namespaced_pod_log("hello", namespace).strip() == "hello from the node"


@pytest.mark.node
def test_a_deployment_behind_a_cluster_ip_answers_from_the_host(api_client, namespace, busybox_image):
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(namespace, {"metadata": {"name": "web"}, "spec": {
        "replicas": 2, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
            "containers": [{"name": "web", "image": busybox_image, "imagePullPolicy": "Never",
                            "command": ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && "
                                                    "httpd -f -p 8080 -h /www"],
                            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}})
    service = core.create_namespaced_service(namespace, {"metadata": {"name": "web"}, "spec": {
        "selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}})
    wait(lambda: (apps.read_namespaced_deployment("web", namespace).status.ready_replicas or 0) == 2, 120,
         "two ready replicas")
    url = f"http://{service.spec.cluster_ip}/"
    pods = {p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector="app=web").items}

    def answered_by():
        try:
            return urllib.request.urlopen(url, timeout=3).read().decode().strip()
        except OSError:
            return None

    answers = {wait(answered_by, 30, "the Service to answer") for _ in range(20)}
    assert answers <= pods and answers, answers
