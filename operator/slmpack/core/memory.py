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
