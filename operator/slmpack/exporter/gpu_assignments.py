"""Which GPUs each engine pod got, published for the operator in a ConfigMap of the exporter's namespace.

The kubelet's PodResources API lists, per container, the device IDs the device plugin
allocated. Kubelet 1.20 serves it as v1 (and v1alpha1) on
`<kubelet root>/pod-resources/kubelet.sock` (kubernetes/kubernetes:pkg/kubelet/server/server.go,
ListenAndServePodResources). NVIDIA's device plugin names a whole GPU by its UUID and a shared
replica `<uuid>::<n>` (NVIDIA/k8s-device-plugin:internal/rm/device_map.go, with the default
deviceIDStrategy uuid), so the UUIDs are the IDs with the replica part removed.

Every `interval_s` the node's exporter lists the pod resources and this node's engine pods
(labelled `slmpack.dev/deployment`) and writes the node's ConfigMap (`core/gpu_assignments.py`)
when it differs, creating it when absent. The data is rebuilt from both lists each time, so a
pod that is gone drops out; the loop is level-triggered and a restart repeats nothing. The
exporter writes no pod: it needs only to list them, and to write ConfigMaps in its own namespace.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from slmpack.adapters.kubelet_dra import dynamic_resources
from slmpack.core.dra import DRIVER
from slmpack.core.gpu_assignments import build_gpu_assignments, dra_device_id
from slmpack.exporter.nvml import DeviceSource, SourceDown
from slmpack.exporter.pods import DEPLOYMENT_LABEL, UNKNOWN, PodDirectory

log = logging.getLogger(__name__)
GPU_RESOURCES = ("nvidia.com/gpu", "nvidia.com/gpu.shared")  # the plugin's name, and its renameByDefault name
DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")


def gpu_uuids(pod_resources: Iterable) -> dict[tuple[str, str], str]:
    """(namespace, pod) -> comma-separated GPU UUIDs, from a PodResources List answer. A GPU that NVIDIA's DRA
    driver allocated is named by its driver, pool and device (`dra_device_id`): the operator finds its UUID in
    the driver's ResourceSlices."""
    found = {}
    for pod in pod_resources:
        uuids = {device_id.split("::", 1)[0]
                 for container in pod.containers for devices in container.devices
                 if devices.resource_name in GPU_RESOURCES for device_id in devices.device_ids}
        uuids |= {dra_device_id(claimed.driver_name, claimed.pool_name, claimed.device_name)
                  for container in pod.containers for resource in dynamic_resources(container)
                  for claimed in resource.claim_resources if claimed.driver_name == DRIVER and claimed.device_name}
        if uuids:
            found[(pod.namespace, pod.name)] = ",".join(sorted(uuids))
    return found


def engine_pod_gpus(uuids: dict[tuple[str, str], str], pods: Iterable[dict]) -> dict[tuple[str, str, str], str]:
    """(namespace, pod, pod uid) -> GPU UUIDs, for the engine pods the kubelet gave GPUs."""
    found = {}
    for pod in pods:
        meta = pod["metadata"]
        want = uuids.get((meta["namespace"], meta["name"]))
        if want and DEPLOYMENT_LABEL in (meta.get("labels") or {}):
            found[(meta["namespace"], meta["name"], meta["uid"])] = want
    return found


def running_gpus(source: DeviceSource, pods: PodDirectory) -> dict[tuple[str, str], str]:
    """(namespace, pod) -> comma-separated UUIDs of the GPUs its processes run on, from NVML's process lists
    (MPS clients included) and each process's cgroup."""
    snapshot = source.read()
    uuid_of = {gpu.index: gpu.uuid for gpu in snapshot.gpus}
    found: dict[tuple[str, str], set[str]] = {}
    for process in snapshot.processes:
        ref = pods.lookup(process.pid)
        if ref != UNKNOWN and process.gpu_index in uuid_of:
            found.setdefault((ref.namespace, ref.pod), set()).add(uuid_of[process.gpu_index])
    return {pod: ",".join(sorted(uuids)) for pod, uuids in found.items()}


class ConfigMaps(Protocol):
    """What the publisher does with ConfigMaps of one namespace (the API, or a test's store)."""

    def read(self, name: str) -> dict | None: ...
    def create(self, config_map: dict) -> None: ...
    def replace(self, config_map: dict) -> None: ...


class ConfigMapsApi:
    """ConfigMaps of one namespace through the API; a replace carries the resourceVersion it read."""

    def __init__(self, namespace: str, api=None, timeout_s: tuple[float, float] = (3.0, 5.0)) -> None:
        from kubernetes import client

        from slmpack.adapters.kube import load_config

        self.api, self.namespace, self.timeout_s = api or client.CoreV1Api(load_config()), namespace, timeout_s

    def read(self, name: str) -> dict | None:
        from slmpack.adapters.kube import absent_as_none

        found = absent_as_none(lambda: self.api.read_namespaced_config_map(name, self.namespace,
                                                                           _request_timeout=self.timeout_s))
        return None if found is None else self.api.api_client.sanitize_for_serialization(found)

    def create(self, config_map: dict) -> None:
        self.api.create_namespaced_config_map(self.namespace, config_map, _request_timeout=self.timeout_s)

    def replace(self, config_map: dict) -> None:
        self.api.replace_namespaced_config_map(config_map["metadata"]["name"], self.namespace, config_map,
                                               _request_timeout=self.timeout_s)


def pod_resources_lister(socket: Path, timeout_s: float = 5.0) -> Callable[[], list]:
    """The kubelet's PodResources v1 List, over its unix socket."""
    import grpc

    from slmpack.adapters.kubelet_api import load

    pb, services = load("podresources_v1")
    stub = services.PodResourcesListerStub(grpc.insecure_channel(f"unix://{socket}"))
    return lambda: list(stub.List(pb.ListPodResourcesRequest(), timeout=timeout_s).pod_resources)


def engine_pods_lister(node_name: str, timeout_s: tuple[float, float] = (3.0, 5.0)) -> Callable[[], list[dict]]:
    """This node's engine pods, through the API (a list: the exporter may not write pods)."""
    from kubernetes import client

    from slmpack.adapters.kube import load_config

    api = client.CoreV1Api(load_config())

    def list_pods() -> list[dict]:
        pods = api.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node_name}",
                                               label_selector=DEPLOYMENT_LABEL, _request_timeout=timeout_s)
        return api.api_client.sanitize_for_serialization(pods).get("items", [])

    return list_pods


class GpuPublisher:
    """Keeps the node's ConfigMap equal to what the kubelet reports of its engine pods."""

    def __init__(self, node: str, namespace: str, list_pod_resources: Callable[[], list],
                 list_pods: Callable[[], list[dict]], config_maps: ConfigMaps,
                 list_running: Callable[[], dict[tuple[str, str], str]] | None = None) -> None:
        self.node, self.namespace = node, namespace
        self.list_pod_resources, self.list_pods, self.config_maps = list_pod_resources, list_pods, config_maps
        self.list_running = list_running  # where the pods' processes run: NVML, absent without a GPU
        self.errors = 0

    def running(self) -> dict[tuple[str, str], str]:
        try:
            return self.list_running() if self.list_running else {}
        except SourceDown as error:  # no GPU to read now: publish what the kubelet gave, as without NVML
            log.debug("where the engines run is not published: %s", error)
            return {}

    def sync(self) -> bool:
        """One pass; True when it wrote the ConfigMap."""
        pods = self.list_pods()
        desired = build_gpu_assignments(self.node, self.namespace,
                                        engine_pod_gpus(gpu_uuids(self.list_pod_resources()), pods),
                                        engine_pod_gpus(self.running(), pods))
        meta = desired["metadata"]
        current = self.config_maps.read(meta["name"])
        before = (current or {}).get("data") or {}
        if current is None:
            self.config_maps.create(desired)
        elif before == desired["data"] and ((current.get("metadata") or {}).get("labels") or {}) == meta["labels"]:
            return False
        else:
            # The resourceVersion read: a concurrent writer makes this fail (409), and the next pass reads again.
            version = current["metadata"]["resourceVersion"]
            self.config_maps.replace({**desired, "metadata": {**meta, "resourceVersion": version}})
        for key, value in desired["data"].items():
            if before.get(key) != value:
                log.info("pod %s runs on GPU %s", key, value)
        for key in before.keys() - desired["data"].keys():
            log.info("pod %s is gone from node %s", key, self.node)
        return True

    def run(self, interval_s: float, stop: threading.Event) -> None:
        while True:
            try:
                self.sync()
            except Exception as error:  # the kubelet or the API away: try again next round
                self.errors += 1
                log.warning("publishing the engine pods' GPUs failed: %s",
                            (str(error) or type(error).__name__).splitlines()[0])
            if stop.wait(interval_s):
                return
