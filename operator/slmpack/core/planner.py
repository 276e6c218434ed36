"""The planner: a measured profile, the GPU and the spec in; replicas per GPU and engine settings out (pure).

- Replicas and knee: recomputed from the profile's raw curve and runs with this
  deployment's knee rule, SLO and confidence (`core/replication.py`): k > 1 only when its
  gain over one replica at the same load is significant. Capped by what the memory model
  says fits and by the sharing slots the node advertises. A fixed `spec.replicas`
  overrides the measurement.
  Under the device plugin's MPS the count stays within the R slots per GPU, and the status
  says why when it is fewer.
- `--max-num-seqs` is the batch per replica that was measured for the chosen count (the
  knee when it was not measured).
- Memory, one share per replica: under the device plugin's MPS the daemon pins every client
  at memory/R (and 100/R % of the SMs), so the share is memory/R whatever N is; otherwise
  (time-slicing, no sharing, DRA) it is 0.9 x memory / N. With a memory model the KV cache is
  fixed in bytes, `--kv-cache-memory-bytes` = share - weights - overhead - headroom, so no
  replica depends on what its neighbours hold when it starts; `--gpu-memory-utilization`
  never asks for more than the share (less the headroom under MPS), since vLLM refuses to
  start when less than that is free.
- Under DRA's MPS each replica's claim gets an equal share of the SMs and a pinned limit
  equal to its share, so one replica cannot starve or crowd out the others.
- On CPU (development clusters) the KV cache is `VLLM_CPU_KVCACHE_SPACE` per replica.
"""

from __future__ import annotations

import math

from slmpack.api.models import (
    Device,
    MemoryFootprint,
    Placement,
    Plan,
    Sharing,
    SLMDeploymentSpec,
    SLMProfileStatus,
)
from slmpack.core.hardware import resolve_dtype
from slmpack.core.memory import (
    GPU_BUDGET_FRACTION,
    MIB,
    feasible_replicas,
    headroom_mib,
    kv_cache_budget_mib,
    mps_client_limit_mib,
)
from slmpack.core.replication import choose
from slmpack.core.validation import InvalidSpec

# vLLM's own default for --max-num-seqs, used when no knee is known (fixed replicas, no profile).
VLLM_DEFAULT_MAX_NUM_SEQS = 256


def kv_cache_bytes(spec: SLMDeploymentSpec, footprint: MemoryFootprint, share_mib: int) -> int:
    """One replica's KV cache in bytes, for vLLM's --kv-cache-memory-bytes; InvalidSpec when it cannot
    hold one sequence of spec.model.maxModelLen tokens (vLLM refuses to start then)."""
    kv_mib = kv_cache_budget_mib(footprint, share_mib)
    longest_mib = math.ceil(footprint.kv_bytes_per_token * spec.model.max_model_len / MIB)
    if kv_mib < longest_mib:
        raise InvalidSpec(
            f"spec.model: {footprint.weights_mib} MiB of weights + {footprint.overhead_mib} MiB overhead + "
            f"{headroom_mib(share_mib)} MiB headroom + {longest_mib} MiB of KV cache for one "
            f"{spec.model.max_model_len}-token sequence do not fit one replica's {share_mib} MiB share of the GPU: "
            "lower spec.model.maxModelLen or spec.replicas, or use nodes with fewer sharing replicas "
            "(nvidia.com/gpu.replicas) or more GPU memory")
    return kv_mib * MIB


def plan(spec: SLMDeploymentSpec, profile: SLMProfileStatus | None, gpu_memory_mib: int | None = None,
         sharing_slots: int | None = None, plugin_mps: bool = False) -> Plan:
    """Decide replicas per GPU and per-replica settings.

    `gpu_memory_mib` is the GPU's memory (the node's nvidia.com/gpu.memory label);
    `sharing_slots` is how many pods may share it (nvidia.com/gpu.replicas, R);
    `plugin_mps` says the device plugin's MPS daemon caps every client at 1/R.
    Raises InvalidSpec when the model cannot fit one replica's share.
    """
    choice = choose(profile, spec.profiling) if profile else None
    knee = choice.knee.batch_size if choice and choice.knee else None
    tokens_per_sequence = spec.profiling.workload.input_tokens + spec.profiling.workload.output_tokens
    reasons: list[str] = []
    if spec.replicas != "auto":
        replicas = spec.replicas
        reasons.append(f"{replicas} replicas fixed by spec.replicas")
    elif choice is not None:
        replicas = choice.decision.replicas
        reasons.append(choice.decision.explanation)
    else:
        replicas = 1
        reasons.append("1 replica: no profile")
    gpu = spec.engine.device == Device.gpu
    slots = sharing_slots or 1

    if spec.replicas == "auto":
        if profile and profile.memory and gpu_memory_mib and knee and gpu and not plugin_mps:
            fits = feasible_replicas(profile.memory, gpu_memory_mib, knee, tokens_per_sequence)
            if fits < replicas:
                replicas = max(fits, 1)
                reasons.append(f"capped at {replicas} by memory: each replica needs weights + KV for "
                               f"{knee} x {tokens_per_sequence} tokens")
        if sharing_slots and sharing_slots < replicas:
            replicas = sharing_slots
            reasons.append(f"capped at {replicas} by the GPU's {sharing_slots} sharing slots")
    if plugin_mps and gpu and replicas < slots:
        reasons.append(f"{replicas} of the GPU's {slots} MPS slots used: the device plugin's MPS daemon caps each "
                       f"replica at 1/{slots} of the memory and SMs whatever the count, so {slots - replicas} "
                       "slot(s) stay idle")

    measured_batch = choice.max_num_seqs if choice and choice.measured and choice.measured.replicas == replicas \
        else None
    max_num_seqs = measured_batch or knee or VLLM_DEFAULT_MAX_NUM_SEQS
    reasons.append(f"--max-num-seqs {max_num_seqs} " + (
        "as measured for this replica count" if measured_batch else
        "at the knee" if knee else "(vLLM's default: no knee known)"))

    mps = gpu and spec.sharing == Sharing.mps
    utilization = memory_per_replica = pinned = threads = kv_bytes = None
    if gpu and plugin_mps and gpu_memory_mib:
        # The daemon's defaults, which the replicas get whatever they ask for.
        pinned = mps_client_limit_mib(gpu_memory_mib, slots)
        threads = 100 // slots
        memory_per_replica = pinned
        utilization = math.floor((pinned - headroom_mib(pinned)) / gpu_memory_mib * 1000) / 1000
        reasons.append(f"each replica fits under the MPS limit of {pinned} MiB (memory/{slots}) with "
                       f"{headroom_mib(pinned)} MiB headroom")
    elif gpu:
        utilization = math.floor(GPU_BUDGET_FRACTION / replicas * 1000) / 1000
        memory_per_replica = int(gpu_memory_mib * utilization) if gpu_memory_mib else None
        if mps and spec.placement == Placement.dra:  # the claim sets these limits for its clients
            threads, pinned = math.ceil(100 / replicas), memory_per_replica
    else:
        memory_per_replica = spec.engine.cpu_kv_cache_space_gib * 1024
    if gpu and profile and profile.memory and memory_per_replica:
        kv_bytes = kv_cache_bytes(spec, profile.memory, memory_per_replica)
        reasons.append(f"--kv-cache-memory-bytes {kv_bytes} (share - weights - overhead - headroom)")

    chosen = next((p for p in (profile.replication if profile else []) if p.replicas == replicas), None)
    if chosen is not None and chosen.error is None:
        throughput, p99_itl = chosen.aggregate_throughput_tokens_per_s, chosen.p99_itl_ms
        energy = chosen.energy_per_token_joules
    elif choice and choice.knee:
        # Not measured at this count: assume replicas add up, an optimistic bound.
        throughput = choice.knee.throughput_tokens_per_s * replicas if choice.knee.throughput_tokens_per_s else None
        p99_itl = choice.knee.p99_itl_ms
        energy = next((p.energy_per_token_joules for p in profile.points if p.batch_size == knee), None)
    else:
        throughput = p99_itl = energy = None

    return Plan(
        knee_batch_size=knee,
        replicas=replicas,
        max_num_seqs=max_num_seqs,
        dtype=profile.dtype if profile and profile.dtype else resolve_dtype(spec.model.dtype, spec.engine.device),
        cpu_threads_per_replica=chosen.cpu_threads_per_replica if chosen is not None and not gpu else None,
        gpu_memory_utilization=utilization,
        memory_per_replica_mib=memory_per_replica,
        kv_cache_memory_bytes=kv_bytes,
        mps_active_thread_percentage=threads,
        mps_pinned_memory_limit_mib=pinned,
        predicted_throughput_tokens_per_s=throughput,
        predicted_p99_itl_ms=p99_itl,
        energy_per_token_joules=energy,
        explanation="; ".join(reasons) + ".",
    )
