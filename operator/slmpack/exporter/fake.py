"""A fake GPU node for tests, benchmarks and GPU-less development clusters.

`FakeNvml` stands in for the `pynvml` module only: it has the functions `NvmlSource`
calls, in NVML's units (milliwatts, millijoules, bytes), and answers them as go-nvml's
nvml.h documents NVML does:
- under MPS the compute list shows the `nvidia-cuda-mps-server`, the clients are in the
  MPS list;
- `nvmlDeviceGetProcessUtilization(handle, lastSeenTimeStamp)` returns only samples newer
  than the timestamp, only for processes busy in that window, and raises NOT_FOUND when
  there is none; on a GPU without support it raises NOT_SUPPORTED;
- energy is counted in millijoules since the driver loaded.
So the real reading code, `NvmlSource`, runs on top of it; `slmpack exporter` uses it only
when asked with `--fake-devices`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

from slmpack.exporter.pods import UNKNOWN, PodRef

GIB = 1024**3
MPS_SERVER_PID = 999
MPS_DAEMON_POD = PodRef("nvidia-device-plugin", "nvidia-device-plugin-mps-control-daemon-x7k2p", "mps-control-daemon",
                        "")
SAMPLES_KEPT = 100  # NVML keeps a bounded ring of samples per device


@dataclass
class FakeProcess:
    pid: int
    gpu: int
    pod: PodRef
    memory_bytes: int = 2 * GIB
    sm_percent: float = 25.0  # 0: idle, so NVML has no sample of it
    exits_after_reads: int | None = None  # gone from NVML after this many reads of the node


@dataclass
class FakeNode:
    gpus: int = 2
    power_watts: float = 300.0
    utilization_supported: set[int] = field(default_factory=lambda: {0})
    mps: bool = False  # clients of one MPS server per node, as the device plugin's MPS daemon runs it
    processes: list[FakeProcess] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic
    energy_offset_joules: float = 1_000_000.0
    product: str = "NVIDIA H100 80GB HBM3"
    reads: int = 0
    lost: bool = False  # a GPU fell off the bus (Xid 79): NVML answers GPU_IS_LOST until the driver is back
    inits: int = 0  # nvmlInit calls

    def __post_init__(self) -> None:
        self.started = self.clock()

    def live(self, gpu: int) -> list[FakeProcess]:
        return [p for p in self.processes
                if p.gpu == gpu and (p.exits_after_reads is None or self.reads <= p.exits_after_reads)]

    def power(self, gpu: int) -> float:
        return self.power_watts + 10 * gpu

    def energy_joules(self, gpu: int) -> float:
        return self.energy_offset_joules + self.power(gpu) * (self.clock() - self.started)


class NVMLError(Exception):
    """As pynvml's: `.value` is the NVML return code."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {3: "Not Supported", 6: "Not Found", 15: "GPU is lost"}.get(self.value, f"NVML error {self.value}")


class FakeNvml:
    """The `pynvml` functions NvmlSource calls, over a FakeNode."""

    NVML_SUCCESS, NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_NOT_FOUND, NVML_ERROR_GPU_IS_LOST = 0, 3, 6, 15
    NVML_CLOCK_SM, NVML_TEMPERATURE_GPU = 1, 0
    NVMLError = NVMLError

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.samples: dict[int, deque] = {}
        self._last_us = 0

    def nvmlInit(self) -> None:
        self.node.inits += 1

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        if self.node.lost:
            raise NVMLError(self.NVML_ERROR_GPU_IS_LOST)
        self.node.reads += 1  # one read of the node per NvmlSource.read()
        return self.node.gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, gpu: int) -> str:
        return f"GPU-fake-{gpu:04d}"

    def nvmlDeviceGetName(self, gpu: int) -> str:
        return self.node.product

    def nvmlDeviceGetPowerUsage(self, gpu: int) -> int:
        return int(self.node.power(gpu) * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, gpu: int) -> int:
        return int(self.node.energy_joules(gpu) * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, gpu: int) -> int:
        return 700_000

    def nvmlDeviceGetUtilizationRates(self, gpu: int):
        return SimpleNamespace(gpu=60, memory=30)

    def nvmlDeviceGetMemoryInfo(self, gpu: int):
        return SimpleNamespace(used=sum(p.memory_bytes for p in self.node.live(gpu)), total=80 * GIB)

    def nvmlDeviceGetClockInfo(self, gpu: int, clock: int) -> int:
        return 1980

    def nvmlDeviceGetTemperature(self, gpu: int, sensor: int) -> int:
        return 55

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: int) -> list:
        if self.node.mps:
            return [SimpleNamespace(pid=MPS_SERVER_PID, usedGpuMemory=32 * 1024**2)] if self.node.live(gpu) else []
        return [SimpleNamespace(pid=p.pid, usedGpuMemory=p.memory_bytes) for p in self.node.live(gpu)]

    def nvmlDeviceGetMPSComputeRunningProcesses(self, gpu: int) -> list:
        if not self.node.mps:
            return []
        return [SimpleNamespace(pid=p.pid, usedGpuMemory=p.memory_bytes) for p in self.node.live(gpu)]

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        if pid == MPS_SERVER_PID and self.node.mps:
            return "nvidia-cuda-mps-server"
        if any(p.pid == pid for p in self.node.processes):
            return "python3"
        raise NVMLError(self.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetProcessUtilization(self, gpu: int, last_seen_us: int) -> list:
        if gpu not in self.node.utilization_supported:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        ring = self.samples.setdefault(gpu, deque(maxlen=SAMPLES_KEPT))
        # The driver samples busy processes as time passes; here, one sample each per call.
        self._last_us = max(self._last_us + 1, int(self.node.clock() * 1e6))
        for p in self.node.live(gpu):
            if p.sm_percent > 0:
                ring.append(SimpleNamespace(pid=p.pid, timeStamp=self._last_us, smUtil=int(p.sm_percent), memUtil=0,
                                            encUtil=0, decUtil=0))
        newer = [s for s in ring if s.timeStamp > last_seen_us]
        if not newer:
            raise NVMLError(self.NVML_ERROR_NOT_FOUND)
        return newer


class FakePods:
    """pid → pod for the fake processes; the MPS server belongs to the device plugin's daemon pod."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.errors = 0
        self._index: tuple[int, dict[int, PodRef]] = (-1, {})

    def lookup(self, pid: int) -> PodRef:
        if pid == MPS_SERVER_PID and self.node.mps:
            return MPS_DAEMON_POD
        reads, pods = self._index
        if reads != self.node.reads:  # processes change between reads only
            pods = {p.pid: p.pod for p in self.node.processes}
            self._index = (self.node.reads, pods)
        return pods.get(pid, UNKNOWN)


def fake_node(gpus: int, processes_per_gpu: int, namespace: str = "default", deployment: str = "demo",
              mps: bool = True) -> FakeNode:
    """`gpus` GPUs with `processes_per_gpu` engine replicas each, as pods of one SLMDeployment."""
    processes = [FakeProcess(pid=10_000 + g * 100 + r, gpu=g, sm_percent=10.0 + 5 * r,
                             pod=PodRef(namespace, f"{deployment}-{g * processes_per_gpu + r}", "engine", deployment))
                 for g in range(gpus) for r in range(processes_per_gpu)]
    return FakeNode(gpus=gpus, processes=processes, mps=mps, utilization_supported=set(range(gpus)))
