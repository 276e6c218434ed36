"""The load generator never raises for a failed request: the error goes into the result."""

import asyncio
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from slmpack.core.summary import summarize
from slmpack.profiler.loadgen import Endpoint, Workload, closed_loop, scrape_engine_metrics, synthetic_prompt


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nobody listens once the socket closes


def test_a_refused_connection_becomes_an_error_per_request():
    endpoint = Endpoint(base_url=f"http://127.0.0.1:{closed_port()}", model="m")
    results, wall = asyncio.run(closed_loop([endpoint], concurrency=3, requests=5,
                                            workload=Workload(input_tokens=8, output_tokens=4), timeout_s=5))
    assert len(results) == 5
    assert all(not r.ok and "Connect" in r.error for r in results)
    assert wall < 5


def test_prompts_differ_per_seed_and_track_the_length():
    a, b = synthetic_prompt(64, 1), synthetic_prompt(64, 2)
    assert a != b
    assert 60 <= len(a.split()) <= 66


def test_a_point_where_every_request_failed_keeps_the_cause():
    endpoint = Endpoint(base_url=f"http://127.0.0.1:{closed_port()}", model="m")
    results, wall = asyncio.run(closed_loop([endpoint], concurrency=2, requests=2,
                                            workload=Workload(input_tokens=8, output_tokens=4), timeout_s=5))
    point = summarize(2, results, wall)
    assert point.failed == 2 and point.completed in (0, None)
    assert "Connect" in point.error
    assert point.output_throughput_tokens_per_s in (0, None)


def test_enough_stops_the_loop_and_only_requests_before_it_are_measured():
    endpoint = Endpoint(base_url=f"http://127.0.0.1:{closed_port()}", model="m")
    marks = []
    results, _ = asyncio.run(closed_loop([endpoint], concurrency=2, requests=50,
                                         workload=Workload(input_tokens=8, output_tokens=4), timeout_s=5,
                                         enough=lambda done, started: len(done) >= 6,
                                         on_start=lambda: marks.append("start"), on_end=lambda: marks.append("end")))
    assert len(results) == 6  # not 50: the loop stopped, and the request still running was not counted
    assert marks == ["start", "end"]


def test_requests_running_when_the_measurement_ends_are_cancelled_not_waited_for():
    import json
    import time

    class OneFastTheRestSlow(BaseHTTPRequestHandler):
        closed_early = 0

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            slow = not body["prompt"].startswith("0:")
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            try:
                for _ in range(40 if slow else 1):
                    self.wfile.write(f"data: {json.dumps({'choices': [{'text': 'x'}]})}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(0.25 if slow else 0)
                self.wfile.write(b"data: [DONE]\n\n")
            except OSError:
                type(self).closed_early += 1  # the client went away, as an engine sees an abort

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), OneFastTheRestSlow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = Endpoint(base_url=f"http://127.0.0.1:{server.server_address[1]}", model="m")
        began = time.perf_counter()
        results, _ = asyncio.run(closed_loop([endpoint], concurrency=3, requests=50,
                                             workload=Workload(input_tokens=8, output_tokens=1),
                                             enough=lambda done, started: len(done) >= 1))
        waited = time.perf_counter() - began
        deadline = time.monotonic() + 5
        while OneFastTheRestSlow.closed_early < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.shutdown()
        server.server_close()
    assert len(results) == 1
    assert waited < 5  # the two slow streams (10 s each) were not waited for
    assert OneFastTheRestSlow.closed_early == 2


def test_window_throughputs_are_batch_means_of_completions():
    from slmpack.core.summary import RequestResult, window_throughputs

    done = [RequestResult(output_tokens=10, finished_at_s=t) for t in (1, 1, 2, 2, 3, 3, 3.5)]
    # Windows of two completions: 20 tokens over [0,1], [1,2], [2,3]; the last, incomplete window is left out.
    assert window_throughputs(done, started_at_s=0, window=2) == [20, 20, 20]
    failed = [RequestResult(error="x", finished_at_s=0.5)]
    assert window_throughputs(failed + done[:2], started_at_s=0, window=2) == [20]


# /metrics as an engine may expose it: samples with timestamps, a label value with spaces, two engine cores.
ENGINE_METRICS = b"""# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Small Model 1"} 0.25 1767225600000
vllm:kv_cache_usage_perc{engine="1",model_name="Small Model 1"} 0.5 1767225600000
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="Small Model 1"} 3.0 1767225600000
"""


def serve(body: bytes) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def scrape(body: bytes) -> dict[str, float]:
    server = serve(body)
    try:
        async with httpx.AsyncClient() as client:
            return await scrape_engine_metrics(client, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def test_engine_metrics_are_read_as_the_exposition_format_defines_them_not_by_their_last_token():
    assert asyncio.run(scrape(ENGINE_METRICS)) == {"kv": 0.75, "preemptions": 3.0}


def test_a_metrics_page_that_does_not_parse_gives_no_engine_metrics():
    assert asyncio.run(scrape(b"vllm:kv_cache_usage_perc{engine=0 not prometheus\n")) == {}


def test_a_per_endpoint_cap_holds_every_engine_at_it_and_the_rest_wait():
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Streaming(BaseHTTPRequestHandler):
        in_flight = peak = 0
        lock = threading.Lock()

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            with self.lock:
                type(self).in_flight += 1
                type(self).peak = max(self.peak, self.in_flight)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for _ in range(3):
                time.sleep(0.02)
                self.wfile.write(f"data: {json.dumps({'choices': [{'text': 'x'}]})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            with self.lock:
                type(self).in_flight -= 1

        def log_message(self, *args):
            pass

    servers = []
    for _ in range(2):
        handler = type("Engine", (Streaming,), {"in_flight": 0, "peak": 0, "lock": threading.Lock()})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        endpoints = [Endpoint(f"http://127.0.0.1:{s.server_address[1]}", "m") for s in servers]
        results, _ = asyncio.run(closed_loop(endpoints, concurrency=10, requests=40,
                                             workload=Workload(input_tokens=8, output_tokens=3), per_endpoint=3))
        assert len(results) == 40 and all(r.ok for r in results)
        # Ten clients, but never more than three requests on either engine, and both full.
        assert [s.RequestHandlerClass.peak for s in servers] == [3, 3]
    finally:
        for server in servers:
            server.shutdown()
