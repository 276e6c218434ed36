"""Engine settings that follow from the hardware (pure): the dtype for `auto`, the MPS caps per replica, and
the CPU threads per replica."""

from __future__ import annotations

import math
from collections.abc import Iterable

from slmpack.api.models import Device, Dtype

# CPU flags with native bfloat16 arithmetic, compared without case or underscores: /proc/cpuinfo says
# avx512_bf16, NFD's cpu-cpuid labels AVX512BF16.
BF16_CPU_FLAGS = frozenset({"avx512bf16", "amxbf16"})


def resolve_dtype(requested: Dtype | str, device: Device | str, cpu_flags: Iterable[str] = ()) -> str:
    """The dtype to run. On CPU, `auto` means bfloat16 only where the CPU computes it natively,
    float32 otherwise: without AVX512-BF16 vLLM's bfloat16 hardly batches. On GPU, `auto`
    stays vLLM's own choice (the model config's dtype)."""
    requested = Dtype(requested)
    if requested != Dtype.auto or Device(device) != Device.cpu:
        return requested.value
    flags = {f.lower().replace("_", "") for f in cpu_flags}
    return Dtype.bfloat16.value if flags & BF16_CPU_FLAGS else Dtype.float32.value


def cpuinfo_field(text: str, *keys: str) -> str | None:
    """The first processor's value of one of `keys` in a /proc/cpuinfo text."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def cpu_flags_from_cpuinfo(text: str) -> set[str]:
    """The flags of the first processor in a /proc/cpuinfo text."""
    return set((cpuinfo_field(text, "flags", "Features") or "").split())


def vector_flags(flags: Iterable[str]) -> str:
    """The flags a CPU engine's speed depends on (AVX2, AVX-512, AMX), for a record of the machine."""
    return ",".join(sorted(f for f in flags if f.startswith(("avx2", "avx512", "amx")))) or "none"


def mps_caps(replicas: int, gpu_memory_mib: int | None, budget_fraction: float = 0.9) -> tuple[int, int | None]:
    """The MPS caps a plan gives each of `replicas` clients: an equal share of the SMs (active
    thread percentage) and of the memory budget (pinned device memory, MiB)."""
    threads = math.ceil(100 / replicas)
    memory = int(gpu_memory_mib * math.floor(budget_fraction / replicas * 1000) / 1000) if gpu_memory_mib else None
    return threads, memory


def cpu_threads_per_replica(replicas: int, cores: int) -> int:
    """The node's cores shared out equally, at least one thread each: every replica count gets the
    same compute, so one replica is not measured with fewer threads than a pack has in all."""
    return max(1, cores // replicas)


def cpu_kv_cache_bytes(replicas: int, pack_kv_cache_gib: int) -> int:
    """Each replica's KV cache on CPU: the pack's space shared out equally, the same total for every count."""
    return pack_kv_cache_gib * 1024**3 // replicas


def cpu_threads_env(threads: int | None) -> dict[str, str]:
    """vLLM CPU with `threads` OpenMP threads left to the kernel's scheduler.

    vLLM's default binding (`auto`) pins every engine to the same first cores of the CPUs
    it may use, so co-located replicas of a StatefulSet, which cannot tell each other
    apart, would all compute on core 0. Unbound threads, cores/N per replica, spread
    instead. The profiler runs its k replicas the same way, so it measures what is deployed.
    `threads` None (no measured count) leaves the thread count to OpenMP, unbound all the same.
    """
    unbound = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    return unbound if threads is None else unbound | {"OMP_NUM_THREADS": str(threads)}
