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

# Kept free under each replica's budget for what the engine allocates beyond its own accounting (cuBLAS and
# NCCL workspaces, allocator fragmentation): 5 % of the share, at least 256 MiB; under an MPS cap also a
# CUDA context (`headroom_mib`).
HEADROOM_FRACTION = 0.05
MIN_HEADROOM_MIB = 256
# A CUDA context with PyTorch's kernels loaded lazily (CUDA >= 11.7's default) on Ampere and Hopper:
# nvidia-smi shows 400 to 600 MiB for a process that has only initialised the device.
CUDA_CONTEXT_MIB = 640


def mps_client_limit_mib(gpu_memory_mib: int, slots_per_gpu: int) -> int:
    """The pinned device-memory limit of every client of the device plugin's MPS daemon.

    The daemon sets `<total_bytes / R / 2^20>M` per GPU for R replicas and passes nothing to
    the clients (NVIDIA/k8s-device-plugin cmd/mps-control-daemon/mps/daemon.go).
    """
    return gpu_memory_mib // max(slots_per_gpu, 1)


def headroom_mib(share_mib: int, capped: bool = False) -> int:
    """What a replica keeps free under its share: 5 % of it, at least 256 MiB, and under an MPS cap a CUDA
    context more.

    An MPS client may read its free memory as the cap less its own context (`free = cap - context`):
    vLLM's start check then needs the request to stay a context below the cap. The 256 MiB floor alone
    fails there on small GPUs with many slots (an L4 at R = 4 leaves 288 MiB under a 5758 MiB cap, less
    than a context). Without a cap the context is part of the replica's overhead like any other use.
    """
    return max(MIN_HEADROOM_MIB, math.ceil(share_mib * HEADROOM_FRACTION)) + (CUDA_CONTEXT_MIB if capped else 0)


def kv_cache_budget_mib(footprint: MemoryFootprint, share_mib: int, capped: bool = False) -> int:
    """The KV cache one replica may hold in its share: share - weights - overhead - headroom (may be <= 0)."""
    return share_mib - footprint.weights_mib - footprint.overhead_mib - headroom_mib(share_mib, capped)


def start_utilization(gpu_memory_mib: int, share_mib: int, capped: bool) -> float:
    """vLLM's `--gpu-memory-utilization` for an engine with `share_mib` of a `gpu_memory_mib` GPU.

    vLLM refuses to start when `free < ceil(total x utilization)`, with total and free from
    `cudaMemGetInfo` (vllm-project/vllm vllm/v1/worker/utils.py `request_memory`). Under an MPS
    pinned-memory cap (`capped`) it is not settled whether CUDA reports the whole GPU or the cap as
    total, nor whether free is the GPU's or the cap less the client's context. Asking for the share
    less the headroom, as a fraction of the whole GPU, passes every reading:
    - total = GPU, free = GPU less what the neighbours hold (each within its own share): the
      request is below the share, and at least a share is free;
    - total = cap, free = cap - context: the request is cap x (cap - headroom) / GPU, at most half
      the cap with two or more slots (one slot makes cap = GPU, the first reading);
    - total = GPU, free = cap - context: the request is cap - headroom, and the headroom holds a
      context.
    Uncapped (time-slicing, no sharing) the share is the request itself, as vLLM's own default is.
    The KV cache is fixed in bytes beside it (`kv_cache_budget_mib`), so the utilisation only has to
    pass the check.
    """
    wanted = share_mib - headroom_mib(share_mib, capped=True) if capped else share_mib
    return math.floor(max(wanted, 0) / gpu_memory_mib * 1000) / 1000

