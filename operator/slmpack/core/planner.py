"""The planner: a measured profile, the GPU and the spec in; replicas per GPU and engine settings out (pure).

- Replicas: the measured replica count with the highest aggregate throughput within the
  latency SLO, capped by what the memory model says fits and by the sharing slots the
  node advertises. A fixed `spec.replicas` overrides the measurement.
- `--max-num-seqs` is the knee batch; `--gpu-memory-utilization` is 0.9/N, so the N
  replicas together claim what one replica would by default.
- Under MPS each replica gets an equal share of the SMs (active thread percentage) and a
  pinned device-memory limit equal to its memory budget, so one replica cannot starve or
  crowd out the others.
- On CPU (development clusters) the KV cache is `VLLM_CPU_KVCACHE_SPACE` per replica.
"""

from __future__ import annotations

import math

from slmpack.api.models import (
    Device,
    LatencySLO,
    Plan,
    ReplicationPoint,
    Sharing,
    SLMDeploymentSpec,
    SLMProfileStatus,
)
from slmpack.core.memory import GPU_BUDGET_FRACTION, feasible_replicas

# vLLM's own default for --max-num-seqs, used when no knee is known (fixed replicas, no profile).
VLLM_DEFAULT_MAX_NUM_SEQS = 256


def within_slo(point: ReplicationPoint, slo: LatencySLO) -> bool:
    if point.error is not None or not point.aggregate_throughput_tokens_per_s:
        return False
    if slo.p99_itl_ms and point.p99_itl_ms and point.p99_itl_ms > slo.p99_itl_ms:
        return False
    return not (slo.p99_ttft_ms and point.p99_ttft_ms and point.p99_ttft_ms > slo.p99_ttft_ms)


def best_measured(profile: SLMProfileStatus, slo: LatencySLO) -> ReplicationPoint | None:
    candidates = [p for p in profile.replication if within_slo(p, slo)]
    return max(candidates, key=lambda p: p.aggregate_throughput_tokens_per_s, default=None)


def plan(spec: SLMDeploymentSpec, profile: SLMProfileStatus | None, gpu_memory_mib: int | None = None,
         sharing_slots: int | None = None) -> Plan:
    """Decide replicas per GPU and per-replica settings.

    `gpu_memory_mib` is the GPU's memory (the node's nvidia.com/gpu.memory label);
    `sharing_slots` is how many pods may share it (nvidia.com/gpu.replicas).
    """
    knee = profile.knee.batch_size if profile and profile.knee else None
    tokens_per_sequence = spec.profiling.workload.input_tokens + spec.profiling.workload.output_tokens
    reasons: list[str] = []
    measured = best_measured(profile, spec.profiling.slo) if profile else None

    if spec.replicas != "auto":
        replicas = spec.replicas
        reasons.append(f"{replicas} replicas fixed by spec.replicas")
    elif measured is not None:
        replicas = measured.replicas
        reasons.append(f"{replicas} replicas gave the highest measured aggregate throughput "
                       f"({measured.aggregate_throughput_tokens_per_s:.0f} tok/s) within the SLO")
    else:
        replicas = profile.recommended_replicas if profile and profile.recommended_replicas else 1
        reasons.append(f"{replicas} replica(s): no replication measurement within the SLO")

    if spec.replicas == "auto":
        if profile and profile.memory and gpu_memory_mib and knee and spec.engine.device == Device.gpu:
            fits = feasible_replicas(profile.memory, gpu_memory_mib, knee, tokens_per_sequence)
            if fits < replicas:
                replicas = max(fits, 1)
                reasons.append(f"capped at {replicas} by memory: each replica needs weights + KV for "
                               f"{knee} x {tokens_per_sequence} tokens")
        if sharing_slots and sharing_slots < replicas:
            replicas = sharing_slots
            reasons.append(f"capped at {replicas} by the GPU's {sharing_slots} sharing slots")

    max_num_seqs = knee or VLLM_DEFAULT_MAX_NUM_SEQS
    reasons.append(f"--max-num-seqs {max_num_seqs} " + ("at the knee" if knee else "(vLLM's default: no knee known)"))

    gpu = spec.engine.device == Device.gpu
    utilization = math.floor(GPU_BUDGET_FRACTION / replicas * 1000) / 1000 if gpu else None
    if gpu and gpu_memory_mib:
        memory_per_replica = int(gpu_memory_mib * utilization)
    elif not gpu:
        memory_per_replica = spec.engine.cpu_kv_cache_space_gib * 1024
    else:
        memory_per_replica = None
    mps = gpu and spec.sharing == Sharing.mps

    chosen = next((p for p in (profile.replication if profile else []) if p.replicas == replicas), None)
    if chosen is not None and chosen.error is None:
        throughput, p99_itl = chosen.aggregate_throughput_tokens_per_s, chosen.p99_itl_ms
        energy = chosen.energy_per_token_joules
    elif profile and profile.knee:
        # Not measured at this count: assume replicas add up, an optimistic bound.
        throughput = profile.knee.throughput_tokens_per_s * replicas if profile.knee.throughput_tokens_per_s else None
        p99_itl = profile.knee.p99_itl_ms
        energy = next((p.energy_per_token_joules for p in profile.points if p.batch_size == knee), None)
    else:
        throughput = p99_itl = energy = None

    return Plan(
        knee_batch_size=knee,
        replicas=replicas,
        max_num_seqs=max_num_seqs,
        gpu_memory_utilization=utilization,
        memory_per_replica_mib=memory_per_replica,
        mps_active_thread_percentage=math.ceil(100 / replicas) if mps else None,
        mps_pinned_memory_limit_mib=memory_per_replica if mps else None,
        predicted_throughput_tokens_per_s=throughput,
        predicted_p99_itl_ms=p99_itl,
        energy_per_token_joules=energy,
        explanation="; ".join(reasons) + ".",
    )
