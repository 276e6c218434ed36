"""The autoscaler reads vLLM's own /metrics: the same families and labels, exposed by the same library."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from slmpack.adapters.engine_metrics import EngineMetrics, parse


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
    """Engines on loopback: one answers its registry, one hangs past the timeout."""

    def __init__(self):
        self.registry = vllm_registry({"0": 5}, {"0": 2}, {"0": 0})
        engines = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/slow":
                    time.sleep(1)
                body = generate_latest(engines.registry)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def engines():
    running = Engines()
    yield running
    running.server.shutdown()
    running.server.server_close()


def test_engines_are_read_with_a_timeout_and_tokens_become_a_rate(engines):
    reader = EngineMetrics(timeout_seconds=0.3)
    targets = {"chat-0": f"{engines.url}/metrics", "chat-1": f"{engines.url}/slow",
               "chat-2": "http://127.0.0.1:1/metrics"}
    (first,) = reader.loads(targets)
    assert (first.pod, first.running, first.waiting, first.load, first.tokens_per_s) == ("chat-0", 5, 2, 7, None)
    engines.registry = vllm_registry({"0": 5}, {"0": 2}, {"0": 400})
    time.sleep(0.2)
    (second,) = reader.loads({"chat-0": targets["chat-0"]})
    assert 0 < second.tokens_per_s < 400 / 0.2
