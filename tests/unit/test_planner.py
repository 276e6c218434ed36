"""The planner, table-driven."""

import pytest

from slmpack.api.models import (
    Knee,
    MemoryFootprint,
    ReplicationPoint,
    SLMDeploymentSpec,
    SLMProfileStatus,
)
from slmpack.core.memory import CUDA_CONTEXT_MIB, footprint_from_hf_config, kv_cache_mib, start_utilization
from slmpack.core.planner import plan
from slmpack.core.validation import InvalidSpec

from .curves import load_curve

H100_MIB = 81559
OPT_1_3B = footprint_from_hf_config({"num_hidden_layers": 24, "num_attention_heads": 32, "hidden_size": 2048},
                                    1_300_000_000, "float16")


def spec(**overrides) -> SLMDeploymentSpec:
    return SLMDeploymentSpec.model_validate({"model": {"name": "facebook/opt-1.3b"}, **overrides})


def replication_point(k: int, mean: float, p99_itl_ms: float, batch: int = 64, spread: float = 0.01,
                      error: str | None = None) -> ReplicationPoint:
    """k replicas measured three times, the runs within ±spread of the mean."""
    runs = [mean * (1 - spread), mean, mean * (1 + spread)]
    return ReplicationPoint(replicas=k, batch_size_per_replica=batch, offered_concurrency=4 * 64,
                            runs_tokens_per_s=runs, aggregate_throughput_tokens_per_s=mean, p99_itl_ms=p99_itl_ms,
                            error=error)


def profile(knee=64, replication=((1, 9000, 30), (2, 11000, 40), (3, 12100, 55), (4, 12000, 80)),
            memory=OPT_1_3B) -> SLMProfileStatus:
    return SLMProfileStatus(
        knee=Knee(batch_size=knee, rule="bca", throughput_tokens_per_s=9000, p99_itl_ms=30),
        replication=[replication_point(k, t, itl, knee) for k, t, itl in replication],
        memory=memory)


def test_the_papers_case_a_1_3b_model_whose_knee_uses_a_sixth_of_kv_memory():
    # At the knee (64 sequences of 1024 tokens) the KV cache takes about 16 % of what one
    # replica at 0.9 utilization could hold on an 80 GB GPU, so four replicas fit easily.
    workload = {"workload": {"inputTokens": 512, "outputTokens": 512}}
    kv_room = H100_MIB * 0.9 - OPT_1_3B.weights_mib - OPT_1_3B.overhead_mib
    assert 0.14 < kv_cache_mib(OPT_1_3B, 64, 1024) / kv_room < 0.18
    result = plan(spec(profiling=workload, placement="dra"), profile(), H100_MIB, sharing_slots=8)
    assert result.replicas == 3  # 3 replicas measured best; 4 was slower
    assert result.max_num_seqs == 64
    # Under the claim's pinned limit of 0.3 of the GPU: the share less a headroom that holds a CUDA context,
    # so that vLLM starts whether CUDA reports the GPU or the limit (test_mps_memory.py).
    assert result.gpu_memory_utilization == start_utilization(H100_MIB, int(H100_MIB * 0.3), capped=True) == 0.277
    assert result.mps_active_thread_percentage == 34
    assert result.mps_pinned_memory_limit_mib == int(H100_MIB * 0.3)
    assert result.predicted_throughput_tokens_per_s == 12100
    assert "significant at 95%" in result.explanation


@pytest.mark.parametrize("overrides, profile_kwargs, gpu_mib, slots, replicas, reason", [
    ({"replicas": 2}, {}, H100_MIB, 8, 2, "fixed by spec.replicas"),
    ({"profiling": {"slo": {"p99ItlMs": 45}}}, {}, H100_MIB, 8, 2, "k=3: p99 ITL 55 ms exceeds the SLO 45 ms"),
    ({}, {"memory": MemoryFootprint(weights_mib=30000, kv_bytes_per_token=196608)}, H100_MIB, 8, 2,
     "capped at 2 by memory"),
    ({}, {}, H100_MIB, 2, 2, "capped at 2 by the GPU's 2 sharing slots"),
    ({}, {"replication": ()}, H100_MIB, 8, 1, "no k > 1 was measured"),
])
def test_replica_count(overrides, profile_kwargs, gpu_mib, slots, replicas, reason):
    result = plan(spec(**overrides), profile(**profile_kwargs), gpu_mib, slots)
    assert result.replicas == replicas
    assert reason in result.explanation


def test_memory_utilization_never_exceeds_0_9_over_n():
    for n in range(1, 9):
        result = plan(spec(replicas=n), profile(), H100_MIB)
        assert result.gpu_memory_utilization * n <= 0.9


def test_without_a_profile_fixed_replicas_use_vllms_default_batch():
    result = plan(spec(replicas=3), None)
    assert (result.replicas, result.max_num_seqs, result.knee_batch_size) == (3, 256, None)
    assert result.predicted_throughput_tokens_per_s is None


def test_cpu_device_sizes_the_kv_cache_instead_of_gpu_memory():
    result = plan(spec(engine={"device": "cpu", "cpuKvCacheSpaceGib": 2}, replicas=1), None, None)
    assert result.gpu_memory_utilization is None
    assert (result.memory_per_replica_mib, result.kv_cache_memory_bytes) == (2048, 2 * 2**30)
    assert result.mps_active_thread_percentage is None
    # Two replicas share the pack's space: the same KV cache in all, whatever the count.
    assert plan(spec(engine={"device": "cpu", "cpuKvCacheSpaceGib": 2}, replicas=2), None,
                None).kv_cache_memory_bytes == 2**30


def test_fixed_cpu_replicas_share_the_nodes_cores_and_kv_cache():
    # Without a profile two replicas once ran vLLM's defaults, each with threads on every core: 0.47x of one.
    one, two = (plan(spec(engine={"device": "cpu", "cpuKvCacheSpaceGib": 4}, replicas=n), None, None,
                     node_cpus=8) for n in (1, 2))
    assert (one.cpu_threads_per_replica, two.cpu_threads_per_replica) == (8, 4)
    assert (one.kv_cache_memory_bytes, two.kv_cache_memory_bytes) == (4 * 2**30, 2 * 2**30)


def test_time_slicing_sets_no_mps_limits():
    result = plan(spec(sharing="time-slicing"), profile(), H100_MIB)
    assert result.mps_active_thread_percentage is None and result.mps_pinned_memory_limit_mib is None


def test_mps_asked_for_on_a_node_without_mps_claims_no_mps_limits():
    # A node that does not share its GPUs serves the spec with one replica on a whole GPU, no MPS.
    result = plan(spec(replicas=1), profile(), H100_MIB, sharing_slots=1, plugin_mps=False)
    assert result.mps_active_thread_percentage is None and result.mps_pinned_memory_limit_mib is None


def test_failed_replication_points_are_never_chosen():
    prof = profile()
    prof.replication.append(replication_point(5, 99999, 30, error="OOM"))
    assert plan(spec(), prof, H100_MIB, 8).replicas == 3


SMOLLM2_360M = MemoryFootprint(weights_mib=690, kv_bytes_per_token=81920, overhead_mib=1536)


@pytest.mark.parametrize("slots", [1, 2, 4, 7])
def test_under_plugin_mps_each_replica_fits_the_daemons_memory_over_r_limit(slots):
    # The device plugin's MPS daemon pins each client at memory/R and 100/R % of the SMs.
    result = plan(spec(model={"name": "m", "maxModelLen": 4096}), profile(memory=SMOLLM2_360M), H100_MIB,
                  sharing_slots=slots, plugin_mps=True)
    limit = H100_MIB // slots
    assert result.mps_pinned_memory_limit_mib == limit == result.memory_per_replica_mib
    assert result.mps_active_thread_percentage == 100 // slots
    # vLLM refuses to start unless utilization x total is free: never ask for more than the limit.
    assert result.gpu_memory_utilization * H100_MIB < limit
    headroom = max(256, -(-limit * 5 // 100)) + CUDA_CONTEXT_MIB  # a client's context may come out of its free
    assert result.kv_cache_memory_bytes == (limit - 690 - 1536 - headroom) * 1024 * 1024


def test_under_plugin_mps_fewer_replicas_than_slots_is_explained():
    result = plan(spec(replicas=2), profile(memory=SMOLLM2_360M), H100_MIB, sharing_slots=4, plugin_mps=True)
    assert result.replicas == 2
    assert "2 of the GPU's 4 MPS slots used" in result.explanation and "2 slot(s) stay idle" in result.explanation


def test_without_mps_the_kv_cache_is_the_share_less_weights_overhead_and_headroom():
    result = plan(spec(sharing="time-slicing", replicas=3), profile(memory=SMOLLM2_360M), H100_MIB, sharing_slots=4)
    share = int(H100_MIB * 0.3)
    assert result.memory_per_replica_mib == share
    assert result.kv_cache_memory_bytes == (share - 690 - 1536 - max(256, -(-share * 5 // 100))) * 1024 * 1024
    assert result.mps_pinned_memory_limit_mib is None


def test_a_model_that_cannot_hold_one_sequence_in_its_share_is_refused():
    big = MemoryFootprint(weights_mib=15317, kv_bytes_per_token=128 * 1024, overhead_mib=2048)
    with pytest.raises(InvalidSpec, match=r"^spec.model: 15317 MiB of weights .* do not fit one replica's 11651 MiB"):
        plan(spec(replicas=7), profile(memory=big), H100_MIB, sharing_slots=7, plugin_mps=True)


def test_without_a_memory_model_no_kv_bytes_are_set():
    assert plan(spec(replicas=2), None, H100_MIB, 4, plugin_mps=True).kv_cache_memory_bytes is None


def test_a_gain_within_the_noise_plans_one_replica_and_says_why():
    # Two replicas average 4 % more, but their runs spread ±10 %: chance explains it.
    noisy = profile(replication=((1, 9000, 30), (2, 9360, 40)))
    noisy.replication[1] = replication_point(2, 9360, 40, spread=0.10)
    result = plan(spec(), noisy, H100_MIB, 8)
    assert result.replicas == 1
    assert "not significant at 95%" in result.explanation
    assert "1.04x" in result.explanation and "3 vs 3 runs" in result.explanation


def test_one_measured_run_per_count_is_no_evidence_for_packing():
    single_runs = profile()
    for point in single_runs.replication:
        point.runs_tokens_per_s = point.runs_tokens_per_s[1:2]
    assert plan(spec(), single_runs, H100_MIB, 8).replicas == 1


def test_every_replica_runs_the_knee_and_the_prediction_is_the_point_measured_there():
    measured = profile(replication=((1, 9000, 30), (2, 12000, 40)))
    result = plan(spec(), measured, H100_MIB, 8)
    assert (result.replicas, result.max_num_seqs, result.knee_batch_size) == (2, 64, 64)
    assert (result.predicted_throughput_tokens_per_s, result.predicted_p99_itl_ms) == (12000, 40)


def test_counts_compared_at_another_batch_than_the_knee_do_not_decide():
    # k = 1 run at 128 (kmax x knee) against k = 2 at 64 each: not the knee that runs, so no evidence for it.
    measured = profile(replication=((1, 9000, 30), (2, 12000, 40)))
    measured.replication[0].batch_size_per_replica = 128
    result = plan(spec(), measured, H100_MIB, 8)
    assert (result.replicas, result.max_num_seqs) == (1, 64)
    assert "one replica was not measured at this batch" in result.explanation


def test_a_plan_whose_measured_latency_breaks_the_slo_says_so():
    measured = profile(replication=((1, 9000, 30), (2, 12000, 790)))
    result = plan(spec(profiling={"slo": {"p99ItlMs": 600}}), measured, H100_MIB, 8)
    # k = 2 breaks the SLO, so one replica at the knee, whose measured point meets it.
    assert result.replicas == 1 and result.slo_miss is None
    fixed = plan(spec(profiling={"slo": {"p99ItlMs": 600}}), profile(knee=64, replication=((1, 9000, 788),)),
                 H100_MIB, 8)
    assert fixed.slo_miss and "788 ms" in fixed.slo_miss and "600 ms" in fixed.slo_miss


def test_two_slos_share_one_profile_and_get_different_plans():
    raw = SLMProfileStatus(points=load_curve("qwen2.5-0.5b-h100"),
                           replication=[replication_point(1, 9000, 30, batch=96),
                                        replication_point(2, 12000, 60, batch=96)])
    relaxed = plan(spec(), raw, H100_MIB, 8)
    strict = plan(spec(profiling={"slo": {"p99ItlMs": 20}}), raw, H100_MIB, 8)
    assert (relaxed.replicas, relaxed.max_num_seqs) == (2, 96) and strict.replicas == 1
    # The strict SLO also moves the knee, recomputed from the raw curve, to a smaller batch, where the counts
    # were not compared.
    assert strict.knee_batch_size < relaxed.knee_batch_size
    assert strict.max_num_seqs == strict.knee_batch_size
    assert "not at this deployment's knee" in strict.explanation


def test_cpu_auto_dtype_is_float32_without_bf16_and_the_profiled_dtype_wins():
    assert plan(spec(engine={"device": "cpu"}), None).dtype == "float32"
    measured = profile()
    measured.dtype = "bfloat16"
    assert plan(spec(engine={"device": "cpu"}), measured).dtype == "bfloat16"
    assert plan(spec(), None).dtype == "auto"


def test_the_profile_key_follows_everything_that_changes_the_measurement_and_nothing_else():
    from slmpack.core.manifests import profile_conditions

    def key(gpu_mib=H100_MIB, slots=4, flags=(), **overrides):
        return profile_conditions(spec(**overrides), gpu_mib, slots, flags).key()

    base = key()
    changed = [key(engine={"image": "my/vllm:0.12"}), key(engine={"extraArgs": ["--enable-prefix-caching"]}),
               key(sharing="time-slicing"), key(slots=8), key(model={"name": "facebook/opt-1.3b", "revision": "v2"}),
               key(model={"name": "facebook/opt-1.3b", "dtype": "float16"}), key(gpu_mib=40960),
               key(profiling={"workload": {"inputTokens": 512}}), key(gpu={"product": "NVIDIA-A100-SXM4-40GB"})]
    assert base not in changed and len(set(changed)) == len(changed)
    # The SLO and the knee rule are applied at plan time, so they share the profile.
    assert key(profiling={"slo": {"p99ItlMs": 20}, "rule": "kneedle"}) == base


def test_the_machine_record_names_the_cpu_and_the_vector_flags_a_cpu_engine_runs_on():
    from slmpack.core.hardware import cpu_flags_from_cpuinfo, cpuinfo_field, vector_flags

    epyc = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx2 fma\n\nprocessor\t: 1\n"
    assert cpuinfo_field(epyc, "model name") == "AMD EPYC 7B13"
    assert cpuinfo_field(epyc, "Hardware") is None
    assert vector_flags(cpu_flags_from_cpuinfo(epyc)) == "avx2"
    assert vector_flags({"avx512f", "avx512_bf16", "amx_tile", "avx2", "sse4_2"}) == "amx_tile,avx2,avx512_bf16,avx512f"
    assert vector_flags(cpu_flags_from_cpuinfo("Features\t: fp asimd\n")) == "none"  # an Arm CPU


def test_cpu_auto_dtype_resolves_from_the_cpu_flags_and_is_keyed():
    from slmpack.core.hardware import cpu_flags_from_cpuinfo, resolve_dtype
    from slmpack.core.manifests import profile_conditions

    epyc = cpu_flags_from_cpuinfo("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    sapphire = {"avx512f", "avx512_bf16", "amx_bf16"}
    assert resolve_dtype("auto", "cpu", epyc) == "float32"
    assert resolve_dtype("auto", "cpu", sapphire) == "bfloat16"
    assert resolve_dtype("auto", "gpu", epyc) == "auto"  # vLLM's choice on GPU
    assert resolve_dtype("bfloat16", "cpu", epyc) == "bfloat16"  # an explicit dtype is kept
    cpu = spec(engine={"device": "cpu"})
    assert profile_conditions(cpu, None, cpu_flags=epyc).dtype == "float32"
    assert profile_conditions(cpu, None, cpu_flags=epyc).key() != profile_conditions(cpu, None,
                                                                                   cpu_flags=sapphire).key()


def test_cpu_replicas_run_the_threads_the_profile_measured_for_their_count():
    from slmpack.core.manifests import Owner, build_statefulset

    measured = profile(replication=((1, 300, 30), (2, 480, 40)))
    for point in measured.replication:
        point.cpu_threads_per_replica = 2 // point.replicas
    cpu = spec(engine={"device": "cpu"})
    decided = plan(cpu, measured)
    assert (decided.replicas, decided.cpu_threads_per_replica) == (2, 1)
    owner = Owner(kind="SLMDeployment", name="smol", uid="u", namespace="ns")
    env = {e["name"]: e["value"] for e in
           build_statefulset(owner, cpu, decided, None)["spec"]["template"]["spec"]["containers"][0]["env"]}
    # Unbound threads, one per replica: vLLM's own binding would put both replicas on core 0.
    assert (env["VLLM_CPU_OMP_THREADS_BIND"], env["OMP_NUM_THREADS"]) == ("nobind", "1")
    args = build_statefulset(owner, cpu, decided, None)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--dtype") + 1] == "float32"  # auto resolved, never passed on to vLLM as auto


@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
def test_the_profilers_own_mps_daemon_gives_each_replica_the_caps_the_plan_deploys(replicas, tmp_path):
    from pathlib import Path

    from slmpack.profiler.engines import MpsDaemon, VllmEngine
    from slmpack.profiler.loadgen import Workload
    from slmpack.profiler.run import ProfileSettings, sharing_env

    settings = ProfileSettings(grid=[1, 64], adaptive=True, workload=Workload(128, 128), gpu_memory_mib=H100_MIB,
                               sharing="mps")
    engine = VllmEngine("facebook/opt-1.3b", device="gpu", log_dir=tmp_path)
    env, regime = sharing_env(engine, settings, replicas, MpsDaemon(Path("/run/mps"), Path("/run/mps-log")))
    # The caps a DRA claim's MPS daemon gives the pack it deploys.
    deployed = plan(spec(replicas=replicas, placement="dra"), profile(), H100_MIB)
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == str(deployed.mps_active_thread_percentage)
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={deployed.mps_pinned_memory_limit_mib}M"
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/run/mps" and "profiler's MPS daemon" in regime
    # Under the device plugin's MPS the pod is already a client with 1/R caps: no second daemon, no caps of ours.
    env, regime = sharing_env(engine, settings, replicas, None)
    assert env == {} and "device plugin's MPS daemon" in regime
    # A DRA claim's daemon (its pipe directory set by the driver) applies no limits while profiling: each client
    # carries the caps that a k-replica pack's claim sets as its daemon's defaults.
    settings.placement = "dra"
    env, regime = sharing_env(engine, settings, replicas, None)
    assert env == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(deployed.mps_active_thread_percentage),
                   "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={deployed.mps_pinned_memory_limit_mib}M"}
    assert "DRA claim's MPS daemon" in regime
    settings.sharing = "time-slicing"
    assert sharing_env(engine, settings, replicas, None) == ({}, "time-slicing: co-located processes without MPS")
    settings.sharing = "none"
    assert sharing_env(engine, settings, replicas, None) == ({}, "none: one engine on a GPU of its own")


def test_every_replica_count_shares_the_same_cores():
    from slmpack.core.hardware import cpu_threads_per_replica

    # One replica gets both cores of a 2-core node, two get one each: never two threads against one.
    assert [cpu_threads_per_replica(k, 2) for k in (1, 2, 3)] == [2, 1, 1]
    assert [cpu_threads_per_replica(k, 16) for k in (1, 2, 4)] == [16, 8, 4]


def test_more_minimum_than_maximum_repeats_is_refused_naming_both_fields():
    from slmpack.core.validation import spec_problems

    problems = spec_problems(spec(profiling={"minRepeats": 6, "maxRepeats": 5}))
    assert problems == ["spec.profiling.minRepeats (6) is larger than maxRepeats (5): lower minRepeats or raise "
                        "maxRepeats"]
