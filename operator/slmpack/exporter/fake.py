"""A fake GPU node for tests, benchmarks and GPU-less development clusters.

It stands in for NVML only, behind the same `read()` as `NvmlSource`: several GPUs, MPS
client processes, a process that exits between calls, and per-process utilization that
raises NotSupported (None) on chosen GPUs. Energy counters grow with simulated power.
The real NVML path is `NvmlSource`; `slmpack exporter` uses this one only when asked
with `--fake-devices`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from slmpack.exporter.nvml import GpuReading, ProcessReading, Snapshot
from slmpack.exporter.pods import PodRef

GIB = 1024**3


@dataclass
class FakeProcess:
    pid: int
    gpu: int
    pod: PodRef
    memory_bytes: int = 2 * GIB
    sm_percent: float = 25.0
    exits_after_reads: int | None = None  # gone from NVML after this many reads


@dataclass
class FakeNode:
    gpus: int = 2
    power_watts: float = 300.0
    utilization_supported: set[int] = field(default_factory=lambda: {0})
    processes: list[FakeProcess] = field(default_factory=list)
    reads: int = 0
    started: float = field(default_factory=time.monotonic)
    energy_offset_joules: float = 1_000_000.0

    def read(self) -> Snapshot:
        self.reads += 1
        elapsed = time.monotonic() - self.started
        gpus = [GpuReading(index=i, uuid=f"GPU-fake-{i:04d}", product="NVIDIA-H100-80GB-HBM3",
                           power_watts=self.power_watts + 10 * i,
                           energy_joules_total=self.energy_offset_joules + (self.power_watts + 10 * i) * elapsed,
                           power_limit_watts=700.0, gpu_utilization_ratio=0.6, memory_utilization_ratio=0.3,
                           memory_used_bytes=sum(p.memory_bytes for p in self.processes if p.gpu == i),
                           memory_total_bytes=80 * GIB, sm_clock_hertz=1.98e9, temperature_celsius=55.0)
                for i in range(self.gpus)]
        processes = [ProcessReading(p.pid, p.gpu, p.memory_bytes,
                                    p.sm_percent if p.gpu in self.utilization_supported else None)
                     for p in self.processes
                     if p.exits_after_reads is None or self.reads <= p.exits_after_reads]
        return Snapshot(gpus=gpus, processes=processes)


class FakePods:
    """pid → pod for the fake processes."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node

    def lookup(self, pid: int) -> PodRef:
        from slmpack.exporter.pods import UNKNOWN

        return next((p.pod for p in self.node.processes if p.pid == pid), UNKNOWN)


def fake_node(gpus: int, processes_per_gpu: int, namespace: str = "default", deployment: str = "demo") -> FakeNode:
    """`gpus` GPUs with `processes_per_gpu` engine replicas each, as pods of one SLMDeployment."""
    processes = [FakeProcess(pid=10_000 + g * 100 + r, gpu=g, sm_percent=10.0 + 5 * r,
                             pod=PodRef(namespace, f"{deployment}-{g * processes_per_gpu + r}", "engine", deployment))
                 for g in range(gpus) for r in range(processes_per_gpu)]
    return FakeNode(gpus=gpus, processes=processes)
