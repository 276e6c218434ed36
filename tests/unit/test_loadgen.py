"""The load generator never raises for a failed request: the error goes into the result."""

import asyncio
import socket

from slmpack.core.summary import summarize
from slmpack.profiler.loadgen import Endpoint, Workload, closed_loop, synthetic_prompt


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


def test_window_throughputs_are_batch_means_of_completions():
    from slmpack.core.summary import RequestResult, window_throughputs

    done = [RequestResult(output_tokens=10, finished_at_s=t) for t in (1, 1, 2, 2, 3, 3, 3.5)]
    # Windows of two completions: 20 tokens over [0,1], [1,2], [2,3]; the last, incomplete window is left out.
    assert window_throughputs(done, started_at_s=0, window=2) == [20, 20, 20]
    failed = [RequestResult(error="x", finished_at_s=0.5)]
    assert window_throughputs(failed + done[:2], started_at_s=0, window=2) == [20]
