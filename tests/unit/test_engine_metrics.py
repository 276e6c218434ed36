"""The autoscaler reads vLLM's own /metrics: the same families and labels, exposed by the same library,
served over real HTTP on loopback, by engines that answer, trickle, flood or report NaN."""

import asyncio
import contextlib
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from slmpack.adapters.engine_metrics import EngineMetricsReader, parse
from slmpack.core.conditions import ReplicaState
from slmpack.core.decide import ClusterSnapshot, decide, with_status
from tests.unit.test_decide import NOW, condition
from tests.unit.test_packs import profiled


def vllm_registry(running: dict[str, float], waiting: dict[str, float], generated: dict[str, float]):
    """What vLLM's PrometheusStatLogger registers (vllm/v1/metrics/loggers.py), one label set per engine core."""
    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    run = Gauge("vllm:num_requests_running", "Running requests.", labels, registry=registry)
    wait = Gauge("vllm:num_requests_waiting", "Waiting requests.", labels, registry=registry)
    tokens = Counter("vllm:generation_tokens", "Generated tokens.", labels, registry=registry)
    Gauge("vllm:kv_cache_usage_perc", "KV cache usage.", labels, registry=registry).labels("m", "0").set(0.5)
    for engine in running:
        run.labels("m", engine).set(running[engine])
        wait.labels("m", engine).set(waiting[engine])
        tokens.labels("m", engine).inc(generated[engine])
    return registry


def test_the_load_of_every_engine_core_is_summed():
    text = generate_latest(vllm_registry({"0": 3, "1": 4}, {"0": 1, "1": 0}, {"0": 100, "1": 50})).decode()
    sample = parse(text)
    assert (sample.running, sample.waiting, sample.generated_tokens) == (7, 1, 150)


class Engines:
    """Engines on loopback: /metrics answers its registry, /trickle sends a byte every 0.1 s, /flood sends
    up to 256 MiB, /declared-huge announces 10 GiB, /nan and /inf report non-finite gauges."""

    FLOOD_BYTES = 256 * 1024 * 1024

    def __init__(self):
        self.registry = vllm_registry({"0": 5}, {"0": 2}, {"0": 0})
        self.flooded = 0
        self.stop = threading.Event()
        engines = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                if self.path == "/declared-huge":
                    self.send_header("Content-Length", str(10 * 1024**3))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the reader hung up, as it should
                    getattr(self, "serve_" + self.path.strip("/").replace("-", "_"))()

            def serve_metrics(self):
                self.wfile.write(generate_latest(engines.registry))

            def serve_trickle(self):
                while not engines.stop.wait(0.1):
                    self.wfile.write(b"#")
                    self.wfile.flush()

            def serve_flood(self):
                line = b"# HELP filler a line of a huge exposition\n" * 25_000
                while engines.flooded < engines.FLOOD_BYTES and not engines.stop.is_set():
                    self.wfile.write(line)
                    engines.flooded += len(line)

            def serve_declared_huge(self):
                self.wfile.write(b"# one line\n")

            def serve_nan(self):
                self.wfile.write(generate_latest(vllm_registry({"0": 1}, {"0": float("nan")}, {"0": 0})))

            def serve_inf(self):
                self.wfile.write(generate_latest(vllm_registry({"0": float("inf")}, {"0": 0}, {"0": 0})))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def engines():
    running = Engines()
    yield running
    running.stop.set()
    running.server.shutdown()
    running.server.server_close()


async def read(reader: EngineMetricsReader, url: str):
    async with httpx.AsyncClient() as client:
        started = time.monotonic()
        reading = await reader.read(client, "chat-0", url)
        return reading, time.monotonic() - started


async def test_an_engine_that_trickles_its_answer_is_cut_at_the_overall_deadline(engines):
    # Every byte comes well within any per-read timeout; only an overall deadline ends the read.
    reading, took = await read(EngineMetricsReader(deadline_seconds=0.5), f"{engines.url}/trickle")
    assert reading.load is None and reading.problem.reason == "MetricsTimeout"
    assert reading.problem.message == "no whole answer within 0.5s"
    assert took < 1.5


@pytest.mark.parametrize("path", ["/flood", "/declared-huge"])
async def test_a_huge_body_is_refused_at_the_limit_not_read_whole(engines, path):
    reading, _ = await read(EngineMetricsReader(max_body_bytes=1024 * 1024, deadline_seconds=20), engines.url + path)
    assert reading.load is None and reading.problem.reason == "MetricsTooLarge"
    assert "over the 1048576-byte limit" in reading.problem.message
    # The reader hung up: the engine could send only what the sockets' buffers hold past the limit.
    assert engines.flooded < engines.FLOOD_BYTES / 4


@pytest.mark.parametrize(("path", "shown"), [("/nan", "vllm:num_requests_waiting is nan"),
                                             ("/inf", "vllm:num_requests_running is inf")])
async def test_a_non_finite_load_is_refused_and_the_deployment_says_so_in_a_condition(engines, path, shown):
    reading, _ = await read(EngineMetricsReader(), engines.url + path)
    assert reading.load is None and reading.problem.reason == "NonFiniteMetric"
    assert shown in reading.problem.message

    # The operator's decision with that reading: it neither raises nor scales on it, and says why.
    body, cluster = profiled(autoscaling={"maxPacks": 2})
    first = decide(body, cluster, NOW)
    snapshot = ClusterSnapshot(cluster.nodes, cluster.profiles, pods=(ReplicaState("chat-0", True, ip="10.0.0.1"),),
                               engine_problems=(reading.problem,))
    decision = decide(with_status(body, first.status), snapshot, NOW + timedelta(seconds=15))
    metrics = condition(decision, "MetricsAvailable")
    assert (metrics.status, metrics.reason) == ("False", "NonFiniteMetric")
    assert metrics.message.endswith(f"chat-0: {shown}, not a finite number (NonFiniteMetric)")
    assert decision.scaling.reason == "MetricsUnavailable" and decision.scaling.direction == "none"
    assert any(e.reason == "NonFiniteMetric" and e.warning for e in decision.events)


async def test_reconciles_take_the_latest_readings_from_the_background_reader_and_never_wait(engines):
    first_readings = []
    reader = EngineMetricsReader(deadline_seconds=3, tick_seconds=0.05, on_first_reading=first_readings.append)
    key = ("team", "chat")
    reader.follow(key, {"chat-0": f"{engines.url}/metrics", "chat-1": f"{engines.url}/trickle"}, period_seconds=0.2)
    background = asyncio.create_task(reader.run())
    try:
        looks = []

        async def look_until(done) -> tuple:
            deadline = time.monotonic() + 20
            while True:
                started = time.monotonic()
                latest = reader.latest(key)
                looks.append(time.monotonic() - started)
                if done(*latest):
                    return latest
                assert time.monotonic() < deadline, latest
                await asyncio.sleep(0.02)

        # At first nothing is read: both replicas count as missing, and neither is a problem yet.
        assert reader.latest(key) == ((), ())
        (load,), _ = await look_until(lambda loads, problems: loads)
        assert (load.pod, load.running, load.waiting, load.tokens_per_s) == ("chat-0", 5, 2, None)
        assert first_readings and set(first_readings) == {key}
        _, (problem,) = await look_until(lambda loads, problems: problems)
        assert (problem.pod, problem.reason) == ("chat-1", "MetricsTimeout")
        # Tokens become a rate between two readings.
        engines.registry = vllm_registry({"0": 5}, {"0": 2}, {"0": 400})
        (load,), _ = await look_until(lambda loads, problems: loads[0].tokens_per_s)
        assert load.tokens_per_s > 0
        # The trickling engine was read several times meanwhile, yet no look waited on it.
        assert max(looks) < 0.01
    finally:
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)


async def test_a_reading_older_than_two_periods_is_reported_stale(engines):
    now = [1000.0]
    reader = EngineMetricsReader(deadline_seconds=2, tick_seconds=0.01, clock=lambda: now[0])
    key = ("team", "chat")
    reader.follow(key, {"chat-0": f"{engines.url}/metrics"}, period_seconds=15)
    background = asyncio.create_task(reader.run())
    deadline = time.monotonic() + 5
    while not reader.latest(key)[0]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    background.cancel()  # the reader falls behind
    await asyncio.gather(background, return_exceptions=True)
    now[0] += 31
    loads, problems = reader.latest(key)
    assert loads and not problems
    now[0] += 1.5
    loads, (problem,) = reader.latest(key)
    assert not loads and (problem.pod, problem.reason) == ("chat-0", "MetricsStale")
    assert problem.message == "no reading in the last 32s"
