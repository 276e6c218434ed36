"""An emulated NVIDIA device plugin with GPU feature discovery, for a node without GPUs.

It speaks the kubelet's device-plugin API v1beta1 for real (stubs compiled from Kubernetes'
own api.proto, see `slmpack.adapters.kubelet_api`): it serves `nvidia-gpu.sock` in the
kubelet's device-plugins directory, registers `nvidia.com/gpu` on `kubelet.sock`, and answers
ListAndWatch, GetDevicePluginOptions, GetPreferredAllocation, Allocate and PreStartContainer.
Only the GPUs are missing: the kubelet, its admission and the containers are real.

What it follows in NVIDIA/k8s-device-plugin (v0.20):
- internal/rm/device_map.go and api/config/v1/replicas.go: a shared GPU becomes R >= 2 devices
  `<uuid>::<replica>`;
  capacity is count x R.
- internal/rm/rm.go (ValidateRequest): under MPS (failRequestsGreaterThanOne defaults to
  true) a container asking for more than one replica is refused, "maximum request size for
  shared resources is 1; found N"; the kubelet then fails the pod with UnexpectedAdmissionError.
  Time-slicing leaves the flag unset, so nothing is refused there.
- internal/rm/allocate.go (greedyAlloc) and internal/rm/nvml_manager.go: replicas are
  picked one by one from the GPU with the fewest (`distributed`, the default) or the most
  (`packed`) replicas in use, ties broken by the GPU picked least in this request. Upstream
  breaks the remaining ties in Go map order; here the kubelet's order of `available` does,
  so runs repeat. Whole GPUs (no sharing) go through NVLink-aware alignedAlloc upstream;
  these GPUs have no links, so the first available ones are taken.
- internal/plugin/server.go: `Register` with GetPreferredAllocationAvailable; Allocate answers
  `NVIDIA_VISIBLE_DEVICES=<uuid>[,<uuid>]` (deviceListStrategy envvar, deviceIDStrategy uuid)
  and no device specs (passDeviceSpecs is false by default).
- internal/plugin/mps.go, cmd/mps-control-daemon/mps/{root,daemon}.go: under MPS a container
  also gets `CUDA_MPS_PIPE_DIRECTORY=/mps/nvidia.com/gpu/pipe` and two host mounts,
  `<mps root>/nvidia.com/gpu/pipe` there and `<mps root>/shm` at `/dev/shm`. The per-client
  memory and thread limits are the MPS daemon's defaults, never client env.
- internal/lm/resource.go and internal/lm/nvml.go (GFD): `nvidia.com/gpu.product` is the NVML
  name with characters outside `A-Za-z0-9-_. ` dropped and spaces turned into `-`, plus
  `-SHARED` when R > 1; `.replicas` is R, `.sharing-strategy` is `none` unless R > 1, `.count`
  counts physical GPUs, `.memory` is MiB; `nvidia.com/mps.capable` is true only under MPS.
  They are written to the Node through the API, as GFD does through NFD, and written again
  where they drifted every --label-interval (GFD's --sleep-interval, 60 s by default:
  cmd/gpu-feature-discovery/main.go).

Settings (flags, or the environment variables that e2e/cluster/cluster.sh passes on):
SLMPACK_GPUS, SLMPACK_GPU_SHARING, SLMPACK_GPU_REPLICAS, SLMPACK_GPU_PRODUCT,
SLMPACK_GPU_MEMORY_MIB, SLMPACK_GPU_ALLOCATION_POLICY, SLMPACK_GPU_OPERATOR=1 to label the node as
NVIDIA's GPU Operator does (`nvidia.com/gpu.present=true`, which GFD alone does not write),
SLMPACK_GPU_CDI=1 to allocate as the GPU Operator's plugin does by default (CDI device names in
`cdi.k8s.io/` annotations, no NVIDIA_VISIBLE_DEVICES: no node label shows this), and
SLMPACK_GPU_TAINT=1 to taint the node `nvidia.com/gpu=present:NoSchedule`, as GPU pools often are.

    PYTHONPATH=operator python -m e2e.cluster.nvidia_device_plugin --kubeconfig .cluster/kubeconfig \
        --mps-root .cluster/nvidia-mps --gpus 2 --sharing mps --replicas 4

Kubelet 1.20 serves the registration socket at the fixed /var/lib/kubelet/device-plugins/,
whatever its --root-dir (kubernetes/kubernetes:staging/src/k8s.io/kubelet/pkg/apis/deviceplugin/
v1beta1/constants.go, DevicePluginPath, used by pkg/kubelet/cm/devicemanager/manager.go), so
that is the default of --plugin-dir.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import threading
import uuid
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("nvidia-device-plugin")

RESOURCE = "nvidia.com/gpu"
SOCKET = "nvidia-gpu.sock"  # "nvidia-" + the resource's name part, as getPluginSocketPath forms it
SHARING = ("none", "mps", "time-slicing")
POLICIES = ("distributed", "packed")
MPS_CONTAINER_ROOT = "/mps"
DEVICE_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")  # pluginapi.DevicePluginPath in kubelet 1.20
MPS_HOST_ROOT = Path("/run/nvidia/mps")  # the plugin's default mps.root
LABEL_PREFIX = "nvidia.com/"
CDI_KIND = "k8s.device-plugin.nvidia.com/gpu"
H100 = ("NVIDIA H100 80GB HBM3", 81559)


class AllocationRefused(ValueError):
    """What the plugin answers Allocate with an error for; the kubelet refuses the pod."""


@dataclass(frozen=True)
class GpuNode:
    """The emulated node's GPUs and the plugin's configuration (pure: no I/O)."""

    gpus: int = 1
    sharing: str = "mps"
    replicas: int = 4
    product: str = H100[0]  # the NVML name
    memory_mib: int = H100[1]
    policy: str = "distributed"
    node: str = "localhost"
    # NVIDIA's GPU Operator also labels its nodes nvidia.com/gpu.present=true; GFD alone, beside a
    # plain device plugin, does not. Off by default, so that what works here works without it.
    gpu_operator: bool = False
    # Allocate as the GPU Operator's plugin does since v25.10 (deviceListStrategy cdi-annotations): CDI
    # device names in annotations and no NVIDIA_VISIBLE_DEVICES (NVIDIA/k8s-device-plugin
    # internal/plugin/server.go, getAllocateResponseForCDI; NVIDIA/gpu-operator controllers/object_controls.go).
    cdi: bool = False
    # Taint the node nvidia.com/gpu=present:NoSchedule, as managed GPU pools are.
    taint: bool = False

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"gpus (SLMPACK_GPUS) must be at least 1, got {self.gpus}")
        if self.sharing not in SHARING:
            raise ValueError(f"sharing (SLMPACK_GPU_SHARING) must be one of {', '.join(SHARING)}, got {self.sharing!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy (SLMPACK_GPU_ALLOCATION_POLICY) must be one of {', '.join(POLICIES)}, "
                             f"got {self.policy!r}")
        if self.sharing == "none" and self.replicas != 1:
            raise ValueError(f"replicas (SLMPACK_GPU_REPLICAS) must be 1 without sharing, got {self.replicas}")
        if self.sharing != "none" and self.replicas < 2:
            raise ValueError(f"replicas (SLMPACK_GPU_REPLICAS) must be at least 2 under {self.sharing}, "
                             f"got {self.replicas}; use sharing none for whole GPUs")

    @property
    def uuids(self) -> list[str]:
        """Stable per node and index, in NVML's `GPU-<uuid>` form."""
        return [f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{self.node}.gpu{i}.slmpack.dev')}" for i in range(self.gpus)]

    @property
    def shared(self) -> bool:
        return self.sharing != "none"

    def device_ids(self) -> list[str]:
        if not self.shared:
            return self.uuids
        return [f"{gpu}::{replica}" for gpu in self.uuids for replica in range(self.replicas)]

    def labels(self) -> dict[str, str]:
        product = "-".join(re.sub(r"[^A-Za-z0-9-_. ]", "", self.product).split())
        return {
            **({"nvidia.com/gpu.present": "true"} if self.gpu_operator else {}),
            "nvidia.com/gpu.product": f"{product}-SHARED" if self.replicas > 1 else product,
            "nvidia.com/gpu.count": str(self.gpus),
            "nvidia.com/gpu.replicas": str(self.replicas),
            "nvidia.com/gpu.sharing-strategy": self.sharing if self.replicas > 1 else "none",
            "nvidia.com/gpu.memory": str(self.memory_mib),
            "nvidia.com/mps.capable": str(self.sharing == "mps").lower(),
            "nvidia.com/mig.capable": "false",
        }

    def taints(self) -> list[dict]:
        return [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}] if self.taint else []

    def preferred(self, available: list[str], required: list[str], size: int) -> list[str]:
        """GetPreferredAllocation for one container."""
        candidates = [d for d in available if d not in required]
        needed = size - len(required)
        if len(candidates) < needed:
            raise AllocationRefused("not enough available devices to satisfy allocation")
        if not self.shared:
            return [*required, *candidates[:needed]]
        gpu_of = {d: gpu_uuid(d) for d in self.device_ids()}
        free = {gpu: 0 for gpu in self.uuids}
        for device in candidates:
            free[gpu_of[device]] += 1
        in_use = {gpu: self.replicas - free[gpu] for gpu in self.uuids}
        picked = dict.fromkeys(self.uuids, 0)
        sign = 1 if self.policy == "distributed" else -1
        chosen = []
        for _ in range(needed):
            # A stable sort on the kubelet's order stands in for Go's map-order ties.
            best = min(candidates, key=lambda d: (sign * in_use[gpu_of[d]], picked[gpu_of[d]]))
            candidates.remove(best)
            in_use[gpu_of[best]] += 1
            picked[gpu_of[best]] += 1
            chosen.append(best)
        return [*required, *chosen]

    def allocate(self, device_ids: list[str], mps_root: Path) -> dict:
        """Allocate for one container: {"envs": {...}, "mounts": [(container, host), ...]}."""
        known = set(self.device_ids())
        for device in device_ids:
            if device not in known:
                raise AllocationRefused(f'invalid allocation request for "{RESOURCE}": '
                                        f"invalid request: unknown device: {device}")
        if self.sharing == "mps" and len(device_ids) > 1:
            raise AllocationRefused(f'invalid allocation request for "{RESOURCE}": invalid request: '
                                    f"maximum request size for shared resources is 1; found {len(device_ids)}")
        gpus = list(dict.fromkeys(gpu_uuid(d) for d in device_ids))
        if self.cdi:
            # cdiapi.UpdateAnnotations(annotations, "nvidia-device-plugin", <response uuid>, devices), with the
            # plugin's CDI kind k8s.device-plugin.nvidia.com/gpu (tags.k8s.io/container-device-interface).
            names = ",".join(f"{CDI_KIND}={gpu}" for gpu in gpus)
            response = {"envs": {}, "mounts": [],
                        "annotations": {f"cdi.k8s.io/nvidia-device-plugin_{uuid.uuid4()}": names}}
        else:
            response = {"envs": {"NVIDIA_VISIBLE_DEVICES": ",".join(gpus)}, "mounts": [], "annotations": {}}
        if self.sharing == "mps":
            pipe = f"{MPS_CONTAINER_ROOT}/{RESOURCE}/pipe"
            response["envs"]["CUDA_MPS_PIPE_DIRECTORY"] = pipe
            response["mounts"] = [(pipe, str(mps_root / RESOURCE / "pipe")), ("/dev/shm", str(mps_root / "shm"))]
        return response

    @classmethod
    def from_env(cls, env=os.environ, **overrides) -> GpuNode:
        sharing = env.get("SLMPACK_GPU_SHARING", "mps")
        settings = {
            "gpus": int(env.get("SLMPACK_GPUS", "1")),
            "sharing": sharing,
            "replicas": int(env.get("SLMPACK_GPU_REPLICAS", "1" if sharing == "none" else "4")),
            "product": env.get("SLMPACK_GPU_PRODUCT", H100[0]),
            "memory_mib": int(env.get("SLMPACK_GPU_MEMORY_MIB", str(H100[1]))),
            "policy": env.get("SLMPACK_GPU_ALLOCATION_POLICY", "distributed"),
            "gpu_operator": env.get("SLMPACK_GPU_OPERATOR", "0") == "1",
            "cdi": env.get("SLMPACK_GPU_CDI", "0") == "1",
            "taint": env.get("SLMPACK_GPU_TAINT", "0") == "1",
        }
        return cls(**{**settings, **{k: v for k, v in overrides.items() if v is not None}})


def gpu_uuid(device_id: str) -> str:
    """The physical GPU of a device ID, replica annotation (`::n`) removed."""
    return device_id.split("::", 1)[0]


class Plugin:
    """The gRPC shell around GpuNode: serves the plugin socket and registers with the kubelet."""

    def __init__(self, node: GpuNode, plugins_dir: Path, mps_root: Path) -> None:
        import grpc

        from slmpack.adapters.kubelet_api import load

        self.grpc = grpc
        self.pb, self.services = load("deviceplugin_v1beta1")
        self.node, self.mps_root = node, mps_root
        self.plugins_dir = plugins_dir
        self.socket = self.plugins_dir / SOCKET
        self.stopped = threading.Event()
        self.server = None
        self.allocations = 0

    # --- the DevicePlugin service -------------------------------------------------------------
    def GetDevicePluginOptions(self, request, context):
        return self.pb.DevicePluginOptions(get_preferred_allocation_available=True)

    def ListAndWatch(self, request, context):
        yield self.pb.ListAndWatchResponse(devices=[self.pb.Device(ID=d, health="Healthy")
                                                    for d in self.node.device_ids()])
        # Emulated GPUs never turn unhealthy: hold the stream until the plugin or kubelet stops.
        while not self.stopped.wait(1) and context.is_active():
            pass

    def GetPreferredAllocation(self, request, context):
        responses = []
        for req in request.container_requests:
            try:
                chosen = self.node.preferred(list(req.available_deviceIDs), list(req.must_include_deviceIDs),
                                             req.allocation_size)
            except AllocationRefused as error:
                context.abort(self.grpc.StatusCode.UNKNOWN, f"error getting list of preferred allocation devices: "
                                                            f"{error}")
            log.info("preferred %s of %d available", chosen, len(req.available_deviceIDs))
            responses.append(self.pb.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return self.pb.PreferredAllocationResponse(container_responses=responses)

    def Allocate(self, request, context):
        responses = []
        for req in request.container_requests:
            try:
                answer = self.node.allocate(list(req.devicesIDs), self.mps_root)
            except AllocationRefused as error:
                log.warning("refused %s: %s", list(req.devicesIDs), error)
                context.abort(self.grpc.StatusCode.UNKNOWN, str(error))
            log.info("allocated %s: %s", list(req.devicesIDs), answer["envs"])
            responses.append(self.pb.ContainerAllocateResponse(
                envs=answer["envs"], annotations=answer["annotations"],
                mounts=[self.pb.Mount(container_path=c, host_path=h) for c, h in answer["mounts"]]))
        self.allocations += 1
        return self.pb.AllocateResponse(container_responses=responses)

    def PreStartContainer(self, request, context):
        return self.pb.PreStartContainerResponse()

    # --- lifecycle ----------------------------------------------------------------------------
    def serve(self) -> None:
        if self.node.sharing == "mps":
            # What the MPS control daemon creates on the host; the pods mount these.
            (self.mps_root / RESOURCE / "pipe").mkdir(parents=True, exist_ok=True)
            (self.mps_root / "shm").mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        self.server = self.grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.services.add_DevicePluginServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{self.socket}")
        self.server.start()

    def register(self) -> None:
        with self.grpc.insecure_channel(f"unix://{self.plugins_dir / 'kubelet.sock'}") as channel:
            self.services.RegistrationStub(channel).Register(self.pb.RegisterRequest(
                version="v1beta1", endpoint=SOCKET, resource_name=RESOURCE,
                options=self.pb.DevicePluginOptions(get_preferred_allocation_available=True)), timeout=10)
        log.info("registered %s: %d devices on %d GPUs (%s, R=%d, %s)", RESOURCE, len(self.node.device_ids()),
                 self.node.gpus, self.node.sharing, self.node.replicas, self.node.policy)

    def run(self, on_registered=None) -> None:
        """Serve and register; when the kubelet restarts it wipes our socket, so start over then."""
        while not self.stopped.is_set():
            self.serve()
            try:
                self.register()
            except self.grpc.RpcError as error:
                log.warning("kubelet did not take the registration (%s); retrying", error.code())
                self.server.stop(0)
                self.stopped.wait(2)
                continue
            if on_registered:
                on_registered()
            while not self.stopped.wait(1) and self.socket.exists():
                pass
            self.server.stop(1)
        self.socket.unlink(missing_ok=True)

    def stop(self, *_) -> None:
        self.stopped.set()


class NodeLabels:
    """GFD's side: the node's nvidia.com/ labels through the API, cleared again on stop."""

    def __init__(self, kubeconfig: str | None, node: str) -> None:
        from kubernetes import client, config

        self.api = client.CoreV1Api(config.new_client_from_config(kubeconfig))
        self.node = node

    def write(self, labels: dict[str, str], taints: list[dict] = ()) -> None:
        """Make the node's nvidia.com/ labels and taints exactly these (a no-op when they are)."""
        node = self.api.read_node(self.node)
        current = node.metadata.labels or {}
        stale = {k: None for k in current if k.startswith(LABEL_PREFIX) and k not in labels}
        changed = {k: v for k, v in labels.items() if current.get(k) != v}
        if stale or changed:
            self.api.patch_node(self.node, {"metadata": {"labels": {**stale, **changed}}})
        present = [{k: v for k, v in (("key", t.key), ("value", t.value), ("effect", t.effect)) if v}
                   for t in node.spec.taints or []]
        others = [t for t in present if not t["key"].startswith(LABEL_PREFIX)]
        if [t for t in present if t not in others] != list(taints):
            self.api.patch_node(self.node, {"spec": {"taints": others + list(taints)}})

    def keep(self, labels: dict[str, str], interval_s: float, stop: threading.Event, taints: list[dict] = ()) -> None:
        """Write the labels (and taints) now and again every interval, as GFD relabels after each sleep."""
        while True:
            try:
                self.write(labels, taints)
            except Exception as error:  # the API away: the kubelet still has the devices
                log.warning("could not label the node: %s", error)
            if stop.wait(interval_s):
                return

    def clear(self) -> None:
        self.write({})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugin-dir", type=Path, default=DEVICE_PLUGIN_DIR,
                        help=f"the kubelet's device-plugins directory (default {DEVICE_PLUGIN_DIR})")
    parser.add_argument("--kubeconfig", help="for the node labels (default: in-cluster or ~/.kube/config)")
    parser.add_argument("--node", default="localhost", help="this node's name")
    parser.add_argument("--mps-root", type=Path, default=MPS_HOST_ROOT,
                        help=f"host dir of the MPS pipe and shm (default {MPS_HOST_ROOT}, as the plugin's mps.root)")
    parser.add_argument("--gpus", type=int, help="G, physical GPUs (SLMPACK_GPUS, default 1)")
    parser.add_argument("--sharing", choices=SHARING, help="SLMPACK_GPU_SHARING (default mps)")
    parser.add_argument("--replicas", type=int, help="R, replicas per GPU (SLMPACK_GPU_REPLICAS, default 4; 1 "
                        "without sharing)")
    parser.add_argument("--product", help="NVML name (SLMPACK_GPU_PRODUCT, default 'NVIDIA H100 80GB HBM3')")
    parser.add_argument("--memory-mib", type=int, help="per GPU (SLMPACK_GPU_MEMORY_MIB, default 81559)")
    parser.add_argument("--label-interval", type=float, default=60.0,
                        help="seconds between checks of the node labels (GFD's --sleep-interval, default 60)")
    parser.add_argument("--policy", choices=POLICIES, help="shared devices allocation policy "
                        "(SLMPACK_GPU_ALLOCATION_POLICY, default distributed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        node = GpuNode.from_env(gpus=args.gpus, sharing=args.sharing, replicas=args.replicas, product=args.product,
                                memory_mib=args.memory_mib, policy=args.policy, node=args.node)
    except ValueError as error:
        parser.error(str(error))
    plugin = Plugin(node, args.plugin_dir, args.mps_root)
    labels = NodeLabels(args.kubeconfig, args.node)
    signal.signal(signal.SIGTERM, plugin.stop)
    signal.signal(signal.SIGINT, plugin.stop)
    labelling = threading.Thread(target=labels.keep, args=(node.labels(), args.label_interval, plugin.stopped,
                                                           node.taints()), daemon=True)
    try:
        plugin.run(on_registered=lambda: labelling.is_alive() or labelling.start())
    finally:
        log.info("stopped after %d Allocate calls", plugin.allocations)
        plugin.stop()
        if labelling.is_alive():
            labelling.join(10)
        labels.clear()


if __name__ == "__main__":
    main()
