"""The emulator over its real gRPC API on unix sockets, with a registration endpoint in the
kubelet's place: what the kubelet sends and receives, message by message."""

import threading
from concurrent import futures

import grpc
import pytest
from e2e.cluster.nvidia_device_plugin import RESOURCE, SOCKET, GpuNode, Plugin

from slmpack.adapters.kubelet_api import ProtoSourceMissing, load

try:
    pb, services = load("deviceplugin_v1beta1")
except ProtoSourceMissing as missing:  # a fresh machine before `make k8s-binaries`; `make test` builds it first
    pytest.skip(str(missing), allow_module_level=True)


class Registrations(services.RegistrationServicer):
    def __init__(self):
        self.requests, self.arrived = [], threading.Event()

    def Register(self, request, context):
        self.requests.append(request)
        self.arrived.set()
        return pb.Empty()


@pytest.fixture
def plugin_channel(tmp_path):
    plugins = tmp_path / "kubelet" / "device-plugins"
    plugins.mkdir(parents=True)
    kubelet = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    registrations = Registrations()
    services.add_RegistrationServicer_to_server(registrations, kubelet)
    kubelet.add_insecure_port(f"unix://{plugins / 'kubelet.sock'}")
    kubelet.start()
    plugin = Plugin(GpuNode(gpus=2, sharing="mps", replicas=2), plugins, tmp_path / "mps")
    runner = threading.Thread(target=plugin.run, daemon=True)
    runner.start()
    assert registrations.arrived.wait(10), "the plugin never registered"
    with grpc.insecure_channel(f"unix://{plugins / SOCKET}") as channel:
        yield registrations.requests[0], services.DevicePluginStub(channel), plugin, tmp_path
    plugin.stop()
    runner.join(10)
    kubelet.stop(0)


def test_registers_and_lists_the_replicated_devices(plugin_channel):
    registration, stub, plugin, _ = plugin_channel
    assert (registration.version, registration.endpoint, registration.resource_name) == ("v1beta1", SOCKET, RESOURCE)
    assert registration.options.get_preferred_allocation_available
    assert stub.GetDevicePluginOptions(pb.Empty()).get_preferred_allocation_available
    first = next(stub.ListAndWatch(pb.Empty()))
    assert [d.ID for d in first.devices] == plugin.node.device_ids()
    assert {d.health for d in first.devices} == {"Healthy"}


def test_allocate_over_grpc(plugin_channel):
    _, stub, plugin, tmp_path = plugin_channel
    ids = plugin.node.device_ids()
    preferred = stub.GetPreferredAllocation(pb.PreferredAllocationRequest(container_requests=[
        pb.ContainerPreferredAllocationRequest(available_deviceIDs=ids[1:], allocation_size=1)]))
    (choice,) = preferred.container_responses[0].deviceIDs
    assert choice.startswith(plugin.node.uuids[1])  # GPU 0 has a slot in use: distributed picks GPU 1
    answer = stub.Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devicesIDs=[choice])]))
    response = answer.container_responses[0]
    assert dict(response.envs) == {"NVIDIA_VISIBLE_DEVICES": plugin.node.uuids[1],
                                   "CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe"}
    assert [(m.container_path, m.host_path) for m in response.mounts] == [
        ("/mps/nvidia.com/gpu/pipe", str(tmp_path / "mps" / "nvidia.com" / "gpu" / "pipe")),
        ("/dev/shm", str(tmp_path / "mps" / "shm"))]
    assert (tmp_path / "mps" / "shm").is_dir()  # the host side exists, as the MPS daemon makes it
    with pytest.raises(grpc.RpcError) as refused:
        stub.Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devicesIDs=ids[:2])]))
    assert "maximum request size for shared resources is 1; found 2" in refused.value.details()
