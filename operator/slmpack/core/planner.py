"""The planner: a measured profile, the GPU and the spec in; replicas per GPU and engine settings out (pure).

- Replicas and knee: recomputed from the profile's raw curve and runs with this
  deployment's knee rule, SLO and confidence (`core/replication.py`): k > 1 only when its
  gain over one replica at the same load is significant. Capped by what the memory model
  says fits and by the sharing slots the node advertises. A fixed `spec.replicas`
  overrides the measurement.
- `--max-num-seqs` is the batch per replica that was measured for the chosen count (the
  knee when it was not measured); `--gpu-memory-utilization` is 0.9/N, so the N
  replicas together claim what one replica would by default.
- Under MPS each replica gets an equal share of the SMs (active thread percentage) and a
  pinned device-memory limit equal to its memory budget, so one replica cannot starve or
  crowd out the others.
- On CPU (development clusters) the KV cache is `VLLM_CPU_KVCACHE_SPACE` per replica.
"""

from __future__ import annotations

import math

from slmpack.api.models import Device, Placement, Plan, Sharing, SLMDeploymentSpec, SLMProfileStatus
from slmpack.core.hardware import resolve_dtype
from slmpack.core.memory import GPU_BUDGET_FRACTION, feasible_replicas
from slmpack.core.replication import choose

# vLLM's own default for --max-num-seqs, used when no knee is known (fixed replicas, no profile).
VLLM_DEFAULT_MAX_NUM_SEQS = 256


def plan(spec: SLMDeploymentSpec, profile: SLMProfileStatus | None, gpu_memory_mib: int | None = None,
         sharing_slots: int | None = None) -> Plan:
    """Decide replicas per GPU and per-replica settings.

    `gpu_memory_mib` is the GPU's memory (the node's nvidia.com/gpu.memory label);
    `sharing_slots` is how many pods may share it (nvidia.com/gpu.replicas).
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

    if (spec.engine.device == Device.gpu and spec.sharing == Sharing.mps and spec.placement == Placement.device_plugin
            and sharing_slots and replicas < sharing_slots):
        # The plugin's MPS caps every client at 1/R whatever N is; the profile measured the same caps.
        reasons.append(f"{replicas} of the GPU's {sharing_slots} MPS slots used: the device plugin caps each replica "
                       f"at 1/{sharing_slots} of the SMs and memory, so the unused slots stay free for other pods")
    measured_batch = choice.max_num_seqs if choice and choice.measured and choice.measured.replicas == replicas \
        else None
    max_num_seqs = measured_batch or knee or VLLM_DEFAULT_MAX_NUM_SEQS
    reasons.append(f"--max-num-seqs {max_num_seqs} " + (
        "as measured for this replica count" if measured_batch else
        "at the knee" if knee else "(vLLM's default: no knee known)"))

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
        mps_active_thread_percentage=math.ceil(100 / replicas) if mps else None,
        mps_pinned_memory_limit_mib=memory_per_replica if mps else None,
        predicted_throughput_tokens_per_s=throughput,
        predicted_p99_itl_ms=p99_itl,
        energy_per_token_joules=energy,
        explanation="; ".join(reasons) + ".",
    )
