"""The pack pod: one pod per pack holds one whole GPU and runs the pack's engines under a supervisor (pure).

With `spec.placement: pack-pod` nothing about GPU sharing is set up in the cluster. Each pack is one pod
that requests one whole GPU (`nvidia.com/gpu: 1` on a node whose device plugin shares nothing), so its
engines are on one physical GPU by construction, on any node. In it `slmpack supervise` (slmpack/supervisor/)
starts the pod's own MPS control daemon (sharing mps; none for time-slicing or on the CPU), then the engines
one after another, each on its own port and with its own caps, and restarts a crashed one while the others
serve.

This module holds the supervisor's configuration (what the operator writes and the supervisor reads, from
the environment variable `SUPERVISOR_CONFIG_ENV`) and the builders of the pod. The configuration is a list
of engines, each with its own model, arguments, environment and caps, so that engines of several
deployments can later share one pod; today every engine of a pod belongs to one deployment and has the
plan's caps.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from slmpack.api.models import Device, Plan, Sharing, SLMDeploymentSpec
from slmpack.core.hardware import cpu_threads_env

SUPERVISOR_CONFIG_ENV = "SLMPACK_SUPERVISOR_CONFIG"
SUPERVISOR_PORT = 8090  # the supervisor's own: /health, /ready, /engines, and every engine's /metrics
ENGINE_PORT_PREFIX = "engine-"  # engine i listens on the container port named engine-<i>
# Each engine's name as a label on every series of the supervisor's /metrics: not vLLM's own `engine` label, the
# index of an engine core.
ENGINE_LABEL = "slmpack_engine"
# The MPS pipe and log directories live in the pod's own /tmp: the container toolkit mounts the host's
# /tmp/nvidia-mps (MPS's default pipe directory) into GPU containers where it exists
# (NVIDIA/nvidia-container-toolkit internal/discover/ipc.go), so the pod's daemon must not use that one.
MPS_DIRECTORY = "/tmp/slmpack-mps"
MIB = 1024 * 1024


class EngineCaps(BaseModel):
    """What one engine may use of the pack's device: its share of the SMs and of the memory under MPS,
    its KV cache, and on the CPU its OpenMP threads. Unset means no cap of that kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mps_active_thread_percentage: int | None = Field(None, ge=1, le=100)
    mps_pinned_memory_limit_mib: int | None = Field(None, ge=1)
    kv_cache_memory_bytes: int | None = Field(None, ge=1)
    cpu_threads: int | None = Field(None, ge=1)

    def args(self) -> list[str]:
        """The engine arguments the caps add: a fixed KV cache (vLLM >= 0.10.2), so no engine sizes its cache
        from what its neighbours hold when it starts."""
        if self.kv_cache_memory_bytes is None:
            return []
        return ["--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes)]

    def env(self, device_index: int = 0) -> dict[str, str]:
        """The caps an MPS client reads from its environment when it creates its context (CUDA MPS
        documentation, 'Per-client' limits), and the OpenMP threads of a CPU engine."""
        env = {}
        if self.mps_active_thread_percentage is not None:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(self.mps_active_thread_percentage)
        if self.mps_pinned_memory_limit_mib is not None:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"{device_index}={self.mps_pinned_memory_limit_mib}M"
        if self.cpu_threads is not None:
            env.update(cpu_threads_env(self.cpu_threads))
        return env


class EngineSlot(BaseModel):
    """One engine of the pod: how to start it, where it listens, and its caps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., min_length=1, description="Unique in the pod; the router names its server after it.")
    deployment: str = Field(..., description="The SLMDeployment the engine serves.")
    port: int = Field(..., ge=1, le=65535)
    command: list[str] = Field(..., min_length=1, description="The engine's argv, its port included; the "
                               "supervisor adds the KV cache from the caps.")
    env: dict[str, str] = Field(default_factory=dict, description="Its environment, beside the container's.")
    caps: EngineCaps = Field(default_factory=EngineCaps)


class SupervisorConfig(BaseModel):
    """The supervisor's whole input."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engines: list[EngineSlot] = Field(..., min_length=1)
    mps: bool = Field(False, description="Start the pod's own MPS control daemon and make every engine its client.")
    mps_directory: str = Field(MPS_DIRECTORY, description="Where the daemon's pipe/ and log/ directories go.")
    port: int = Field(SUPERVISOR_PORT, ge=1, le=65535, description="The supervisor's health port.")
    start_timeout_seconds: float = Field(900, gt=0, description="How long an engine may take to become healthy.")
    restart_backoff_seconds: float = Field(2, gt=0, description="The first wait before a crashed engine restarts.")
    restart_backoff_max_seconds: float = Field(60, gt=0, description="The longest wait between restarts.")
    drain_seconds: float = Field(10, ge=0, description="On SIGTERM, how long the engines keep serving while the "
                                 "pod leaves the router, before they are stopped.")
    stop_grace_seconds: float = Field(15, ge=0, description="How long a stopped engine may take before SIGKILL.")

    def names_unique(self) -> bool:
        return len({e.name for e in self.engines}) == len(self.engines) == len({e.port for e in self.engines})


def engine_port_name(index: int) -> str:
    return f"{ENGINE_PORT_PREFIX}{index}"


def engine_caps(spec: SLMDeploymentSpec, plan: Plan, engines: int) -> list[EngineCaps]:
    """Each engine's caps from the plan: today all equal (the fair decision's one budget shared equally),
    as a list so that a later plan may give unequal ones. Under time-slicing no MPS cap applies, and each
    engine keeps to its KV cache by itself."""
    mps = spec.engine.device == Device.gpu and spec.sharing == Sharing.mps
    caps = EngineCaps(
        mps_active_thread_percentage=plan.mps_active_thread_percentage if mps else None,
        mps_pinned_memory_limit_mib=plan.mps_pinned_memory_limit_mib if mps else None,
        kv_cache_memory_bytes=plan.kv_cache_memory_bytes,
        cpu_threads=plan.cpu_threads_per_replica if spec.engine.device == Device.cpu else None)
    return [caps] * engines


def supervisor_config(spec: SLMDeploymentSpec, deployment: str, plan: Plan, engines: int,
                      engine_argv, engine_env: dict[str, str]) -> SupervisorConfig:
    """The configuration of a pack pod running `engines` engines of one deployment. `engine_argv(port)` is
    the engine's argv on that port without its KV cache (core/manifests.py builds it, as for a replica pod);
    `engine_env` is the deployment's environment for its engines, beside their caps."""
    slots = []
    for i, caps in enumerate(engine_caps(spec, plan, engines)):
        port = spec.port + i
        slots.append(EngineSlot(name=engine_port_name(i), deployment=deployment, port=port,
                                command=list(engine_argv(port)), env=dict(engine_env), caps=caps))
    return SupervisorConfig(engines=slots, mps=spec.engine.device == Device.gpu and spec.sharing == Sharing.mps,
                            port=supervisor_port(spec, engines))


def supervisor_port(spec: SLMDeploymentSpec, engines: int) -> int:
    """The supervisor's port, clear of the engines' spec.port .. spec.port + engines - 1."""
    return SUPERVISOR_PORT if not spec.port <= SUPERVISOR_PORT < spec.port + engines else spec.port + engines


def pack_pod_ports(spec: SLMDeploymentSpec, engines: int) -> list[int]:
    """Every port a pack pod of `engines` engines serves: each engine's, then the supervisor's."""
    return [spec.port + i for i in range(engines)] + [supervisor_port(spec, engines)]
