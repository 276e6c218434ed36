"""Read the load of vLLM engines from their own /metrics, for the autoscaler, outside the reconcile.

vLLM's OpenAI server exposes Prometheus text on /metrics: `vllm:num_requests_running` and
`vllm:num_requests_waiting` are gauges, `vllm:generation_tokens` a counter (vllm/v1/metrics/
loggers.py); each carries model_name and engine labels, so the samples of one pod are summed.

An engine runs a tenant's model, so a read is bounded as Prometheus bounds a scrape: an overall
deadline however slowly the bytes come (`scrape_timeout`), a limit on the body's size
(`body_size_limit`, counted after decompression), and a value that is NaN or infinite is refused.
A background task reads the engines, a bounded number at a time, and keeps each one's latest
reading with its time; a reconcile takes what is there and never waits on an engine. A failed
or stale reading is reported (the deployment's MetricsAvailable condition) and the replica counts
as missing, so the autoscaler holds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import httpx
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from slmpack.core.autoscale import EngineLoad, MetricsProblem
from slmpack.core.packpod import ENGINE_LABEL

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
GENERATED = "vllm:generation_tokens"  # a counter: its samples are named `..._total`
# HAProxy's exporter on a router pod: requests waiting at the router for an engine below its cap. Once the
# router caps the engines at their knee, this is the demand their own running + waiting no longer shows.
ROUTER_QUEUE = "haproxy_backend_current_queue"
DEADLINE_SECONDS = 2.0
# vLLM's /metrics is about 100 KiB per engine core; a body past this is refused, not held in memory.
MAX_BODY_BYTES = 4 * 1024 * 1024
CONCURRENCY = 8
TICK_SECONDS = 1.0

READS = Counter("slmpack_operator_engine_metrics_reads_total",
                "Reads of engines' /metrics by the autoscaler, by outcome (Read, or why not).", ["outcome"])
log = logging.getLogger(__name__)


class MetricsError(Exception):
    """Why an engine's /metrics gave no load: a CamelCase reason and a sentence."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class EngineSample:
    running: float
    waiting: float
    generated_tokens: float | None
    engines: int = 1


def parse(text: str) -> EngineSample:
    """The load in one engine's /metrics text, or in a pack pod supervisor's, whose series carry each
    engine's name (ENGINE_LABEL); MetricsError when it is not Prometheus text or a value is not finite."""
    sums: dict[str, float] = {}
    engines: set[str] = set()
    try:
        for family in text_string_to_metric_families(text):
            if family.name in (RUNNING, WAITING, GENERATED, ROUTER_QUEUE):
                samples = [s for s in family.samples if s.name in (family.name, family.name + "_total")]
                sums[family.name] = sum(s.value for s in samples)
                if family.name == RUNNING:
                    engines = {s.labels[ENGINE_LABEL] for s in samples if ENGINE_LABEL in s.labels}
    except ValueError as error:
        raise MetricsError("MetricsUnparsable", f"not Prometheus text: {error}") from None
    for name, value in sums.items():
        if not math.isfinite(value):
            raise MetricsError("NonFiniteMetric", f"{name} is {value:g}, not a finite number")
    return EngineSample(sums.get(RUNNING, 0.0), sums.get(WAITING, 0.0) + sums.get(ROUTER_QUEUE, 0.0),
                        sums.get(GENERATED), len(engines) or 1)


async def fetch(client: httpx.AsyncClient, url: str, deadline_seconds: float, max_body_bytes: int) -> str:
    """The body at `url`, read whole within `deadline_seconds` and no larger than `max_body_bytes`."""
    try:
        async with asyncio.timeout(deadline_seconds):
            async with client.stream("GET", url) as response:
                response.raise_for_status()
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_body_bytes:
                    raise MetricsError("MetricsTooLarge", f"its body of {declared} bytes is over the "
                                                          f"{max_body_bytes}-byte limit")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_body_bytes:
                        raise MetricsError("MetricsTooLarge", f"its body is over the {max_body_bytes}-byte limit")
    except TimeoutError:
        raise MetricsError("MetricsTimeout", f"no whole answer within {deadline_seconds:g}s") from None
    except httpx.HTTPError as error:
        raise MetricsError("MetricsUnreachable", f"{type(error).__name__}: {error}") from None
    return body.decode("utf-8", errors="replace")


Target = tuple[str, str]  # (pod, metrics URL)


@dataclass(frozen=True)
class Reading:
    at: float  # on the reader's clock, when the read ended
    load: EngineLoad | None = None
    problem: MetricsProblem | None = None


@dataclass
class EngineMetricsReader:
    """Reads the engines that reconciles follow, in the background; `latest` gives what was read."""

    deadline_seconds: float = DEADLINE_SECONDS
    max_body_bytes: int = MAX_BODY_BYTES
    concurrency: int = CONCURRENCY
    tick_seconds: float = TICK_SECONDS
    clock: Callable[[], float] = time.monotonic
    # Called (in the event loop) with a key when one of its engines is read for the first time.
    on_first_reading: Callable[[Hashable], None] | None = None
    _followed: dict[Hashable, tuple[dict[str, str], float]] = field(default_factory=dict)
    _readings: dict[Target, Reading] = field(default_factory=dict)
    _tokens: dict[Target, tuple[float, float]] = field(default_factory=dict)
    _started: dict[Target, float] = field(default_factory=dict)
    _in_flight: set[Target] = field(default_factory=set)

    # ---- what reconciles call, in the event loop: nothing here waits

    def follow(self, key: Hashable, targets: dict[str, str], period_seconds: float) -> None:
        """Read these engines ({pod: metrics URL}) every `period_seconds` for `key`, instead of its earlier ones."""
        self._followed[key] = (dict(targets), period_seconds)

    def forget(self, key: Hashable) -> None:
        self._followed.pop(key, None)

    def latest(self, key: Hashable) -> tuple[tuple[EngineLoad, ...], tuple[MetricsProblem, ...]]:
        """The fresh loads of `key`'s engines, and the problems of the others. An engine not read yet is
        in neither: it counts as missing until its first reading."""
        targets, period = self._followed.get(key, ({}, 0.0))
        stale_after = 2 * period + self.deadline_seconds
        loads, problems = [], []
        for pod, url in sorted(targets.items()):
            reading = self._readings.get((pod, url))
            if reading is None:
                continue
            if self.clock() - reading.at > stale_after:
                problems.append(MetricsProblem(pod, "MetricsStale", f"no reading in the last {stale_after:g}s"))
            elif reading.problem is not None:
                problems.append(reading.problem)
            else:
                loads.append(reading.load)
        return tuple(loads), tuple(problems)

    # ---- the background reader

    async def run(self) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task] = set()
        async with httpx.AsyncClient(timeout=self.deadline_seconds) as client:
            try:
                while True:
                    self._drop_unfollowed()
                    for target in self._due():
                        self._in_flight.add(target)
                        self._started[target] = self.clock()
                        task = asyncio.create_task(self._read_into_cache(client, slots, target))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    await asyncio.sleep(self.tick_seconds)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def read(self, client: httpx.AsyncClient, pod: str, url: str) -> Reading:
        """One engine's reading now; never raises."""
        try:
            sample = await asyncio.to_thread(
                parse, await fetch(client, url, self.deadline_seconds, self.max_body_bytes))
        except MetricsError as error:
            READS.labels(error.reason).inc()
            return Reading(self.clock(), problem=MetricsProblem(pod, error.reason, str(error)))
        READS.labels("Read").inc()
        now, target, rate = self.clock(), (pod, url), None
        if sample.generated_tokens is not None:
            before = self._tokens.get(target)
            if before and now > before[0] and sample.generated_tokens >= before[1]:
                rate = (sample.generated_tokens - before[1]) / (now - before[0])
            self._tokens[target] = (now, sample.generated_tokens)
        return Reading(now, load=EngineLoad(pod, sample.running, sample.waiting, rate, sample.engines))

    async def _read_into_cache(self, client: httpx.AsyncClient, slots: asyncio.Semaphore, target: Target) -> None:
        try:
            async with slots:
                reading = await self.read(client, *target)
        except Exception as error:  # the cache must keep going whatever one engine does
            log.exception("reading %s", target[1])
            reading = Reading(self.clock(), problem=MetricsProblem(target[0], "MetricsUnreadable", str(error)))
        finally:
            self._in_flight.discard(target)
        first = target not in self._readings
        self._readings[target] = reading
        if first and self.on_first_reading is not None:
            for key, (targets, _) in list(self._followed.items()):
                if targets.get(target[0]) == target[1]:
                    self.on_first_reading(key)

    def _due(self) -> list[Target]:
        periods: dict[Target, float] = {}
        for targets, period in self._followed.values():
            for target in targets.items():
                periods[target] = min(period, periods.get(target, period))
        now = self.clock()
        return [t for t, period in periods.items()
                if t not in self._in_flight and now - self._started.get(t, -math.inf) >= period]

    def _drop_unfollowed(self) -> None:
        followed = {t for targets, _ in self._followed.values() for t in targets.items()}
        for cache in (self._readings, self._tokens, self._started):
            for target in cache.keys() - followed:
                del cache[target]
