"""The pack pod's supervisor (`slmpack supervise`) run as the pod runs it, against stand-in engines and a
stand-in MPS control daemon: the daemon starts first with its pipe and log directories in the pod, each engine
is its client with its own caps and starts once the one before it answers, a killed engine is restarted while
the others answer, and SIGTERM drains (not ready, still answering) before everything stops and the daemon quits."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from slmpack.adapters.engine_metrics import parse
from slmpack.core.packpod import SUPERVISOR_CONFIG_ENV, EngineCaps, EngineSlot, SupervisorConfig

ROOT = Path(__file__).resolve().parents[2]

# The stand-in MPS control daemon, as `nvidia-cuda-mps-control`: `-d` checks what a per-pod daemon needs (its
# pipe and log directories set, existing, and not the host's /tmp/nvidia-mps that the toolkit may mount), records
# its environment and makes the control pipe its clients look for; `quit` on stdin records the quit.
STAND_IN_MPS_CONTROL = r'''#!PYTHON
import json, os, sys
pipe, logs = os.environ.get("CUDA_MPS_PIPE_DIRECTORY"), os.environ.get("CUDA_MPS_LOG_DIRECTORY")
if not pipe or not logs or not os.path.isdir(pipe) or not os.path.isdir(logs):
    sys.exit(f"CUDA_MPS_PIPE_DIRECTORY ({pipe}) and CUDA_MPS_LOG_DIRECTORY ({logs}) must name existing directories")
if pipe.startswith("/tmp/nvidia-mps"):
    sys.exit("the pipe directory is the host's default")
record = os.path.join(logs, "control.log")
if sys.argv[1:] == ["-d"]:
    os.mkfifo(os.path.join(pipe, "control"))
    with open(record, "a") as out:
        out.write(json.dumps({"event": "started", "pipe": pipe, "logs": logs}) + "\n")
else:
    command = sys.stdin.read().strip()
    with open(record, "a") as out:
        out.write(json.dumps({"event": command}) + "\n")
    if command == "quit":
        os.unlink(os.path.join(pipe, "control"))
'''

# A stand-in engine: as an MPS client it refuses to start without the daemon's control pipe (a CUDA client
# finds no server then); it records what it got, answers /health after `delay` s, and names itself in answers.
STAND_IN_ENGINE = r'''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
if pipe is not None and not os.path.exists(os.path.join(pipe, "control")):
    sys.exit(f"no MPS control daemon in {pipe}")
started = time.time()
keys = [k for k in os.environ if k.startswith(("CUDA_MPS_", "OMP_"))]
with open(os.path.join(os.environ["RECORD"], f"{port}.json"), "a") as out:
    out.write(json.dumps({"argv": sys.argv[1:], "env": {k: os.environ[k] for k in keys}, "started": started,
                          "pid": os.getpid()}) + "\n")
delay = float(os.environ.get("DELAY", "0.5"))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/metrics":  # as vLLM's prometheus_client writes a counter, with its model and core labels
            self.reply(200, ("# HELP vllm:generation_tokens_total Generated tokens.\n"
                             "# TYPE vllm:generation_tokens_total counter\n"
                             f'vllm:generation_tokens_total{{engine="0",model_name="m"}} {port % 1000}.0\n'
                             "# TYPE vllm:num_requests_running gauge\n"
                             f'vllm:num_requests_running{{engine="0",model_name="m"}} {port % 7}.0\n').encode())
            return
        self.reply(200 if time.time() - started > delay else 503, b"{}")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.reply(200, json.dumps({"port": port, "pid": os.getpid()}).encode())

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Pod:
    """`slmpack supervise` as the pack pod's container runs it, with the stand-ins on its PATH."""

    def __init__(self, tmp: Path, caps: list[EngineCaps], mps: bool):
        self.record = tmp / "record"
        self.record.mkdir()
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        control = bin_dir / "nvidia-cuda-mps-control"
        control.write_text(STAND_IN_MPS_CONTROL.replace("PYTHON", sys.executable))
        control.chmod(0o755)
        engine = tmp / "engine.py"
        engine.write_text(STAND_IN_ENGINE)
        *ports, self.port = free_ports(len(caps) + 1)
        self.mps_directory = tmp / "pod-tmp" / "slmpack-mps"
        self.config = SupervisorConfig(
            engines=[EngineSlot(name=f"engine-{i}", deployment="chat", port=port,
                                command=[sys.executable, str(engine), "--port", str(port)], env={"DELAY": "0.5"},
                                caps=cap) for i, (port, cap) in enumerate(zip(ports, caps, strict=True))],
            mps=mps, mps_directory=str(self.mps_directory), port=self.port, restart_backoff_seconds=0.5,
            drain_seconds=2, stop_grace_seconds=2)
        env = {**os.environ, SUPERVISOR_CONFIG_ENV: self.config.model_dump_json(), "RECORD": str(self.record),
               "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "operator")}
        self.log = (tmp / "supervisor.log").open("w+")
        self.process = subprocess.Popen([sys.executable, "-m", "slmpack.cli", "supervise"], env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2)

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if self.get("/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"the pod did not turn ready:\n{self.output()}")

    def engines(self) -> list[dict]:
        return self.get("/engines").json()["engines"]

    def starts(self, port: int) -> list[dict]:
        path = self.record / f"{port}.json"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def mps_events(self) -> list[dict]:
        path = self.mps_directory / "log" / "control.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        for engine in self.config.engines:
            for start in self.starts(engine.port):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(start["pid"], signal.SIGKILL)


@pytest.fixture
def pod(tmp_path):
    made = []

    def start(caps: list[EngineCaps], mps: bool = True) -> Pod:
        made.append(Pod(tmp_path, caps, mps))
        return made[-1]

    yield start
    for p in made:
        p.close()


UNEQUAL = [EngineCaps(mps_active_thread_percentage=60, mps_pinned_memory_limit_mib=48000,
                      kv_cache_memory_bytes=30 * 2**30),
           EngineCaps(mps_active_thread_percentage=40, mps_pinned_memory_limit_mib=24000,
                      kv_cache_memory_bytes=12 * 2**30)]


def test_the_pods_own_mps_daemon_starts_first_and_each_engine_is_its_client_with_its_own_caps(pod):
    p = pod(UNEQUAL)
    p.wait_ready()
    pipe, logs = p.mps_directory / "pipe", p.mps_directory / "log"
    assert p.mps_events() == [{"event": "started", "pipe": str(pipe), "logs": str(logs)}]
    first, second = (p.starts(e.port)[0] for e in p.config.engines)
    assert first["env"] == {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(logs),
                            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "60", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=48000M"}
    assert second["env"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"
    assert second["env"]["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=24000M"
    assert first["argv"][-2:] == ["--kv-cache-memory-bytes", str(30 * 2**30)]
    assert second["argv"][-2:] == ["--kv-cache-memory-bytes", str(12 * 2**30)]
    # One after another: the second starts only once the first answers /health (0.5 s after its start).
    assert second["started"] >= first["started"] + 0.5
    assert [e["state"] for e in p.engines()] == ["serving", "serving"]


def test_the_supervisor_serves_every_engines_metrics_each_labelled_with_its_engine(pod):
    from prometheus_client.parser import text_string_to_metric_families

    p = pod(UNEQUAL)
    p.wait_ready()
    (family,) = [f for f in text_string_to_metric_families(p.get("/metrics").text)
                 if f.name == "vllm:generation_tokens"]
    assert family.type == "counter"
    assert sorted((s.name, s.labels["slmpack_engine"], s.labels["engine"], s.value) for s in family.samples) == [
        ("vllm:generation_tokens_total", f"engine-{i}", "0", e.port % 1000) for i, e in enumerate(p.config.engines)]
    # The autoscaler reads the pod's engines as one reading that counts both.
    load = parse(p.get("/metrics").text)
    assert (load.engines, load.running) == (2, sum(e.port % 7 for e in p.config.engines))


def test_without_mps_no_daemon_runs_and_cpu_engines_get_their_threads(pod):
    p = pod([EngineCaps(cpu_threads=3, kv_cache_memory_bytes=2**29)] * 2, mps=False)
    p.wait_ready()
    assert p.mps_events() == []
    for engine in p.config.engines:
        env = p.starts(engine.port)[0]["env"]
        assert env["OMP_NUM_THREADS"] == "3"
        assert not any(k.startswith("CUDA_MPS_") for k in env), env


def test_a_killed_engine_restarts_while_the_others_answer(pod):
    p = pod(UNEQUAL + [EngineCaps(mps_active_thread_percentage=10)])
    p.wait_ready()
    victim, *others = p.config.engines
    failures, answered = [], 0
    stop = threading.Event()

    def ask_others():
        nonlocal answered
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                for engine in others:
                    try:
                        client.post(f"http://127.0.0.1:{engine.port}/v1/completions", json={}).raise_for_status()
                        answered += 1
                    except httpx.HTTPError as error:
                        failures.append(repr(error))
                time.sleep(0.02)

    asking = threading.Thread(target=ask_others)
    asking.start()
    try:
        os.kill(p.starts(victim.port)[0]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(p.starts(victim.port)) < 2 or p.engines()[0]["state"] != "serving":
            assert time.monotonic() < deadline, p.output()
            assert p.get("/ready").status_code == 200  # the others serve: the pod stays in the router
            time.sleep(0.1)
    finally:
        stop.set()
        asking.join()
    assert failures == [] and answered > 10
    restarted = p.engines()[0]
    assert restarted["restarts"] == 1 and restarted["lastExitCode"] == -signal.SIGKILL
    assert p.starts(victim.port)[1]["env"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "60"  # the same caps again
    assert httpx.post(f"http://127.0.0.1:{victim.port}/v1/completions", json={}).status_code == 200


def test_sigterm_drains_then_stops_every_engine_and_the_daemon(pod):
    p = pod(UNEQUAL)
    p.wait_ready()
    p.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert p.get("/ready").status_code == 503  # the pod leaves the router's Endpoints...
    for engine in p.config.engines:  # ...while its engines still answer what reaches them
        assert httpx.post(f"http://127.0.0.1:{engine.port}/v1/completions", json={}).status_code == 200
    assert p.process.wait(15) == 0, p.output()
    for engine in p.config.engines:
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"http://127.0.0.1:{engine.port}/v1/completions", json={}, timeout=2)
    assert [e["event"] for e in p.mps_events()] == ["started", "quit"]


def test_without_the_mps_binary_the_supervisor_says_what_is_missing(tmp_path):
    config = SupervisorConfig(engines=[EngineSlot(name="engine-0", deployment="chat", port=free_ports(1)[0],
                                                  command=["true"])], mps=True, mps_directory=str(tmp_path / "mps"),
                              port=free_ports(1)[0])
    done = subprocess.run([sys.executable, "-m", "slmpack.cli", "supervise"], capture_output=True, text=True,
                          timeout=30, env={**os.environ, SUPERVISOR_CONFIG_ENV: config.model_dump_json(),
                                           "PATH": "/nonexistent", "PYTHONPATH": str(ROOT / "operator")})
    assert done.returncode == 1
    assert "nvidia-cuda-mps-control" in done.stderr and "runtimeClassName" in done.stderr
