"""The emulated NVIDIA device plugin's decisions, checked against upstream's own test cases
(NVIDIA/k8s-device-plugin internal/rm/allocate_test.go, internal/lm/resource_test.go)."""

from collections import Counter
from pathlib import Path

import pytest
from e2e.cluster.nvidia_device_plugin import AllocationRefused, GpuNode, gpu_uuid

MPS_ROOT = Path("/state/nvidia-mps")


def per_gpu(devices):
    return Counter(gpu_uuid(d) for d in devices)


def test_shared_gpus_become_replicated_device_ids():
    node = GpuNode(gpus=2, sharing="mps", replicas=4)
    ids = node.device_ids()
    assert len(ids) == 8  # capacity is count x R
    assert ids[0] == f"{node.uuids[0]}::0" and ids[7] == f"{node.uuids[1]}::3"
    assert all(u.startswith("GPU-") for u in node.uuids) and len(set(node.uuids)) == 2
    assert GpuNode(gpus=2, sharing="none", replicas=1).device_ids() == node.uuids


def test_labels_as_gfd_writes_them():
    shared = GpuNode(gpus=2, sharing="time-slicing", replicas=4, product="NVIDIA H100 80GB HBM3").labels()
    assert shared["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3-SHARED"
    assert shared["nvidia.com/gpu.replicas"] == "4"  # per GPU, not times the count
    assert shared["nvidia.com/gpu.count"] == "2"
    assert shared["nvidia.com/gpu.sharing-strategy"] == "time-slicing"
    assert shared["nvidia.com/gpu.memory"] == "81559"
    assert shared["nvidia.com/mps.capable"] == "false"
    whole = GpuNode(sharing="none", replicas=1, product="Tesla T4 (PCIe)").labels()
    assert whole["nvidia.com/gpu.product"] == "Tesla-T4-PCIe"
    assert whole["nvidia.com/gpu.sharing-strategy"] == "none"
    assert GpuNode(sharing="mps").labels()["nvidia.com/mps.capable"] == "true"


def test_only_an_emulated_gpu_operator_writes_gpu_present():
    # GFD beside a plain device plugin does not write it, so nothing may come to depend on it unseen.
    assert "nvidia.com/gpu.present" not in GpuNode().labels()
    assert "nvidia.com/gpu.present" not in GpuNode.from_env({}).labels()
    operator = GpuNode.from_env({"SLMPACK_GPU_OPERATOR": "1"})
    assert operator.labels()["nvidia.com/gpu.present"] == "true"
    assert operator.labels()["nvidia.com/gpu.count"] == "1"


def test_distributed_spreads_and_packed_consolidates_within_one_request():
    node = GpuNode(gpus=2, sharing="time-slicing", replicas=4)
    assert sorted(per_gpu(node.preferred(node.device_ids(), [], 4)).values()) == [2, 2]
    packed = GpuNode(gpus=2, sharing="time-slicing", replicas=4, policy="packed")
    assert list(per_gpu(packed.preferred(packed.device_ids(), [], 4)).values()) == [4]


def test_successive_single_slot_pods_follow_the_policy():
    """What the kubelet does for one pod after another: slots in use are no longer available."""
    for policy, expected in (("distributed", [2, 2]), ("packed", [4])):
        node = GpuNode(gpus=2, sharing="mps", replicas=4, policy=policy)
        available, taken = node.device_ids(), []
        for _ in range(4):
            (choice,) = node.preferred(available, [], 1)
            available.remove(choice)
            taken.append(choice)
        assert sorted(per_gpu(taken).values()) == expected, policy


def test_preferred_keeps_required_devices_and_refuses_too_few():
    node = GpuNode(gpus=2, sharing="time-slicing", replicas=2)
    required = [node.device_ids()[0]]
    chosen = node.preferred(node.device_ids(), required, 2)
    assert chosen[0] == required[0] and gpu_uuid(chosen[1]) == node.uuids[1]  # fewest in use: the other GPU
    with pytest.raises(AllocationRefused, match="not enough available devices"):
        node.preferred(node.device_ids()[:1], [], 2)


def test_mps_allocation_env_and_mounts():
    node = GpuNode(gpus=2, sharing="mps", replicas=4)
    answer = node.allocate([node.device_ids()[5]], MPS_ROOT)
    assert answer["envs"] == {"NVIDIA_VISIBLE_DEVICES": node.uuids[1],
                              "CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe"}
    assert answer["mounts"] == [("/mps/nvidia.com/gpu/pipe", "/state/nvidia-mps/nvidia.com/gpu/pipe"),
                                ("/dev/shm", "/state/nvidia-mps/shm")]
    assert not any("LIMIT" in k or "PERCENTAGE" in k for k in answer["envs"])


def test_mps_refuses_more_than_one_slot_and_time_slicing_does_not():
    mps = GpuNode(gpus=1, sharing="mps", replicas=4)
    with pytest.raises(AllocationRefused, match="maximum request size for shared resources is 1; found 2"):
        mps.allocate(mps.device_ids()[:2], MPS_ROOT)
    sliced = GpuNode(gpus=2, sharing="time-slicing", replicas=4)
    answer = sliced.allocate([sliced.device_ids()[0], sliced.device_ids()[1], sliced.device_ids()[4]], MPS_ROOT)
    assert answer == {"envs": {"NVIDIA_VISIBLE_DEVICES": ",".join(sliced.uuids)}, "mounts": [], "annotations": {}}


def test_cdi_mode_names_cdi_devices_in_annotations_and_sets_no_nvidia_visible_devices():
    # The GPU Operator's plugin (deviceListStrategy cdi-annotations): the runtime injects the devices, and the
    # container gets no variable that names its GPU; the MPS pipe and shm stay as they are.
    node = GpuNode(gpus=2, sharing="mps", replicas=4, cdi=True)
    answer = node.allocate([node.device_ids()[5]], MPS_ROOT)
    assert answer["envs"] == {"CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe"}
    ((key, value),) = answer["annotations"].items()
    assert key.startswith("cdi.k8s.io/nvidia-device-plugin_")
    assert value == f"k8s.device-plugin.nvidia.com/gpu={node.uuids[1]}"
    assert GpuNode.from_env({"SLMPACK_GPU_CDI": "1"}).cdi and not GpuNode.from_env({}).cdi


def test_the_node_is_tainted_only_when_asked():
    assert GpuNode().taints() == []
    assert GpuNode.from_env({"SLMPACK_GPU_TAINT": "1"}).taints() == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]


def test_unknown_device_is_refused():
    node = GpuNode(sharing="none", replicas=1)
    with pytest.raises(AllocationRefused, match="unknown device: GPU-nope"):
        node.allocate(["GPU-nope"], MPS_ROOT)


@pytest.mark.parametrize("settings, field", [
    ({"sharing": "mig"}, "SLMPACK_GPU_SHARING"),
    ({"sharing": "none", "replicas": 4}, "SLMPACK_GPU_REPLICAS"),
    ({"sharing": "mps", "replicas": 1}, "SLMPACK_GPU_REPLICAS"),
    ({"gpus": 0}, "SLMPACK_GPUS"),
    ({"policy": "random"}, "SLMPACK_GPU_ALLOCATION_POLICY"),
])
def test_bad_settings_name_the_variable(settings, field):
    with pytest.raises(ValueError, match=field):
        GpuNode(**settings)


def test_settings_from_the_environment():
    node = GpuNode.from_env({"SLMPACK_GPUS": "2", "SLMPACK_GPU_SHARING": "none"})
    assert (node.gpus, node.sharing, node.replicas) == (2, "none", 1)
    assert GpuNode.from_env({}, replicas=8).replicas == 8
