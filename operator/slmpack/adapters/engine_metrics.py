"""Read the load of vLLM engines from their own /metrics, for the autoscaler.

vLLM's OpenAI server exposes Prometheus text on /metrics: `vllm:num_requests_running` and
`vllm:num_requests_waiting` are gauges, `vllm:generation_tokens` a counter (vllm/v1/metrics/
loggers.py); each carries model_name and engine labels, so the samples of one pod are summed.
An engine that does not answer within the timeout is left out: the autoscaler then holds.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from slmpack.core.autoscale import EngineLoad

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
GENERATED = "vllm:generation_tokens"  # a counter: its samples are named `..._total`
TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class EngineSample:
    running: float
    waiting: float
    generated_tokens: float | None


def parse(text: str) -> EngineSample:
    """The load in one engine's /metrics text."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in (RUNNING, WAITING, GENERATED):
            values = [s.value for s in family.samples if s.name in (family.name, family.name + "_total")]
            sums[family.name] = sum(values)
    return EngineSample(sums.get(RUNNING, 0.0), sums.get(WAITING, 0.0), sums.get(GENERATED))


@dataclass
class EngineMetrics:
    """Reads engines in parallel, each with a timeout; remembers the last token counts to give a rate."""

    timeout_seconds: float = TIMEOUT_SECONDS
    workers: int = 16
    _last: dict[str, tuple[float, float]] = field(default_factory=dict)

    def read(self, pod: str, url: str) -> EngineLoad | None:
        try:
            response = httpx.get(url, timeout=self.timeout_seconds)
            response.raise_for_status()
            sample = parse(response.text)
        except (httpx.HTTPError, ValueError):
            return None
        now, rate = time.monotonic(), None
        if sample.generated_tokens is not None:
            before = self._last.get(pod)
            if before and now > before[0] and sample.generated_tokens >= before[1]:
                rate = (sample.generated_tokens - before[1]) / (now - before[0])
            self._last[pod] = (now, sample.generated_tokens)
        return EngineLoad(pod, sample.running, sample.waiting, rate)

    def loads(self, targets: dict[str, str]) -> tuple[EngineLoad, ...]:
        """The loads of the engines that answered, from {pod: metrics URL}."""
        if not targets:
            return ()
        with ThreadPoolExecutor(min(self.workers, len(targets))) as pool:
            read = pool.map(lambda item: self.read(*item), sorted(targets.items()))
            return tuple(load for load in read if load is not None)
