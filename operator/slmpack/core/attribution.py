"""Splitting each GPU's energy among the pods that share it (pure).

At every scrape the energy a GPU used since the previous scrape is split among the
pods with processes on it: in proportion to their SM utilization where NVML reports
per-process utilization, otherwise in equal shares. Each pod's share is added to a
counter keyed by the pod (not the process), so the counter stays monotonic when a
container restarts and the pod keeps its name, as StatefulSet pods do.

Limits: the split is as fine as the scrape interval; equal shares ignore how busy each
replica is; energy drawn while no process runs (idle power) goes to no pod.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

PROCESS_UTILIZATION = "process_utilization"
EQUAL_SHARE = "equal_share"


def split(energy_joules: float, utilization: Mapping[Hashable, float | None]) -> tuple[dict, str]:
    """Shares of `energy_joules` per key, and the method used."""
    if not utilization:
        return {}, EQUAL_SHARE
    known = {k: u for k, u in utilization.items() if u is not None}
    if len(known) == len(utilization) and sum(known.values()) > 0:
        total = sum(known.values())
        return {k: energy_joules * u / total for k, u in known.items()}, PROCESS_UTILIZATION
    share = energy_joules / len(utilization)
    return {k: share for k in utilization}, EQUAL_SHARE


@dataclass
class EnergyLedger:
    """Per-pod energy counters, fed with each GPU's total-energy reading at every scrape."""

    last_total: dict[str, float] = field(default_factory=dict)  # per GPU uuid
    counters: dict[Hashable, float] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)  # per GPU uuid

    def record(self, gpu: str, energy_total_joules: float | None,
               utilization: Mapping[Hashable, float | None]) -> str:
        """Add the GPU's energy since the last call to the pods' counters; returns the method used."""
        for key in utilization:
            self.counters.setdefault(key, 0.0)
        if energy_total_joules is None:
            return self.methods.get(gpu, EQUAL_SHARE)
        previous = self.last_total.get(gpu)
        self.last_total[gpu] = energy_total_joules
        # No previous reading, or the counter went back (driver reload): nothing to split yet.
        delta = energy_total_joules - previous if previous is not None and energy_total_joules >= previous else 0.0
        shares, method = split(delta, utilization)
        for key, joules in shares.items():
            self.counters[key] += joules
        self.methods[gpu] = method
        return method
