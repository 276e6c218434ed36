"""The NVML boundary: one call returns what the exporter reads of the GPUs, as plain data.

`NvmlSource` is the real path (nvidia-ml-py). Anything that is not a GPU read stays
out of here, so the fake in `fake.py` can stand in for it where no GPU exists.
A failing device is skipped; a reading a device does not support is None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    product: str
    power_watts: float | None = None
    energy_joules_total: float | None = None  # since the driver loaded
    power_limit_watts: float | None = None
    gpu_utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    sm_clock_hertz: float | None = None
    temperature_celsius: float | None = None


@dataclass(frozen=True)
class ProcessReading:
    pid: int
    gpu_index: int
    used_memory_bytes: int | None
    sm_utilization_percent: float | None = None  # None where NVML does not answer per-process utilization


@dataclass(frozen=True)
class Snapshot:
    gpus: list[GpuReading] = field(default_factory=list)
    processes: list[ProcessReading] = field(default_factory=list)
    failed_devices: list[str] = field(default_factory=list)


class SourceDown(RuntimeError):
    """NVML cannot be used at all (no driver, no GPU); the message names the NVML error."""


class DeviceSource(Protocol):
    def read(self) -> Snapshot: ...


class NvmlSource:
    """Reads NVML at each call; initializes it once, and again after a failure."""

    def __init__(self) -> None:
        import pynvml  # the module nvidia-ml-py installs

        self.nvml = pynvml
        self.ready = False

    def _init(self) -> None:
        if not self.ready:
            try:
                self.nvml.nvmlInit()
            except self.nvml.NVMLError as error:
                raise SourceDown(f"{type(error).__name__}: {error}") from None
            self.ready = True

    def _maybe(self, call, *args, scale: float = 1.0):
        try:
            return call(*args) * scale
        except self.nvml.NVMLError:
            return None

    def read(self) -> Snapshot:
        self._init()
        nvml = self.nvml
        snapshot = Snapshot()
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                snapshot.gpus.append(self._gpu(index, handle))
                snapshot.processes.extend(self._processes(index, handle))
            except nvml.NVMLError as error:
                snapshot.failed_devices.append(f"gpu {index}: {type(error).__name__}")
        return snapshot

    def _gpu(self, index: int, handle) -> GpuReading:
        nvml = self.nvml
        utilization = self._maybe(nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = self._maybe(nvml.nvmlDeviceGetMemoryInfo, handle)
        return GpuReading(
            index=index, uuid=nvml.nvmlDeviceGetUUID(handle), product=nvml.nvmlDeviceGetName(handle),
            power_watts=self._maybe(nvml.nvmlDeviceGetPowerUsage, handle, scale=1e-3),
            energy_joules_total=self._maybe(nvml.nvmlDeviceGetTotalEnergyConsumption, handle, scale=1e-3),
            power_limit_watts=self._maybe(nvml.nvmlDeviceGetEnforcedPowerLimit, handle, scale=1e-3),
            gpu_utilization_ratio=utilization.gpu / 100 if utilization else None,
            memory_utilization_ratio=utilization.memory / 100 if utilization else None,
            memory_used_bytes=memory.used if memory else None,
            memory_total_bytes=memory.total if memory else None,
            sm_clock_hertz=self._maybe(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM, scale=1e6),
            temperature_celsius=self._maybe(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        )

    def _processes(self, index: int, handle) -> list[ProcessReading]:
        nvml = self.nvml
        # MPS clients are listed apart from plain compute processes.
        found = {}
        for lister in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetMPSComputeRunningProcesses):
            try:
                for process in lister(handle):
                    found[process.pid] = process.usedGpuMemory
            except nvml.NVMLError:
                continue
        utilization: dict[int, float] = {}
        try:
            for sample in nvml.nvmlDeviceGetProcessUtilization(handle, 0):
                utilization[sample.pid] = float(sample.smUtil)
        except nvml.NVMLError:
            pass  # NotSupported on many boards and under MPS: attribution falls back to equal shares
        return [ProcessReading(pid, index, used, utilization.get(pid)) for pid, used in found.items()]
