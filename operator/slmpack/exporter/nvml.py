"""The NVML boundary: one call returns what the exporter reads of the GPUs, as plain data.

`NvmlSource` reads through the `pynvml` module (nvidia-ml-py), or through any object with
the same functions: `fake.FakeNvml` stands in for it where no GPU exists, so everything
here runs in tests. A failing device is skipped; a reading a device does not support is None.

Who is a tenant: under MPS the server owns the GPU context, so the compute-process list
shows `nvidia-cuda-mps-server`, and the clients (each with its own memory) come from the
MPS list (https://docs.nvidia.com/deploy/mps/, "Tools and Interfaces"). The server runs in
the device plugin's MPS daemon pod and is never a tenant.

Per-process SM utilization comes from `nvmlDeviceGetProcessUtilization` with the last
timestamp seen on that device, so each read covers the time since the previous one
(timestamp 0 would return the whole sample buffer). A process with no sample in that
window, or NOT_FOUND (nothing newer), was idle: 0 %, not unknown. NOT_SUPPORTED (MIG, some
boards) leaves it unknown (None). go-nvml's nvml.h documents these returns.
"""

from __future__ import annotations

import contextlib
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
    sm_utilization_percent: float | None = None  # 0 when idle; None where NVML does not answer it


@dataclass(frozen=True)
class Snapshot:
    gpus: list[GpuReading] = field(default_factory=list)
    processes: list[ProcessReading] = field(default_factory=list)
    failed_devices: list[str] = field(default_factory=list)


class SourceDown(RuntimeError):
    """NVML cannot be used at all (no driver, no GPU); the message names the NVML error."""


class DeviceSource(Protocol):
    def read(self) -> Snapshot: ...


MPS_SERVER = "nvidia-cuda-mps-server"


class NvmlSource:
    """Reads NVML at each call; initializes it once, and again after a failure or once NVML lost the GPUs."""

    def __init__(self, nvml=None) -> None:
        if nvml is None:
            import pynvml  # the module nvidia-ml-py installs

            nvml = pynvml
        self.nvml = nvml
        self.ready = False
        self.last_seen_us: dict[int, int] = {}  # per device index: newest utilization sample read

    def _init(self) -> None:
        if not self.ready:
            try:
                self.nvml.nvmlInit()
            except self.nvml.NVMLError as error:
                raise SourceDown(f"{type(error).__name__}: {error}") from None
            self.ready = True

    def _maybe(self, call, *args, scale: float | None = None):
        """The call's answer (times `scale` where given), or None where the device does not answer it."""
        try:
            value = call(*args)
        except self.nvml.NVMLError:
            return None
        return value if scale is None else value * scale

    def _lost(self, error: Exception) -> SourceDown:
        """NVML stopped answering (a GPU fell off the bus, the driver was reloaded): shut it down, so the
        next read initialises it again and finds the GPUs that are there then."""
        with contextlib.suppress(self.nvml.NVMLError):  # already unusable
            self.nvml.nvmlShutdown()
        self.ready = False
        self.last_seen_us.clear()  # sample timestamps of the old session
        return SourceDown(f"NVML lost the GPUs, initialising it again at the next read: "
                          f"{type(error).__name__}: {error}")

    def read(self) -> Snapshot:
        self._init()
        nvml = self.nvml
        snapshot = Snapshot()
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as error:
            raise self._lost(error) from None
        for index in range(count):
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

    def _tenants(self, handle) -> dict[int, int | None]:
        """pid -> used memory of the processes that use this GPU: MPS clients and plain CUDA processes."""
        nvml = self.nvml
        tenants: dict[int, int | None] = {}
        try:
            for process in nvml.nvmlDeviceGetMPSComputeRunningProcesses(handle):
                tenants[process.pid] = process.usedGpuMemory
        except nvml.NVMLError:
            pass  # an older driver without the MPS list: only plain processes are seen
        for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid not in tenants and not self._is_mps_server(process.pid):
                tenants[process.pid] = process.usedGpuMemory
        return tenants

    def _is_mps_server(self, pid: int) -> bool:
        try:
            name = self.nvml.nvmlSystemGetProcessName(pid)
        except self.nvml.NVMLError:
            return False
        name = name.decode() if isinstance(name, bytes) else name
        return name.rsplit("/", 1)[-1] == MPS_SERVER

    def _sm_utilization(self, index: int, handle) -> dict[int, float] | None:
        """Mean SM percent per pid since the last read of this device; None where not supported."""
        nvml = self.nvml
        try:
            samples = nvml.nvmlDeviceGetProcessUtilization(handle, self.last_seen_us.get(index, 0))
        except nvml.NVMLError as error:
            if getattr(error, "value", None) in (nvml.NVML_ERROR_NOT_FOUND, nvml.NVML_SUCCESS):
                return {}  # no sample newer than the last one: every process was idle
            return None
        per_pid: dict[int, list[float]] = {}
        for sample in samples:
            per_pid.setdefault(sample.pid, []).append(float(sample.smUtil))
            self.last_seen_us[index] = max(self.last_seen_us.get(index, 0), int(sample.timeStamp))
        return {pid: sum(values) / len(values) for pid, values in per_pid.items()}

    def _processes(self, index: int, handle) -> list[ProcessReading]:
        tenants = self._tenants(handle)
        utilization = self._sm_utilization(index, handle)
        return [ProcessReading(pid, index, used, None if utilization is None else utilization.get(pid, 0.0))
                for pid, used in tenants.items()]
