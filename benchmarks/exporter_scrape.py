"""Scrape latency and exporter CPU per scrape on a fake 8-GPU node running 32 engine processes.

    python3 benchmarks/exporter_scrape.py [--scrapes 500]

Target: p99 scrape ≤ 20 ms. Prints Markdown with the raw numbers.
"""

import argparse
import statistics
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

import httpx
from prometheus_client import CollectorRegistry, make_wsgi_app

from slmpack.exporter.collector import GpuCollector
from slmpack.exporter.fake import FakePods, fake_node


class Quiet(WSGIRequestHandler):
    def log_message(self, *_):
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scrapes", type=int, default=500)
    args = parser.parse_args()
    node = fake_node(8, 4)
    collector = GpuCollector(node, FakePods(node))
    registry = CollectorRegistry()
    registry.register(collector)
    server = make_server("127.0.0.1", 0, make_wsgi_app(registry), handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    latencies, cpu = [], []
    with httpx.Client() as client:
        for _ in range(20):
            client.get(url)
        for _ in range(args.scrapes):
            cpu_before, started = time.process_time(), time.perf_counter()
            body = client.get(url).text
            latencies.append((time.perf_counter() - started) * 1000)
            cpu.append((time.process_time() - cpu_before) * 1000)
    server.shutdown()
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
    print("| scrapes | series per scrape | p50 ms | p90 ms | p99 ms | max ms | CPU ms per scrape (client+server) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.scrapes} | {series} | {p(0.5):.2f} | {p(0.9):.2f} | {p(0.99):.2f} | {latencies[-1]:.2f} | "
          f"{statistics.mean(cpu):.2f} |")
    print(f"\ntarget p99 <= 20 ms: {'met' if p(0.99) <= 20 else 'NOT met'}")


if __name__ == "__main__":
    main()
