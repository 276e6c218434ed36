"""Closed-loop load: `concurrency` clients, each sending its next streamed completion when the last ends.

Concurrency is the batch under test. Requests go round-robin over one or more OpenAI-
compatible endpoints (several for co-located replicas), or, with a per-endpoint cap, each
to the endpoint with the fewest in flight, waiting while every endpoint holds its cap: the
rule slmpack's routing applies in front of deployed engines, so a load above what the
engines admit queues at the client and every engine runs exactly its cap. Every request asks for exactly
`output_tokens` tokens (`ignore_eos`, a vLLM extension other servers ignore), so the
workload shape holds. A request never raises: its error goes into the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import httpx
from prometheus_client.parser import text_string_to_metric_families

from slmpack.core.summary import RequestResult

# A fixed vocabulary so that prompts have a known, tokenizer-independent rough length.
WORDS = ("the quick brown fox jumps over a lazy dog while small models pack onto shared gpus and "
         "every replica answers its own stream of requests").split()


def synthetic_prompt(tokens: int, seed: int) -> str:
    """About `tokens` tokens of plain words; the seed varies them so no prefix cache hides the work."""
    words = [WORDS[(seed * 7 + i * 13) % len(WORDS)] for i in range(max(tokens - 1, 1))]
    return f"{seed}: " + " ".join(words)


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8001
    model: str


@dataclass(frozen=True)
class Workload:
    input_tokens: int
    output_tokens: int


async def stream_completion(client: httpx.AsyncClient, endpoint: Endpoint, prompt: str,
                            output_tokens: int) -> RequestResult:
    body = {"model": endpoint.model, "prompt": prompt, "max_tokens": output_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.0, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    chunks = prompt_tokens = completion_tokens = 0
    try:
        async with client.stream("POST", f"{endpoint.base_url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:200]
                return RequestResult(error=f"HTTP {response.status_code}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    completion_tokens = event["usage"].get("completion_tokens", 0)
                if not event.get("choices") or not event["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return RequestResult(error=f"{type(error).__name__}: {error}")
    if first is None:
        return RequestResult(error="the stream ended without a token")
    return RequestResult(prompt_tokens=prompt_tokens, output_tokens=completion_tokens or chunks,
                         ttft_s=first - start, token_gaps_s=tuple(gaps), e2e_s=last - start)


Enough = Callable[[Sequence[RequestResult], float], bool]


class MeasurementEnded(Exception):
    """Raised by the client whose completion made the measurement enough, to stop the others."""


class LeastLoaded:
    """Hands out the endpoint with the fewest requests in flight, at most `cap` each, waiting while all are full."""

    def __init__(self, endpoints: Sequence[Endpoint], cap: int) -> None:
        self.in_flight = dict.fromkeys(endpoints, 0)
        self.cap = cap
        self.freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def endpoint(self):
        async with self.freed:
            await self.freed.wait_for(lambda: min(self.in_flight.values()) < self.cap)
            chosen = min(self.in_flight, key=self.in_flight.get)
            self.in_flight[chosen] += 1
        try:
            yield chosen
        finally:
            async with self.freed:
                self.in_flight[chosen] -= 1
                self.freed.notify()


class RoundRobin:
    """Hands out the endpoints in turn, with no cap."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.targets = itertools.cycle(endpoints)

    @contextlib.asynccontextmanager
    async def endpoint(self):
        yield next(self.targets)


async def closed_loop(endpoints: Sequence[Endpoint], concurrency: int, requests: int, workload: Workload,
                      warmup: int = 0, timeout_s: float = 600, enough: Enough | None = None,
                      on_start: Callable[[], None] | None = None,
                      on_end: Callable[[], None] | None = None,
                      per_endpoint: int | None = None) -> tuple[list[RequestResult], float]:
    """Run `warmup` unmeasured requests, then up to `requests` measured ones; returns results and wall time.

    With `enough(results, started_at)`, no new request starts once it holds, and the
    measurement ends at that moment, so every measured second had `concurrency` requests in
    flight; requests still running then are cancelled (the engine aborts a request whose
    client went away), not waited for, since nothing of them would be measured. `on_start`
    and `on_end` mark the measured interval (for an energy meter). With `per_endpoint`, no
    endpoint has more than that many requests in flight; a request's TTFT counts from when an
    endpoint takes it, so it is the engine's latency, not the client's queue.
    """
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10), limits=limits) as client:
        def router():
            return LeastLoaded(endpoints, per_endpoint) if per_endpoint else RoundRobin(endpoints)

        if warmup:
            await _run(client, router(), min(concurrency, warmup), warmup, workload, seed0=10_000)
        if on_start:
            on_start()
        started = time.perf_counter()
        results, ended = await _run(client, router(), concurrency, requests, workload, seed0=0,
                                    enough=(lambda done: enough(done, started)) if enough else None, on_end=on_end)
        return results, (ended or time.perf_counter()) - started


async def _run(client, router, concurrency, requests, workload, seed0, enough=None,
               on_end=None) -> tuple[list[RequestResult], float | None]:
    numbers = iter(range(requests))
    results: list[RequestResult] = []
    ended: list[float] = []

    async def client_loop() -> None:
        for n in numbers:  # the shared iterator hands each request number to one client
            async with router.endpoint() as endpoint:
                result = await stream_completion(client, endpoint,
                                                 synthetic_prompt(workload.input_tokens, seed0 + n),
                                                 workload.output_tokens)
            results.append(replace(result, finished_at_s=time.perf_counter()))
            if enough is not None and enough(results):
                ended.append(time.perf_counter())
                if on_end:
                    on_end()
                raise MeasurementEnded

    try:
        async with asyncio.TaskGroup() as clients:  # one client raising cancels the others
            for _ in range(concurrency):
                clients.create_task(client_loop())
    except* MeasurementEnded:
        pass
    if not ended and on_end:
        on_end()
    return results, (ended[0] if ended else None)


# vLLM's KV-cache gauge (v1 name, then v0) and its preemption counter, as the samples are named.
ENGINE_SAMPLES = {"vllm:kv_cache_usage_perc": "kv", "vllm:gpu_cache_usage_perc": "kv",
                  "vllm:num_preemptions_total": "preemptions"}


async def scrape_engine_metrics(client: httpx.AsyncClient, base_url: str) -> dict[str, float]:
    """KV-cache use and preemptions from a vLLM `/metrics` (empty when the engine has none, or it does not parse)."""
    try:
        text = (await client.get(f"{base_url}/metrics", timeout=5)).text
    except httpx.HTTPError:
        return {}
    found: dict[str, float] = {}
    try:
        # The exposition format's own parser: labels may hold spaces, and a sample may end with a timestamp.
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in ENGINE_SAMPLES:
                    key = ENGINE_SAMPLES[sample.name]
                    found[key] = found.get(key, 0.0) + sample.value
    except ValueError:
        return {}
    return found
