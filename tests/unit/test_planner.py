"""The planner, table-driven."""

import pytest

from slmpack.api.models import (
    Knee,
    MemoryFootprint,
    ReplicationPoint,
    SLMDeploymentSpec,
    SLMProfileStatus,
)
from slmpack.core.memory import footprint_from_hf_config, kv_cache_mib
from slmpack.core.planner import plan
from slmpack.core.validation import InvalidSpec

H100_MIB = 81559
OPT_1_3B = footprint_from_hf_config({"num_hidden_layers": 24, "num_attention_heads": 32, "hidden_size": 2048},
                                    1_300_000_000, "float16")


def spec(**overrides) -> SLMDeploymentSpec:
    return SLMDeploymentSpec.model_validate({"model": {"name": "facebook/opt-1.3b"}, **overrides})


def profile(knee=64, replication=((1, 9000, 30), (2, 11000, 40), (3, 12100, 55), (4, 12000, 80)),
            memory=OPT_1_3B) -> SLMProfileStatus:
    return SLMProfileStatus(
        knee=Knee(batch_size=knee, rule="bca", throughput_tokens_per_s=9000, p99_itl_ms=30),
        replication=[ReplicationPoint(replicas=k, batch_size_per_replica=knee, aggregate_throughput_tokens_per_s=t,
                                      p99_itl_ms=itl) for k, t, itl in replication],
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
    assert result.gpu_memory_utilization == 0.3
    assert result.mps_active_thread_percentage == 34
    assert result.mps_pinned_memory_limit_mib == int(H100_MIB * 0.3)
    assert result.predicted_throughput_tokens_per_s == 12100
    assert "highest measured aggregate throughput" in result.explanation


@pytest.mark.parametrize("overrides, profile_kwargs, gpu_mib, slots, replicas, reason", [
    ({"replicas": 2}, {}, H100_MIB, 8, 2, "fixed by spec.replicas"),
    ({"profiling": {"slo": {"p99ItlMs": 45}}}, {}, H100_MIB, 8, 2, "within the SLO"),
    ({}, {"memory": MemoryFootprint(weights_mib=30000, kv_bytes_per_token=196608)}, H100_MIB, 8, 2,
     "capped at 2 by memory"),
    ({}, {}, H100_MIB, 2, 2, "capped at 2 by the GPU's 2 sharing slots"),
    ({}, {"replication": ()}, H100_MIB, 8, 1, "no replication measurement"),
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
    result = plan(spec(engine={"device": "cpu", "cpuKvCacheSpaceGib": 2}), profile(), None)
    assert result.gpu_memory_utilization is None
    assert result.memory_per_replica_mib == 2048
    assert result.mps_active_thread_percentage is None


def test_time_slicing_sets_no_mps_limits():
    result = plan(spec(sharing="time-slicing"), profile(), H100_MIB)
    assert result.mps_active_thread_percentage is None and result.mps_pinned_memory_limit_mib is None


def test_mps_asked_for_on_a_node_without_mps_claims_no_mps_limits():
    # A node that does not share its GPUs serves the spec with one replica on a whole GPU, no MPS.
    result = plan(spec(replicas=1), profile(), H100_MIB, sharing_slots=1, plugin_mps=False)
    assert result.mps_active_thread_percentage is None and result.mps_pinned_memory_limit_mib is None


def test_failed_replication_points_are_never_chosen():
    prof = profile()
    prof.replication.append(ReplicationPoint(replicas=5, batch_size_per_replica=64,
                                             aggregate_throughput_tokens_per_s=99999, error="OOM"))
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
    headroom = max(256, -(-limit * 5 // 100))
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
