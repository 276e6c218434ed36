"""The per-replica memory model: weights + KV cache for the batch + a fixed overhead.

It bounds how many replicas fit on one GPU before any replica is measured; the
measurement then picks among the feasible counts.
"""

from __future__ import annotations

import math

from slmpack.api.models import MemoryFootprint

MIB = 1024 * 1024
# vLLM's default --gpu-memory-utilization: the share of a GPU all replicas together may claim.
GPU_BUDGET_FRACTION = 0.9
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 2}


def footprint_from_hf_config(config: dict, parameters: int, dtype: str = "auto",
                             overhead_mib: int = 1024) -> MemoryFootprint:
    """Derive the footprint from a Hugging Face `config.json` and the parameter count."""
    width = DTYPE_BYTES[dtype]
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return MemoryFootprint(
        weights_mib=math.ceil(parameters * width / MIB),
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * width,
        overhead_mib=overhead_mib,
    )


def kv_cache_mib(footprint: MemoryFootprint, batch_size: int, tokens_per_sequence: int) -> int:
    """KV cache that `batch_size` sequences of `tokens_per_sequence` tokens hold at once."""
    return math.ceil(footprint.kv_bytes_per_token * batch_size * tokens_per_sequence / MIB)


def replica_memory_mib(footprint: MemoryFootprint, batch_size: int, tokens_per_sequence: int) -> int:
    """Memory one replica needs to run `batch_size` full-length sequences without preemption."""
    return footprint.weights_mib + kv_cache_mib(footprint, batch_size, tokens_per_sequence) + footprint.overhead_mib


def feasible_replicas(footprint: MemoryFootprint, gpu_memory_mib: int, batch_size: int,
                      tokens_per_sequence: int, budget_fraction: float = GPU_BUDGET_FRACTION) -> int:
    """How many replicas fit in `budget_fraction` of the GPU, each at the given batch (0 if none)."""
    need = replica_memory_mib(footprint, batch_size, tokens_per_sequence)
    return int(gpu_memory_mib * budget_fraction // need)


# ---------------------------------------------------------------- one replica's share of a GPU

# Kept free under each replica's budget for what the engine allocates beyond its own accounting
# (cuBLAS and NCCL workspaces, allocator fragmentation): 5 % of the share, at least 256 MiB.
HEADROOM_FRACTION = 0.05
MIN_HEADROOM_MIB = 256


def mps_client_limit_mib(gpu_memory_mib: int, slots_per_gpu: int) -> int:
    """The pinned device-memory limit of every client of the device plugin's MPS daemon.

    The daemon sets `<total_bytes / R / 2^20>M` per GPU for R replicas and passes nothing to
    the clients (NVIDIA/k8s-device-plugin cmd/mps-control-daemon/mps/daemon.go).
    """
    return gpu_memory_mib // max(slots_per_gpu, 1)


def headroom_mib(share_mib: int) -> int:
    return max(MIN_HEADROOM_MIB, math.ceil(share_mib * HEADROOM_FRACTION))


def kv_cache_budget_mib(footprint: MemoryFootprint, share_mib: int) -> int:
    """The KV cache one replica may hold in its share: share - weights - overhead - headroom (may be <= 0)."""
    return share_mib - footprint.weights_mib - footprint.overhead_mib - headroom_mib(share_mib)
