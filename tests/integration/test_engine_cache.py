"""The node's engine cache on the real kubelet: each namespace's engines write their own subdirectory, which the
kubelet creates as root, and which the chart's preparation of the cache makes writable by the engines' UID.

The chart's init container prepares a node directory (run as a pod, as the exporter runs it); then engine pods of
two namespaces, built by the operator's own pod pieces with busybox in place of vLLM, write into the cache.
"""

import stat
import uuid
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from slmpack.api.models import SLMDeploymentSpec
from slmpack.core.manifests import (
    DEFAULT_ENGINE_UID,
    ENGINE_CACHE,
    pod_security_context,
    restricted_security_context,
    scratch_volumes,
)
from tests.fixtures.cluster import wait
from tests.unit.test_chart import helm  # noqa: F401  (the fixture)
from tests.unit.test_chart import render as helm_template

pytestmark = pytest.mark.node


def run_to_completion(core: client.CoreV1Api, namespace: str, pod: dict) -> str:
    name = pod["metadata"]["name"]
    core.create_namespaced_pod(namespace, pod)

    def done():
        phase = core.read_namespaced_pod(name, namespace).status.phase
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait(done, 90, f"pod {name} to finish")
    log = core.read_namespaced_pod_log(name, namespace)
    assert phase == "Succeeded", f"{name}: {log}"
    return log


def preparation_pod(helm_path: Path, cache: Path, image: str) -> dict:
    """The exporter's init container as the chart renders it, alone in a pod."""
    (exporter,) = [d for d in helm_template(helm_path, "devMode.cpu=true", f"exporter.engineCacheHostPath={cache}")
                   if d["kind"] == "DaemonSet"]
    pod = exporter["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    init.update(image=image, imagePullPolicy="Never")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "prepare-engine-cache"},
            "spec": {"restartPolicy": "Never", "containers": [init],
                     "volumes": [v for v in pod["volumes"] if v["name"] == "engine-cache"]}}


def has_token(core: client.CoreV1Api, namespace: str) -> bool:
    try:
        return bool(core.read_namespaced_service_account("default", namespace).secrets)
    except ApiException:
        return False


def engine_pod(namespace: str, cache: Path, image: str) -> dict:
    """A pod with the engine's volumes and security context, as the StatefulSet and the profiling Job have them."""
    spec = SLMDeploymentSpec.model_validate({"model": {"name": "m"}, "engine": {"cache": {"hostPath": str(cache)}}})
    volumes, mounts = scratch_volumes(spec, namespace)
    write = f"echo {namespace} > {ENGINE_CACHE}/owner && mkdir -p {ENGINE_CACHE}/vllm && ls -A {ENGINE_CACHE}"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "engine"},
            "spec": {"restartPolicy": "Never", "securityContext": pod_security_context(DEFAULT_ENGINE_UID),
                     "volumes": volumes,
                     "containers": [{"name": "engine", "image": image, "imagePullPolicy": "Never",
                                     "command": ["sh", "-c", write], "volumeMounts": mounts,
                                     "securityContext": restricted_security_context()}]}}


def test_each_namespace_writes_only_its_own_directory_of_the_node_cache(helm, api_client, namespace,  # noqa: F811
                                                                        busybox_image, tmp_path):
    core = client.CoreV1Api(api_client)
    cache = tmp_path / "engine-cache"  # on the node, which is this machine; the kubelet creates it
    other = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": other, "labels": {"slmpack.dev/test": "true"}}})
    try:
        wait(lambda: has_token(core, other), 60, f"namespace {other}'s default ServiceAccount token")
        run_to_completion(core, namespace, preparation_pod(helm, cache, busybox_image))
        seen = {ns: run_to_completion(core, ns, engine_pod(ns, cache, busybox_image)).split()
                for ns in (namespace, other)}
    finally:
        core.delete_namespace(other, propagation_policy="Background")

    # Each engine saw only what its namespace wrote, and the node holds one directory per namespace.
    assert seen == {namespace: ["owner", "vllm"], other: ["owner", "vllm"]}
    assert sorted(p.name for p in cache.iterdir()) == sorted([namespace, other])
    for ns in (namespace, other):
        directory = cache / ns
        assert (directory / "owner").read_text().strip() == ns
        info = directory.stat()
        # Root's, so no tenant can open it to others; the engines' group may write it.
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, DEFAULT_ENGINE_UID, 0o2770)
