"""Splitting each GPU's energy among the pods that share it (pure).

At every scrape the energy a GPU used since the previous scrape is split among the
pods with processes on it: in proportion to their SM utilization where NVML reports
per-process utilization, otherwise in equal shares. Energy used while no pod runs on the
GPU is its idle energy. So, per GPU, the pods' shares plus idle add up to the board's
energy. Each pod's share is added to a counter keyed by the pod (not the process), so the
counter stays monotonic when a container restarts and the pod keeps its name, as
StatefulSet pods do. A pod not seen for `forget_after_s` is forgotten, so the number of
series stays bounded under pod churn (Prometheus sees its series end).

Limits: the split is as fine as the scrape interval; equal shares ignore how busy each
replica is.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

PROCESS_UTILIZATION = "process_utilization"
EQUAL_SHARE = "equal_share"
IDLE = "idle"  # no pod on the GPU
SHARES = (PROCESS_UTILIZATION, EQUAL_SHARE, IDLE)


def split(energy_joules: float, utilization: Mapping[Hashable, float | None]) -> tuple[dict, str]:
    """Shares of `energy_joules` per key, and how it was split."""
    if not utilization:
        return {}, IDLE
    known = {k: u for k, u in utilization.items() if u is not None}
    if len(known) == len(utilization) and sum(known.values()) > 0:
        total = sum(known.values())
        return {k: energy_joules * u / total for k, u in known.items()}, PROCESS_UTILIZATION
    share = energy_joules / len(utilization)  # unknown utilization, or every pod idle
    return {k: share for k in utilization}, EQUAL_SHARE


@dataclass
class EnergyLedger:
    """Per-pod energy counters, fed with each GPU's total-energy reading at every scrape."""

    forget_after_s: float = 600.0
    last_total: dict[str, float] = field(default_factory=dict)  # per GPU uuid
    counters: dict[Hashable, float] = field(default_factory=dict)  # per (GPU uuid, pod)
    by_share: dict[tuple[str, str], float] = field(default_factory=dict)  # per (GPU uuid, one of SHARES)
    last_seen: dict[Hashable, float] = field(default_factory=dict)  # per (GPU uuid, pod), in seconds

    def record(self, gpu: str, energy_total_joules: float | None,
               utilization: Mapping[Hashable, float | None], now: float) -> None:
        """Add the GPU's energy since the last call to its pods' counters (or to idle)."""
        for share in SHARES:
            self.by_share.setdefault((gpu, share), 0.0)
        for key in utilization:
            self.counters.setdefault(key, 0.0)
            self.last_seen[key] = now
        if energy_total_joules is None:
            return
        previous = self.last_total.get(gpu)
        self.last_total[gpu] = energy_total_joules
        # No previous reading, or the counter went back (driver reload): nothing to split yet.
        delta = energy_total_joules - previous if previous is not None and energy_total_joules >= previous else 0.0
        shares, how = split(delta, utilization)
        for key, joules in shares.items():
            self.counters[key] += joules
        self.by_share[(gpu, how)] += delta

    def forget(self, now: float) -> list[Hashable]:
        """Drop the counters of pods not seen for `forget_after_s`; returns their keys."""
        gone = [key for key, seen in self.last_seen.items() if now - seen > self.forget_after_s]
        for key in gone:
            del self.counters[key], self.last_seen[key]
        return gone
