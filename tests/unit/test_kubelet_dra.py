"""DRA allocations in the kubelet's PodResources answer, which the compiled 1.20 protos predate: the bytes are
laid out here by hand at the field numbers of kubernetes/kubelet pkg/apis/podresources/v1/api.proto (63b3249),
so the decoding is checked against that definition, not against itself."""

from pathlib import Path

import pytest
import yaml

from slmpack.adapters.kubelet_api import ProtoSourceMissing, load
from slmpack.adapters.kubelet_dra import dynamic_resources
from slmpack.core.conditions import ReplicaState
from slmpack.core.decide import ClusterSnapshot, with_dra_uuids
from slmpack.core.dra import devices_from_slices, resolve_gpu_ids
from slmpack.exporter.gpu_assignments import gpu_uuids

try:
    pb, _ = load("podresources_v1")
except ProtoSourceMissing as missing:  # a fresh machine before `make k8s-binaries`; `make test` builds it first
    pytest.skip(str(missing), allow_module_level=True)

SLICE = yaml.safe_load((Path(__file__).resolve().parents[1] / "data" / "dra" / "h100-node.yaml").read_text())
H100_GPU0 = "GPU-4cf8db2d-06c0-7d70-1a51-e59b25b2c16c"  # gpu-0 of pool h100-node in that ResourceSlice


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(number: int, payload: bytes | str) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def claim_resource(driver: str, pool: str, device: str) -> bytes:
    # ClaimResource: cdi_devices = 1 (CDIDevice: name = 1), driver_name = 2, pool_name = 3, device_name = 4,
    # share_id = 5
    return (length_delimited(1, length_delimited(1, f"k8s.{driver}/claim=1234-{device}"))
            + length_delimited(2, driver) + length_delimited(3, pool) + length_delimited(4, device)
            + length_delimited(5, "share-1"))


def dynamic_resource(*claimed: bytes) -> bytes:
    # DynamicResource: claim_name = 2, claim_namespace = 3, claim_resources = 4 (class_name = 1 is gone)
    return length_delimited(2, "chat-gpu") + length_delimited(3, "ai") + b"".join(
        length_delimited(4, c) for c in claimed)


def container_with_dra(*claimed: bytes):
    """A ContainerResources as a DRA kubelet sends it (dynamic_resources = 5), read with the 1.20 protos."""
    known = pb.ContainerResources(name="engine").SerializeToString()
    return pb.ContainerResources.FromString(known + length_delimited(5, dynamic_resource(*claimed)))


def test_a_dra_kubelets_allocations_are_read_from_the_field_the_old_protos_do_not_know():
    container = container_with_dra(claim_resource("gpu.nvidia.com", "h100-node", "gpu-0"))
    assert container.name == "engine"
    (resource,) = dynamic_resources(container)
    assert (resource.claim_name, resource.claim_namespace) == ("chat-gpu", "ai")
    (claimed,) = resource.claim_resources
    assert (claimed.driver_name, claimed.pool_name, claimed.device_name) == ("gpu.nvidia.com", "h100-node", "gpu-0")
    assert [d.name for d in claimed.cdi_devices] == ["k8s.gpu.nvidia.com/claim=1234-gpu-0"]
    assert dynamic_resources(pb.ContainerResources(name="plain")) == []


def test_the_exporter_publishes_nvidias_dra_gpus_and_the_operator_names_them_by_uuid():
    container = container_with_dra(claim_resource("gpu.nvidia.com", "h100-node", "gpu-0"),
                                   claim_resource("nic.example.com", "h100-node", "nic-0"))
    pod = pb.PodResources(name="chat-0", namespace="ai", containers=[container])
    assert gpu_uuids([pod]) == {("ai", "chat-0"): "dra:gpu.nvidia.com/h100-node/gpu-0"}  # not the NIC
    devices = devices_from_slices([SLICE])
    assert resolve_gpu_ids(["dra:gpu.nvidia.com/h100-node/gpu-0"], devices) == (H100_GPU0,)
    assert resolve_gpu_ids(["dra:gpu.nvidia.com/elsewhere/gpu-9"], devices) == ("dra:gpu.nvidia.com/elsewhere/gpu-9",)
    replicas = tuple(ReplicaState(name=f"chat-{i}", ready=True, gpu_uuids=("dra:gpu.nvidia.com/h100-node/gpu-0",))
                     for i in range(2))
    resolved = with_dra_uuids(ClusterSnapshot(resource_slices=(SLICE,), pods=replicas))
    assert [p.gpu_uuids for p in resolved.pods] == [(H100_GPU0,), (H100_GPU0,)]
