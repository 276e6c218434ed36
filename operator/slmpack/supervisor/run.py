"""The pack pod's supervisor: the pod's own MPS daemon, its engines one after another, restarts, health, drain.

- **MPS.** With `mps` set it starts `nvidia-cuda-mps-control -d` with `CUDA_MPS_PIPE_DIRECTORY` and
  `CUDA_MPS_LOG_DIRECTORY` in the pod (MPS's default, /tmp/nvidia-mps, is the host's when the container
  toolkit mounts it), waits for the daemon's `control` pipe, and gives every engine the same two variables,
  so they are its clients (the MPS documentation: clients and daemon must agree on the pipe directory, and
  run as one user, which one container ensures). The container toolkit injects the binary with the driver's
  utilities (NVIDIA/nvidia-container-toolkit pkg/nvcdi/driver-nvml.go). On `quit` at the end the daemon
  stops its server. Without `mps` (time-slicing, CPU) no daemon runs.
- **Engines.** Started one after another, in order, each once the previous one answers /health (vLLM
  measures free memory as it starts), each with its own port, its caps' environment
  (`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`, `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`, OpenMP threads) and
  `--kv-cache-memory-bytes`. An engine that exits is restarted after a backoff that doubles up to a limit and
  starts again from the first once it has served that long; the others keep serving meanwhile, and only one
  engine starts at a time.
- **Health.** On its own port: `/health` answers while the supervisor runs (liveness), `/ready` once every
  engine has served and one serves now, until the drain (readiness; the router checks each engine on its own
  port), and `/engines` lists each engine's state, restarts and process.
- **Drain.** On SIGTERM `/ready` turns 503 at once, so the pod leaves the router's Endpoints while its
  engines keep answering for `drain_seconds`; then each engine's process group gets SIGTERM, SIGKILL after
  `stop_grace_seconds`, and the MPS daemon is told to quit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from slmpack.adapters.processes import stop_group
from slmpack.core.packpod import ENGINE_LABEL, SUPERVISOR_CONFIG_ENV, EngineSlot, SupervisorConfig

log = logging.getLogger(__name__)
MPS_CONTROL = "nvidia-cuda-mps-control"
TICK_SECONDS = 0.5
MPS_START_SECONDS = 30


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help=f"the configuration as JSON (default: ${SUPERVISOR_CONFIG_ENV})")


class SupervisorError(RuntimeError):
    """The pod cannot run its engines; the message says why."""


@dataclass
class Engine:
    """One engine and what the supervisor knows of it."""

    slot: EngineSlot
    process: subprocess.Popen | None = None
    state: str = "waiting"  # waiting, starting, serving, backoff, stopped
    restarts: int = 0
    served_once: bool = False
    started_at: float = 0.0
    serving_since: float = 0.0
    next_start_at: float = 0.0
    backoff_s: float = 0.0
    last_exit: int | None = None

    def describe(self) -> dict:
        return {"name": self.slot.name, "deployment": self.slot.deployment, "port": self.slot.port,
                "state": self.state, "restarts": self.restarts, "pid": self.process.pid if self.process else None,
                "lastExitCode": self.last_exit}


@dataclass
class MpsControl:
    """The pod's own MPS control daemon, found by its clients through its pipe directory."""

    pipe_directory: Path
    log_directory: Path
    binary: str = MPS_CONTROL

    def client_env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_directory), "CUDA_MPS_LOG_DIRECTORY": str(self.log_directory)}

    def start(self) -> None:
        binary = shutil.which(self.binary)
        if binary is None:
            raise SupervisorError(f"sharing mps needs {self.binary}, which the NVIDIA container toolkit mounts into "
                                  "GPU containers with the driver's utilities: is this container given a GPU by the "
                                  "NVIDIA runtime (spec.scheduling.runtimeClassName)?")
        for directory in (self.pipe_directory, self.log_directory):
            directory.mkdir(parents=True, exist_ok=True)
        subprocess.run([binary, "-d"], env=os.environ | self.client_env(), check=True, timeout=MPS_START_SECONDS)
        deadline = time.monotonic() + MPS_START_SECONDS
        while not (self.pipe_directory / "control").exists():
            if time.monotonic() > deadline:
                raise SupervisorError(f"the MPS control daemon made no control pipe in {self.pipe_directory} within "
                                      f"{MPS_START_SECONDS} s; see {self.log_directory}/control.log")
            time.sleep(0.1)
        log.info("MPS control daemon running, pipe directory %s", self.pipe_directory)

    def quit(self) -> None:
        binary = shutil.which(self.binary)
        if binary:
            subprocess.run([binary], input=b"quit\n", env=os.environ | self.client_env(), check=False, timeout=30)


@dataclass
class Supervisor:
    config: SupervisorConfig
    mps: MpsControl | None = None
    engines: list[Engine] = field(default_factory=list)
    draining: bool = False
    # Set by SIGTERM. Only the main thread changes the engines; the health server reads them as they are.
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if not self.config.names_unique():
            raise SupervisorError("every engine of a pack pod needs its own name and port")
        self.engines = [Engine(slot) for slot in self.config.engines]
        if self.config.mps and self.mps is None:
            root = Path(self.config.mps_directory)
            self.mps = MpsControl(root / "pipe", root / "log")

    # ---- what the engines get

    def engine_env(self, engine: Engine) -> dict[str, str]:
        slot = engine.slot
        return os.environ | slot.env | (self.mps.client_env() if self.mps else {}) | slot.caps.env()

    def engine_argv(self, engine: Engine) -> list[str]:
        return [*engine.slot.command, *engine.slot.caps.args()]

    # ---- the loop

    def spawn(self, engine: Engine, now: float) -> None:
        argv = self.engine_argv(engine)
        log.info("starting engine %s on port %d (restart %d): %s", engine.slot.name, engine.slot.port,
                 engine.restarts, " ".join(argv))
        # Its own process group, so that stopping it stops the workers it starts too.
        engine.process = subprocess.Popen(argv, env=self.engine_env(engine), start_new_session=True)
        engine.state, engine.started_at = "starting", now

    def healthy(self, engine: Engine) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{engine.slot.port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def exited(self, engine: Engine, now: float, why: str) -> None:
        """The engine is gone: it waits for its backoff, then starts again."""
        config = self.config
        if engine.process is not None and engine.process.poll() is None:
            stop_group(engine.process, config.stop_grace_seconds)
        engine.last_exit = engine.process.returncode if engine.process else None
        served_long = engine.state == "serving" and now - engine.serving_since >= config.restart_backoff_max_seconds
        engine.backoff_s = config.restart_backoff_seconds if served_long or not engine.backoff_s else min(
            engine.backoff_s * 2, config.restart_backoff_max_seconds)
        engine.state, engine.next_start_at = "backoff", now + engine.backoff_s
        engine.restarts += 1
        log.warning("engine %s %s; restarting in %.0f s while the others serve", engine.slot.name, why,
                    engine.backoff_s)

    def step(self, now: float) -> None:
        """One look at every engine: notice exits, promote a healthy start, start the next one due."""
        for engine in self.engines:
            if engine.state in ("starting", "serving") and engine.process.poll() is not None:
                self.exited(engine, now, f"exited with code {engine.process.returncode}")
        starting = next((e for e in self.engines if e.state == "starting"), None)
        if starting is not None:
            if self.healthy(starting):
                starting.state, starting.served_once, starting.serving_since = "serving", True, now
                log.info("engine %s serves on port %d", starting.slot.name, starting.slot.port)
            elif now - starting.started_at > self.config.start_timeout_seconds:
                self.exited(starting, now, f"did not answer /health within {self.config.start_timeout_seconds:.0f} s")
            return  # one start at a time
        due = next((e for e in self.engines if e.state in ("waiting", "backoff") and e.next_start_at <= now), None)
        if due is not None:
            self.spawn(due, now)

    def ready(self) -> bool:
        return not self.draining and all(e.served_once for e in self.engines) and any(
            e.state == "serving" for e in self.engines)

    def run(self) -> int:
        """Start the daemon, then run the engines until SIGTERM; then drain and stop."""
        if self.mps is not None:
            self.mps.start()
        try:
            while not self.stopping.is_set():
                self.step(time.monotonic())
                self.stopping.wait(TICK_SECONDS)
            self.drain()
        finally:
            if self.mps is not None:
                self.mps.quit()
        return 0

    def drain(self) -> None:
        self.draining = True
        log.info("draining: not ready; the engines serve for %.0f s more", self.config.drain_seconds)
        time.sleep(self.config.drain_seconds)
        for engine in self.engines:
            if engine.process is not None:
                stop_group(engine.process, self.config.stop_grace_seconds)
            engine.state = "stopped"
        log.info("every engine stopped")

    # ---- metrics

    def metrics(self) -> bytes:
        """The serving engines' /metrics as one, every series labelled with its engine (ENGINE_LABEL): the pod
        has one scrape address, and its engines share one metric name space."""
        families: dict[str, Metric] = {}
        for engine in self.engines:
            if engine.state != "serving":
                continue
            try:
                text = httpx.get(f"http://127.0.0.1:{engine.slot.port}/metrics", timeout=2).text
                parsed = list(text_string_to_metric_families(text))
            except (httpx.HTTPError, ValueError) as error:
                log.warning("engine %s gave no metrics: %s", engine.slot.name, error)
                continue
            for family in parsed:
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                merged.samples += [sample._replace(labels={**sample.labels, ENGINE_LABEL: engine.slot.name})
                                   for sample in family.samples]
        return generate_latest(SimpleNamespace(collect=lambda: list(families.values())))  # what a registry gives

    # ---- health

    def serve_health(self) -> ThreadingHTTPServer:
        supervisor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path == "/health":
                    self.reply(200, {"status": "draining" if supervisor.draining else "running"})
                elif self.path == "/ready":
                    ready = supervisor.ready()
                    self.reply(200 if ready else 503, {"ready": ready})
                elif self.path == "/engines":
                    self.reply(200, {"engines": [e.describe() for e in supervisor.engines]})
                elif self.path == "/metrics":
                    data = supervisor.metrics()
                    self.send_response(200)
                    self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                else:
                    self.reply(404, {"error": f"no {self.path}: /health, /ready, /engines or /metrics"})

            def reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_):
                pass

        server = ThreadingHTTPServer(("0.0.0.0", self.config.port), Handler)
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
        return server


def run(args: argparse.Namespace) -> int:
    raw = args.config or os.environ.get(SUPERVISOR_CONFIG_ENV)
    if not raw:
        log.error("no configuration: set %s or --config", SUPERVISOR_CONFIG_ENV)
        return 2
    supervisor = Supervisor(SupervisorConfig.model_validate_json(raw))
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stopping.set())
    server = supervisor.serve_health()
    log.info("supervising %d engine(s)%s", len(supervisor.engines),
             " under the pod's own MPS daemon" if supervisor.mps else "")
    try:
        return supervisor.run()
    except SupervisorError as error:
        log.error("%s", error)
        return 1
    finally:
        server.shutdown()
