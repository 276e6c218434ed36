"""The Prometheus collector: reads the GPUs at scrape time and builds fresh metric families.

No polling thread and no cache of readings: each scrape calls the device source once.
The only state is the per-pod energy ledger, which must persist for its counters to be
counters; it forgets pods gone for a grace period, so cardinality stays bounded. Scrapes
may come concurrently (a threaded server, two Prometheus replicas): one runs at a time.
Every family keeps one label set for its whole life. Names follow DCGM's fields under the
`slmpack_` prefix, in base units.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from slmpack.core.attribution import SHARES, EnergyLedger
from slmpack.exporter.nvml import DeviceSource, SourceDown
from slmpack.exporter.pods import UNKNOWN, PodDirectory, PodRef

log = logging.getLogger(__name__)
GPU_LABELS = ["gpu", "uuid", "product"]
POD_LABELS = ["gpu", "uuid", "namespace", "pod", "container", "slmdeployment"]


def pod_labels(index: str, uuid: str, ref: PodRef) -> dict[str, str]:
    """A pod's labels on a GPU; `engine` too for a pack pod's engine, so each engine has its own series."""
    labels = dict(zip(POD_LABELS, (index, uuid, ref.namespace, ref.pod, ref.container, ref.slmdeployment),
                      strict=True))
    return labels | ({"engine": ref.engine} if ref.engine else {})

# (attribute of GpuReading, metric name, help naming the DCGM field it corresponds to)
GPU_GAUGES = [
    ("power_watts", "slmpack_gpu_power_watts", "GPU power draw in watts (DCGM_FI_DEV_POWER_USAGE)."),
    ("power_limit_watts", "slmpack_gpu_power_limit_watts",
     "Enforced power limit in watts (DCGM_FI_DEV_POWER_MGMT_LIMIT)."),
    ("gpu_utilization_ratio", "slmpack_gpu_utilization_ratio", "GPU utilization, 0 to 1 (DCGM_FI_DEV_GPU_UTIL / 100)."),
    ("memory_utilization_ratio", "slmpack_gpu_memory_utilization_ratio",
     "Memory bandwidth utilization, 0 to 1 (DCGM_FI_DEV_MEM_COPY_UTIL / 100)."),
    ("memory_used_bytes", "slmpack_gpu_memory_used_bytes", "Framebuffer memory used in bytes (DCGM_FI_DEV_FB_USED)."),
    ("memory_total_bytes", "slmpack_gpu_memory_total_bytes", "Framebuffer memory in bytes (DCGM_FI_DEV_FB_TOTAL)."),
    ("sm_clock_hertz", "slmpack_gpu_sm_clock_hertz", "SM clock in hertz (DCGM_FI_DEV_SM_CLOCK)."),
    ("temperature_celsius", "slmpack_gpu_temperature_celsius", "GPU temperature (DCGM_FI_DEV_GPU_TEMP)."),
]


class GpuCollector(Collector):
    def __init__(self, source: DeviceSource | None, pods: PodDirectory | None,
                 source_error: str | None = None, forget_after_s: float = 600.0, clock=time.monotonic) -> None:
        self.source, self.pods = source, pods
        self.source_error = source_error  # why there is no source at all
        self.ledger = EnergyLedger(forget_after_s=forget_after_s)
        self.clock = clock
        self.nvml_up = False
        self.last_error: str | None = source_error
        self._logged_down = False
        self._lock = threading.Lock()

    def describe(self):
        return []  # families are built at scrape time

    def collect(self):
        with self._lock:
            return list(self._collect())

    def _collect(self):
        up = GaugeMetricFamily("slmpack_exporter_nvml_up", "1 when NVML answered this scrape, 0 when not.")
        info = InfoMetricFamily("slmpack_exporter_nvml", "Why NVML did not answer, when it did not.")
        lookup_errors = CounterMetricFamily("slmpack_exporter_pod_lookup_errors",
                                            "Failed or timed-out lists of this node's pods (the last list is kept).")
        lookup_errors.add_metric([], getattr(self.pods, "errors", 0))
        yield lookup_errors
        try:
            if self.source is None:
                raise SourceDown(self.source_error or "no device source")
            snapshot = self.source.read()
        except SourceDown as error:
            self.nvml_up, self.last_error = False, str(error)
            if not self._logged_down:
                log.warning("NVML is not available, serving no GPU metrics: %s", error)
                self._logged_down = True
            up.add_metric([], 0)
            info.add_metric([], {"error": str(error)})
            yield from (up, info)
            return
        self.nvml_up, self.last_error, self._logged_down = True, None, False
        up.add_metric([], 1)
        info.add_metric([], {"error": "; ".join(snapshot.failed_devices)})
        yield from (up, info)
        yield from self._gpu_families(snapshot)
        yield from self._pod_families(snapshot)

    def _gpu_families(self, snapshot):
        for attribute, name, help_text in GPU_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=GPU_LABELS)
            for gpu in snapshot.gpus:
                value = getattr(gpu, attribute)
                if value is not None:
                    family.add_metric([str(gpu.index), gpu.uuid, gpu.product], value)
            yield family
        energy = CounterMetricFamily(
            "slmpack_gpu_energy_joules", "Energy used since the driver loaded, in joules "
            "(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION is the same counter in millijoules).", labels=GPU_LABELS)
        for gpu in snapshot.gpus:
            if gpu.energy_joules_total is not None:
                energy.add_metric([str(gpu.index), gpu.uuid, gpu.product], gpu.energy_joules_total)
        yield energy

    def _pod_families(self, snapshot):
        gpus = {g.index: g for g in snapshot.gpus}
        memory = defaultdict(float)
        # Per GPU and pod: the SM percent of its processes summed; None once one of them is unknown.
        utilization: dict[str, dict[PodRef, float | None]] = defaultdict(dict)
        for process in snapshot.processes:
            gpu = gpus.get(process.gpu_index)
            ref = self.pods.lookup(process.pid) if self.pods else UNKNOWN
            if gpu is None or ref == UNKNOWN:
                continue  # not a pod's process, or it exited between the NVML read and the lookup
            key = (gpu.index, gpu.uuid, ref)
            memory[key] += process.used_memory_bytes or 0
            previous = utilization[gpu.uuid].get(ref, 0.0)
            current = process.sm_utilization_percent
            utilization[gpu.uuid][ref] = None if current is None or previous is None else previous + current

        used = GaugeMetricFamily("slmpack_pod_gpu_memory_used_bytes",
                                 "GPU memory used by a pod's processes, in bytes.", labels=POD_LABELS)
        presence = GaugeMetricFamily("slmpack_pod_gpu_info", "1 for each pod with processes on a GPU.",
                                     labels=POD_LABELS)
        sm = GaugeMetricFamily("slmpack_pod_gpu_sm_utilization_ratio",
                               "SM utilization of a pod's processes since the previous scrape, 0 to 1; 0 when idle, "
                               "absent where the GPU does not report it per process.", labels=POD_LABELS)
        for (index, uuid, ref), value in sorted(memory.items(), key=lambda kv: (kv[0][0], kv[0][2].pod)):
            labels = pod_labels(str(index), uuid, ref)
            used.add_sample(used.name, labels, value)
            presence.add_sample(presence.name, labels, 1)
            percent = utilization[uuid][ref]
            if percent is not None:
                sm.add_sample(sm.name, labels, percent / 100)
        yield from (used, presence, sm)

        now = self.clock()
        for gpu in snapshot.gpus:
            self.ledger.record(gpu.uuid, gpu.energy_joules_total,
                               {(gpu.uuid, ref): u for ref, u in utilization.get(gpu.uuid, {}).items()}, now)
        self.ledger.forget(now)
        index_of = {g.uuid: str(g.index) for g in snapshot.gpus}
        energy = CounterMetricFamily(
            "slmpack_pod_gpu_energy_joules", "A pod's share of its GPU's energy, in joules (split by SM utilization "
            "where known, else equally; slmpack_gpu_energy_split_joules says how).", labels=POD_LABELS)
        for (uuid, ref), joules in sorted(self.ledger.counters.items(), key=lambda kv: (kv[0][0], kv[0][1].pod)):
            if uuid in index_of:
                energy.add_sample(f"{energy.name}_total", pod_labels(index_of[uuid], uuid, ref), joules)
        split = CounterMetricFamily(
            "slmpack_gpu_energy_split_joules", "A GPU's energy since the exporter started, by how it was split: "
            f"{', '.join(SHARES)} (no pod on the GPU). The three add up to the GPU's energy.",
            labels=["gpu", "uuid", "share"])
        for gpu in snapshot.gpus:
            for share in SHARES:
                split.add_metric([str(gpu.index), gpu.uuid, share], self.ledger.by_share.get((gpu.uuid, share), 0.0))
        yield from (energy, split)
