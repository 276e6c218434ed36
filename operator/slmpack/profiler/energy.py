"""GPU energy over a measured interval, from NVML's total-energy counter.

Without a GPU (or NVML) nothing is measured: the reading is null with the reason,
never zero, so a report cannot pass off "no data" as "no energy".
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class EnergyReading:
    joules: float | None
    mean_watts: float | None
    note: str | None = None


class NvmlEnergyMeter:
    """Sums the total-energy counters (mJ since driver load) of the GPUs this process can see."""

    def __init__(self) -> None:
        import pynvml  # from nvidia-ml-py

        self.nvml = pynvml
        self.note: str | None = None
        self.handles = []
        try:
            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError as error:
            self.note = f"not measured: {type(error).__name__}"
        self._start: tuple[float, float] | None = None

    def _total_mj(self) -> float:
        return float(sum(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles))

    def start(self) -> None:
        if self.handles:
            try:
                self._start = (time.perf_counter(), self._total_mj())
            except self.nvml.NVMLError as error:
                self.note, self.handles = f"not measured: {type(error).__name__}", []

    def stop(self) -> EnergyReading:
        if not self.handles or self._start is None:
            return EnergyReading(None, None, self.note or "not measured: no GPU")
        started, energy_mj = self._start
        joules = (self._total_mj() - energy_mj) / 1000
        seconds = time.perf_counter() - started
        return EnergyReading(round(joules, 3), round(joules / seconds, 2) if seconds > 0 else None)
