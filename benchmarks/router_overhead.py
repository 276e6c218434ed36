"""What the router adds to a request, measured directly: the same stand-in engine reached straight and through
HAProxy on the router's own configuration (`core/router.py`, servers added by the router's agent), request by
request in alternation, so that the machine's drift falls on both paths alike.

The engine answers each completion after a fixed 20 ms, so what differs between the paths is HAProxy: its
parsing, its queue and server choice, and one more loopback hop. Clients keep their connections alive, as the
OpenAI client does. Two loads: one request at a time, and 8 clients at once (the demo's load). HAProxy's own
CPU time per request comes from /proc. Writes the raw latencies and the summary:

    PYTHONPATH=operator .venv/bin/python benchmarks/router_overhead.py --out benchmarks/routing/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from slmpack.adapters.haproxy import HAProxyRuntime
from slmpack.api.models import SLMDeploymentSpec
from slmpack.core.router import ADMIN_SOCKET, METRICS_PORT, haproxy_config
from slmpack.profiler.run import environment
from slmpack.router.agent import Agent

ENGINE_MS = 20
BODY = json.dumps({"choices": [{"text": " Paris"}]}).encode()


class Engine(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's server
    # TCP_NODELAY, as uvicorn's asyncio transports set it: with Nagle, the body waits for the client's
    # delayed ACK of the headers, 40 ms on Linux, and the direct path would measure that.
    disable_nagle_algorithm = True

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(ENGINE_MS / 1000)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *_):
        pass


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client or HAProxy closing an idle keep-alive connection is no error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """The process's user and system CPU time (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_run(urls: dict[str, str], pairs: int, first: int, out: dict[str, list[float]]) -> None:
    """`pairs` requests on each path, alternating which goes first; each path on its own keep-alive client."""
    clients = {name: httpx.Client(timeout=30) for name in urls}
    body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 1}
    for i in range(pairs):
        order = list(urls) if (i + first) % 2 == 0 else list(reversed(urls))
        for name in order:
            began = time.perf_counter()
            clients[name].post(urls[name], json=body).raise_for_status()
            out[name].append((time.perf_counter() - began) * 1000)
    for c in clients.values():
        c.close()


def measure(urls: dict[str, str], clients: int, pairs: int, haproxy_pid: int) -> dict:
    per_client = [{name: [] for name in urls} for _ in range(clients)]
    cpu_before, began = cpu_seconds(haproxy_pid), time.time()
    threads = [threading.Thread(target=client_run, args=(urls, pairs, i, per_client[i])) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = cpu_seconds(haproxy_pid) - cpu_before
    raw = {name: [ms for c in per_client for ms in c[name]] for name in urls}
    summary = {name: {"p50": statistics.median(v), "p99": statistics.quantiles(v, n=100)[98]}
               for name, v in raw.items()}
    return {"clients": clients, "requests_per_path": len(raw["direct"]), "started": began, "ended": time.time(),
            "ms": raw, "summary": summary,
            "overhead_ms": {q: summary["router"][q] - summary["direct"][q] for q in ("p50", "p99")},
            "haproxy_cpu_ms_per_request": cpu * 1000 / len(raw["router"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=1000, help="requests per path at one client")
    args = parser.parse_args()
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    engine = QuietServer(("127.0.0.1", 0), Engine)
    threading.Thread(target=engine.serve_forever, daemon=True).start()
    engine_port = engine.server_address[1]
    spec = SLMDeploymentSpec.model_validate({"model": {"name": "m"}, "replicas": 1})
    tmp = Path(tempfile.mkdtemp(prefix="router-overhead-"))
    port, socket_path = free_port(), str(tmp / "admin.sock")
    config = (haproxy_config(spec).replace(f"bind :{spec.port}", f"bind 127.0.0.1:{port}")
              .replace(f"bind :{METRICS_PORT}", f"bind 127.0.0.1:{free_port()}").replace(ADMIN_SOCKET, socket_path))
    (tmp / "haproxy.cfg").write_text(config)
    process = subprocess.Popen([haproxy, "-db", "-f", str(tmp / "haproxy.cfg")], stderr=subprocess.DEVNULL)
    try:
        while not Path(socket_path).exists():
            time.sleep(0.05)
        agent = Agent(HAProxyRuntime(socket_path), "engines", 256, ("http",), resync_s=5)
        agent.saw({"subsets": [{"addresses": [{"ip": "127.0.0.1", "targetRef": {"name": "engine-0"}}],
                                "ports": [{"name": "http", "port": engine_port}]}]})
        agent.converge()
        urls = {"direct": f"http://127.0.0.1:{engine_port}/v1/completions",
                "router": f"http://127.0.0.1:{port}/v1/completions"}
        command = f"PYTHONPATH=operator .venv/bin/python benchmarks/router_overhead.py --out {args.out}"
        record = {"command": command,
                  "environment": environment(None), "load_average": os.getloadavg(), "engine_ms": ENGINE_MS,
                  "haproxy": subprocess.run([haproxy, "-v"], capture_output=True, text=True).stdout.splitlines()[0],
                  "runs": [measure(urls, 1, args.pairs, process.pid), measure(urls, 8, args.pairs // 8, process.pid)]}
    finally:
        process.terminate()
        process.wait(10)
        engine.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for run in record["runs"]:
        s = run["summary"]
        print(f"{run['clients']} client(s), {run['requests_per_path']} requests per path: "
              f"direct p50 {s['direct']['p50']:.2f} p99 {s['direct']['p99']:.2f} ms, "
              f"router p50 {s['router']['p50']:.2f} p99 {s['router']['p99']:.2f} ms, "
              f"overhead p50 {run['overhead_ms']['p50']:+.2f} p99 {run['overhead_ms']['p99']:+.2f} ms, "
              f"HAProxy CPU {run['haproxy_cpu_ms_per_request']:.3f} ms per request")


if __name__ == "__main__":
    main()
