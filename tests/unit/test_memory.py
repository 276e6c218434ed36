"""The per-replica memory model against numbers published for real models."""

import pytest

from slmpack.core.memory import feasible_replicas, footprint_from_hf_config, kv_cache_mib, replica_memory_mib

# The relevant keys of the published config.json files.
SMOLLM2_135M = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "hidden_size": 576, "head_dim": 64}
LLAMA_31_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "hidden_size": 4096}  # no head_dim: hidden_size / heads = 128
H100_MIB = 81559  # what nvidia-smi reports for an 80 GB H100


def test_llama_8b_holds_128_kib_of_kv_per_token():
    # 2 (K and V) x 32 layers x 8 KV heads x 128 dims x 2 bytes: the well-known 128 KiB per token.
    footprint = footprint_from_hf_config(LLAMA_31_8B, parameters=8_030_261_248)
    assert footprint.kv_bytes_per_token == 128 * 1024
    assert footprint.weights_mib == 15317  # 8.03e9 parameters x 2 bytes


def test_grouped_query_attention_counts_kv_heads_not_query_heads():
    footprint = footprint_from_hf_config(SMOLLM2_135M, parameters=134_515_008)
    assert footprint.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    without_gqa = footprint_from_hf_config({**SMOLLM2_135M, "num_key_value_heads": None}, parameters=134_515_008)
    assert without_gqa.kv_bytes_per_token == 3 * footprint.kv_bytes_per_token


def test_float32_doubles_weights_and_kv():
    half = footprint_from_hf_config(SMOLLM2_135M, parameters=134_515_008, dtype="bfloat16")
    full = footprint_from_hf_config(SMOLLM2_135M, parameters=134_515_008, dtype="float32")
    assert full.kv_bytes_per_token == 2 * half.kv_bytes_per_token
    assert full.weights_mib in (2 * half.weights_mib - 1, 2 * half.weights_mib)


def test_kv_cache_grows_with_batch_and_length():
    footprint = footprint_from_hf_config(LLAMA_31_8B, parameters=8_030_261_248)
    assert kv_cache_mib(footprint, batch_size=64, tokens_per_sequence=2048) == 16384  # 64 x 2048 x 128 KiB
    assert kv_cache_mib(footprint, batch_size=1, tokens_per_sequence=1) == 1  # rounded up, never 0


def test_llama_8b_at_batch_64_fits_twice_on_an_h100():
    footprint = footprint_from_hf_config(LLAMA_31_8B, parameters=8_030_261_248, overhead_mib=1024)
    need = replica_memory_mib(footprint, batch_size=64, tokens_per_sequence=2048)
    assert need == 15317 + 16384 + 1024
    assert feasible_replicas(footprint, H100_MIB, batch_size=64, tokens_per_sequence=2048) == 2  # 73403 // 32725


def test_a_small_model_fits_many_times_and_the_budget_caps_it():
    footprint = footprint_from_hf_config(SMOLLM2_135M, parameters=134_515_008)
    k = feasible_replicas(footprint, H100_MIB, batch_size=32, tokens_per_sequence=1024)
    need = replica_memory_mib(footprint, batch_size=32, tokens_per_sequence=1024)
    assert k == int(H100_MIB * 0.9 // need)
    assert k * need <= H100_MIB * 0.9 < (k + 1) * need


def test_a_model_larger_than_the_gpu_gives_zero_replicas():
    footprint = footprint_from_hf_config(LLAMA_31_8B, parameters=8_030_261_248)
    assert feasible_replicas(footprint, gpu_memory_mib=16_000, batch_size=1, tokens_per_sequence=128) == 0


def test_an_unknown_dtype_is_refused():
    with pytest.raises(KeyError):
        footprint_from_hf_config(SMOLLM2_135M, parameters=1, dtype="int3")
