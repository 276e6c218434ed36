"""From the kubelet's PodResources answer to the engine pods' GPU annotation (pure parts)."""

from types import SimpleNamespace as NS

from slmpack import GPU_UUIDS_ANNOTATION
from slmpack.exporter.gpu_annotations import GpuAnnotator, annotation_patches, gpu_uuids

A, B = "GPU-0b8e2c3a-1111-2222-3333-444455556666", "GPU-9f1d7e42-aaaa-bbbb-cccc-ddddeeeeffff"


def pod_resources(namespace, name, *containers):
    return NS(namespace=namespace, name=name, containers=[
        NS(name=f"c{i}", devices=[NS(resource_name=r, device_ids=ids) for r, ids in devices])
        for i, devices in enumerate(containers)])


def pod(name, labels=None, annotations=None, namespace="ai"):
    return {"metadata": {"namespace": namespace, "name": name, "labels": labels or {}, "annotations": annotations}}


ENGINE = {"slmpack.dev/deployment": "chat"}


def test_replica_ids_become_their_gpu_uuids():
    listed = [
        pod_resources("ai", "chat-0", [("nvidia.com/gpu", [f"{A}::3"])]),
        pod_resources("ai", "chat-1", [("nvidia.com/gpu", [f"{A}::0", f"{B}::1"])], [("nvidia.com/gpu", [f"{B}::2"])]),
        pod_resources("ai", "whole", [("nvidia.com/gpu", [B])]),
        pod_resources("ai", "nic", [("example.com/nic", ["eth1"])]),
        pod_resources("ai", "cpu-only"),
    ]
    assert gpu_uuids(listed) == {("ai", "chat-0"): A, ("ai", "chat-1"): f"{A},{B}", ("ai", "whole"): B}


def test_only_engine_pods_whose_annotation_differs_are_patched():
    uuids = {("ai", "chat-0"): A, ("ai", "chat-1"): B, ("ai", "other"): A}
    pods = [pod("chat-0", ENGINE), pod("chat-1", ENGINE, {GPU_UUIDS_ANNOTATION: B}), pod("other"),
            pod("chat-2", ENGINE)]
    assert annotation_patches(uuids, pods) == [("ai", "chat-0", A)]


def test_a_sync_patches_once_then_nothing():
    annotations = {}

    def patch(namespace, name, value):
        annotations[name] = value

    def engine_pods():
        current = annotations.get("chat-0")
        return [pod("chat-0", ENGINE, {GPU_UUIDS_ANNOTATION: current} if current else None)]

    annotator = GpuAnnotator(lambda: [pod_resources("ai", "chat-0", [("nvidia.com/gpu", [f"{A}::1"])])],
                             engine_pods, patch)
    assert annotator.sync() == 1 and annotations == {"chat-0": A}
    assert annotator.sync() == 0
