"""The planner: a measured profile, the GPU and the spec in; replicas per GPU and engine settings out (pure).

- Replicas and knee: recomputed from the profile's raw curve and runs with this
  deployment's knee rule, SLO and confidence (`core/replication.py`): k > 1 only when its
  gain over one replica at the same load is significant. Capped by what the memory model
  says fits and by the sharing slots the node advertises. A fixed `spec.replicas`
  overrides the measurement.
  Under the device plugin's MPS the count stays within the R slots per GPU, and the status
  says why when it is fewer.
- `--max-num-seqs` is the knee under this deployment's SLO: the batch every replica count
  was compared at. The predicted throughput and p99 ITL are the ones measured in that
  configuration; when they break the SLO the plan says so (`slo_miss`).
- Every replica count gets the same budget: on CPU the node's cores as OpenMP threads
  (cores / N each) and the pack's KV-cache space (1/N each, `--kv-cache-memory-bytes`),
  whether N was measured or fixed by `spec.replicas`.
- Memory, one share per replica: under the device plugin's MPS the daemon pins every client
  at memory/R (and 100/R % of the SMs), so the share is memory/R whatever N is; otherwise
  (time-slicing, no sharing, DRA) it is 0.9 x memory / N. With a memory model the KV cache is
  fixed in bytes, `--kv-cache-memory-bytes` = share - weights - overhead - headroom, so no
  replica depends on what its neighbours hold when it starts; `--gpu-memory-utilization`
  never asks for more than the share, and under an MPS cap the share less the headroom, so
  that vLLM's start check passes whether CUDA reports the whole GPU or the cap
  (`core/memory.py` `start_utilization`).
- Under DRA's MPS, and under a pack pod's own MPS daemon, each replica gets an equal share of the
  SMs and a pinned limit equal to its share, so one replica cannot starve or crowd out the others.
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
from slmpack.core.hardware import cpu_kv_cache_bytes, cpu_threads_per_replica, resolve_dtype
from slmpack.core.memory import (
    GPU_BUDGET_FRACTION,
    MIB,
    feasible_replicas,
    headroom_mib,
    kv_cache_budget_mib,
    mps_client_limit_mib,
    start_utilization,
)
from slmpack.core.replication import choose
from slmpack.core.validation import InvalidSpec

# vLLM's own default for --max-num-seqs, used when no knee is known (fixed replicas, no profile).
VLLM_DEFAULT_MAX_NUM_SEQS = 256


def kv_cache_bytes(spec: SLMDeploymentSpec, footprint: MemoryFootprint, share_mib: int, capped: bool = False) -> int:
    """One replica's KV cache in bytes, for vLLM's --kv-cache-memory-bytes; InvalidSpec when it cannot
    hold one sequence of spec.model.maxModelLen tokens (vLLM refuses to start then). `capped`: the share is
    an MPS pinned-memory cap, under which the headroom also holds a CUDA context."""
    kv_mib = kv_cache_budget_mib(footprint, share_mib, capped)
    longest_mib = math.ceil(footprint.kv_bytes_per_token * spec.model.max_model_len / MIB)
    if kv_mib < longest_mib:
        raise InvalidSpec(
            f"spec.model: {footprint.weights_mib} MiB of weights + {footprint.overhead_mib} MiB overhead + "
            f"{headroom_mib(share_mib, capped)} MiB headroom + {longest_mib} MiB of KV cache for one "
            f"{spec.model.max_model_len}-token sequence do not fit one replica's {share_mib} MiB share of the GPU: "
            "lower spec.model.maxModelLen or spec.replicas, or use nodes with fewer sharing replicas "
            "(nvidia.com/gpu.replicas) or more GPU memory")
    return kv_mib * MIB


def plan(spec: SLMDeploymentSpec, profile: SLMProfileStatus | None, gpu_memory_mib: int | None = None,
         sharing_slots: int | None = None, plugin_mps: bool = False, node_cpus: int | None = None) -> Plan:
    """Decide replicas per GPU and per-replica settings.

    `gpu_memory_mib` is the GPU's memory (the node's nvidia.com/gpu.memory label);
    `sharing_slots` is how many pods may share it (nvidia.com/gpu.replicas, R);
    `plugin_mps` says the device plugin's MPS daemon caps every client at 1/R;
    `node_cpus` is the node's allocatable CPUs, shared out on CPU when no profile measured the threads.
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

    max_num_seqs = knee or VLLM_DEFAULT_MAX_NUM_SEQS
    reasons.append(f"--max-num-seqs {max_num_seqs} " + ("at the knee" if knee else "(vLLM's default: no knee known)"))

    mps = gpu and spec.sharing == Sharing.mps
    utilization = memory_per_replica = pinned = sm_percent = kv_bytes = None
    if gpu and plugin_mps and gpu_memory_mib:
        # The daemon's defaults, which the replicas get whatever they ask for.
        pinned = mps_client_limit_mib(gpu_memory_mib, slots)
        sm_percent = 100 // slots
        memory_per_replica = pinned
        utilization = start_utilization(gpu_memory_mib, pinned, capped=True)
        reasons.append(f"each replica fits under the MPS limit of {pinned} MiB (memory/{slots}) with "
                       f"{headroom_mib(pinned, capped=True)} MiB headroom")
    elif gpu:
        share = math.floor(GPU_BUDGET_FRACTION / replicas * 1000) / 1000
        utilization = share
        memory_per_replica = int(gpu_memory_mib * share) if gpu_memory_mib else None
        if mps and spec.placement in (Placement.dra, Placement.pack_pod):
            # The claim's daemon, or the pack pod's own, gives each client these limits.
            sm_percent, pinned = math.ceil(100 / replicas), memory_per_replica
            if pinned:  # a client under a pinned cap may read the cap as its total or free memory
                utilization = start_utilization(gpu_memory_mib, pinned, capped=True)
    else:
        kv_bytes = cpu_kv_cache_bytes(replicas, spec.engine.cpu_kv_cache_space_gib)
        memory_per_replica = kv_bytes // MIB
    if gpu and profile and profile.memory and memory_per_replica:
        kv_bytes = kv_cache_bytes(spec, profile.memory, memory_per_replica, capped=pinned is not None)
        reasons.append(f"--kv-cache-memory-bytes {kv_bytes} (share - weights - overhead - headroom)")

    # The point measured in this configuration: this count at this knee, or one replica's sweep probe at it.
    chosen = next((p for p in (profile.replication if profile else []) if p.replicas == replicas
                   and p.batch_size_per_replica == knee and p.error is None), None)
    probe = next((p for p in (profile.points if profile else []) if p.batch_size == knee and p.error is None), None)
    threads = None
    if not gpu:
        cores = chosen.cpu_threads_per_replica * replicas if chosen and chosen.cpu_threads_per_replica else node_cpus
        threads = cpu_threads_per_replica(replicas, cores) if cores else None
        reasons.append(f"{threads or 'OpenMP default'} thread(s) and {kv_bytes // MIB} MiB of KV cache per "
                       "replica: the node's share for each of " + f"{replicas}")
    throughput = p99_itl = energy = None
    if chosen is not None:
        throughput, p99_itl = chosen.aggregate_throughput_tokens_per_s, chosen.p99_itl_ms
        energy = chosen.energy_per_token_joules
    elif replicas == 1 and probe is not None:
        throughput, energy = probe.output_throughput_tokens_per_s, probe.energy_per_token_joules
        p99_itl = probe.itl_ms.p99 if probe.itl_ms else None
    elif knee:
        reasons.append(f"{replicas} replicas at batch {knee} were not measured, so no throughput is predicted")
    slo = spec.profiling.slo
    slo_miss = None
    if slo.p99_itl_ms and p99_itl and p99_itl > slo.p99_itl_ms:
        slo_miss = (f"the measured p99 ITL of {p99_itl:.0f} ms at {replicas} replica(s) of batch {max_num_seqs} "
                    f"exceeds the SLO of {slo.p99_itl_ms} ms")
    elif choice and choice.knee and not choice.knee.slo_met:
        slo_miss = choice.knee.reason

    return Plan(
        knee_batch_size=knee,
        replicas=replicas,
        max_num_seqs=max_num_seqs,
        dtype=profile.dtype if profile and profile.dtype else resolve_dtype(spec.model.dtype, spec.engine.device),
        cpu_threads_per_replica=threads,
        gpu_memory_utilization=utilization,
        memory_per_replica_mib=memory_per_replica,
        kv_cache_memory_bytes=kv_bytes,
        mps_active_thread_percentage=sm_percent,
        mps_pinned_memory_limit_mib=pinned,
        predicted_throughput_tokens_per_s=throughput,
        predicted_p99_itl_ms=p99_itl,
        energy_per_token_joules=energy,
        slo_miss=slo_miss,
        explanation="; ".join(reasons) + ".",
    )
