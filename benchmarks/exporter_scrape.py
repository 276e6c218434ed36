"""Scrape latency, series count and exporter CPU per scrape on a fake GPU node under pod churn.

    PYTHONPATH=operator python3 benchmarks/exporter_scrape.py --gpus 8 --per-gpu 16 --churn 10000 --scrapes 1000

The exporter's real reading code (`NvmlSource` over the fake NVML, MPS clients included)
and its threaded HTTP server, scraped over loopback. Between scrapes, simulated time moves
on by `--interval` seconds and `churn / scrapes` pod churn events happen: an engine process
exits and a new pod's process takes its place. Series of gone pods must be dropped after
`--forget-after` seconds, so the series count levels off instead of growing with churn.
Target: p99 scrape <= 20 ms. Prints Markdown with the raw numbers.
"""

import argparse
import random
import statistics
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

import httpx
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from slmpack.exporter.collector import GpuCollector
from slmpack.exporter.fake import FakeNvml, FakePods, FakeProcess, fake_node
from slmpack.exporter.nvml import NvmlSource
from slmpack.exporter.pods import PodRef


class Quiet(WSGIRequestHandler):
    def log_message(self, *_):
        pass


class SimulatedClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--per-gpu", type=int, default=16, help="engine processes per GPU")
    parser.add_argument("--churn", type=int, default=10_000, help="pod churn events over the run")
    parser.add_argument("--scrapes", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=15.0, help="simulated seconds between scrapes")
    parser.add_argument("--forget-after", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    clock = SimulatedClock()
    node = fake_node(args.gpus, args.per_gpu, namespace="bench", deployment="chat")
    node.clock, node.started = clock, clock()
    collector = GpuCollector(NvmlSource(FakeNvml(node)), FakePods(node), forget_after_s=args.forget_after,
                             clock=clock)
    registry = CollectorRegistry()
    registry.register(collector)
    server = make_server("127.0.0.1", 0, make_wsgi_app(registry), server_class=ThreadingWSGIServer,
                         handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/metrics"

    next_pid, churned = 100_000, 0
    latencies, cpu, series = [], [], []
    with httpx.Client() as client:
        for _ in range(20):
            client.get(url)
        for scrape in range(args.scrapes):
            due = args.churn * (scrape + 1) // args.scrapes - churned
            for _ in range(due):  # one process exits, a new pod's process starts on the same GPU
                gone = node.processes.pop(rng.randrange(len(node.processes)))
                node.processes.append(FakeProcess(next_pid, gone.gpu, PodRef("bench", f"job-{next_pid}", "engine",
                                                                              "jobs"), sm_percent=rng.choice([0, 30])))
                next_pid += 1
            churned += due
            clock.now += args.interval
            cpu_before, started = time.process_time(), time.perf_counter()
            body = client.get(url).text
            latencies.append((time.perf_counter() - started) * 1000)
            cpu.append((time.process_time() - cpu_before) * 1000)
            series.append(sum(1 for line in body.splitlines() if line and not line.startswith("#")))
    server.shutdown()

    steady = args.gpus * args.per_gpu + round(args.forget_after / args.interval * args.churn / args.scrapes)
    print(f"{args.gpus} GPUs x {args.per_gpu} MPS client processes, {churned} pod churn events over "
          f"{args.scrapes} scrapes ({args.interval:g} s simulated apart), forget after {args.forget_after:g} s\n")
    print("| scrapes | churn events | series first / max / last | p50 ms | p90 ms | p99 ms | max ms "
          "| CPU ms per scrape (client+server) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.scrapes} | {churned} | {series[0]} / {max(series)} / {series[-1]} | "
          f"{percentile(latencies, 0.5):.2f} | {percentile(latencies, 0.9):.2f} | {percentile(latencies, 0.99):.2f} | "
          f"{max(latencies):.2f} | {statistics.mean(cpu):.2f} |")
    print(f"\npod energy series expected at steady state: about {steady} pods (live + gone less than "
          f"{args.forget_after:g} s), so series level off")
    print(f"series per scrape at every 10th percentile of the run: "
          f"{[series[int(q * (len(series) - 1))] for q in (0, .1, .2, .3, .4, .5, .6, .7, .8, .9, 1)]}")
    print(f"target p99 <= 20 ms: {'met' if percentile(latencies, 0.99) <= 20 else 'NOT met'}")


if __name__ == "__main__":
    main()
