"""Which GPUs each engine pod got, written on the pod for the operator (`slmpack.dev/gpu-uuids`).

The kubelet's PodResources API lists, per container, the device IDs the device plugin
allocated. Kubelet 1.20 serves it as v1 (and v1alpha1) on
`<kubelet root>/pod-resources/kubelet.sock` (kubernetes/kubernetes:pkg/kubelet/server/server.go,
ListenAndServePodResources). NVIDIA's device plugin names a whole GPU by its UUID and a shared
replica `<uuid>::<n>` (NVIDIA/k8s-device-plugin:internal/rm/device_map.go, with the default
deviceIDStrategy uuid), so the UUIDs are the IDs with the replica part removed.

Every `interval_s` the node's exporter lists the pod resources and this node's engine pods
(labelled `slmpack.dev/deployment`) and patches the annotation where it is missing or
differs, so the loop is level-triggered and a restart repeats nothing. The operator reads it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from slmpack import GPU_UUIDS_ANNOTATION
from slmpack.exporter.pods import DEPLOYMENT_LABEL

log = logging.getLogger(__name__)
GPU_RESOURCES = ("nvidia.com/gpu", "nvidia.com/gpu.shared")  # the plugin's name, and its renameByDefault name
DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")


def gpu_uuids(pod_resources: Iterable) -> dict[tuple[str, str], str]:
    """(namespace, pod) -> comma-separated GPU UUIDs, from a PodResources List answer."""
    found = {}
    for pod in pod_resources:
        uuids = {device_id.split("::", 1)[0]
                 for container in pod.containers for devices in container.devices
                 if devices.resource_name in GPU_RESOURCES for device_id in devices.device_ids}
        if uuids:
            found[(pod.namespace, pod.name)] = ",".join(sorted(uuids))
    return found


def annotation_patches(uuids: dict[tuple[str, str], str], pods: Iterable[dict]) -> list[tuple[str, str, str]]:
    """(namespace, pod, value) for each engine pod whose annotation is missing or differs."""
    patches = []
    for pod in pods:
        meta = pod["metadata"]
        if DEPLOYMENT_LABEL not in (meta.get("labels") or {}):
            continue
        want = uuids.get((meta["namespace"], meta["name"]))
        if want and (meta.get("annotations") or {}).get(GPU_UUIDS_ANNOTATION) != want:
            patches.append((meta["namespace"], meta["name"], want))
    return patches


def pod_resources_lister(socket: Path, timeout_s: float = 5.0) -> Callable[[], list]:
    """The kubelet's PodResources v1 List, over its unix socket."""
    import grpc

    from slmpack.adapters.kubelet_api import load

    pb, services = load("podresources_v1")
    stub = services.PodResourcesListerStub(grpc.insecure_channel(f"unix://{socket}"))
    return lambda: list(stub.List(pb.ListPodResourcesRequest(), timeout=timeout_s).pod_resources)


def engine_pods_api(node_name: str, timeout_s: tuple[float, float] = (3.0, 5.0)):
    """(list this node's engine pods, patch one pod's annotation), through the API."""
    from kubernetes import client

    from slmpack.adapters.kube import load_config

    api = client.CoreV1Api(load_config())

    def list_pods() -> list[dict]:
        pods = api.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node_name}",
                                               label_selector=DEPLOYMENT_LABEL, _request_timeout=timeout_s)
        return api.api_client.sanitize_for_serialization(pods).get("items", [])

    def patch(namespace: str, name: str, value: str) -> None:
        api.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": {GPU_UUIDS_ANNOTATION: value}}},
                                 _request_timeout=timeout_s)

    return list_pods, patch


class GpuAnnotator:
    def __init__(self, list_pod_resources: Callable[[], list], list_pods: Callable[[], list[dict]],
                 patch: Callable[[str, str, str], None]) -> None:
        self.list_pod_resources, self.list_pods, self.patch = list_pod_resources, list_pods, patch
        self.errors = 0

    def sync(self) -> int:
        """One pass; returns the number of pods annotated."""
        patches = annotation_patches(gpu_uuids(self.list_pod_resources()), self.list_pods())
        for namespace, name, value in patches:
            self.patch(namespace, name, value)
            log.info("pod %s/%s runs on GPU %s", namespace, name, value)
        return len(patches)

    def run(self, interval_s: float, stop: threading.Event) -> None:
        while True:
            try:
                self.sync()
            except Exception as error:  # the kubelet or the API away: try again next round
                self.errors += 1
                log.warning("annotating engine pods with their GPUs failed: %s",
                            (str(error) or type(error).__name__).splitlines()[0])
            if stop.wait(interval_s):
                return
