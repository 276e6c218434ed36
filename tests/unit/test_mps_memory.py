"""Every engine the planner and the profiler size fits its MPS cap whatever CUDA reports under MPS.

Whether `cudaMemGetInfo` (torch.cuda.mem_get_info, which vLLM's start check reads) reports the
whole GPU or the pinned-memory cap as total under MPS is not settled, nor whether free is the GPU's
or the cap less the client's own context. These tests fake each reading and run vLLM's own check
(vllm/v1/worker/utils.py `request_memory`: refuse when free < ceil(total x utilization)).
"""

import json
import math
import struct

import pytest

from slmpack.api.models import MemoryFootprint, SLMDeploymentSpec
from slmpack.core.memory import CUDA_CONTEXT_MIB, MIB, headroom_mib, mps_client_limit_mib, start_utilization
from slmpack.core.planner import plan
from slmpack.core.validation import InvalidSpec
from slmpack.profiler.engines import EngineError
from slmpack.profiler.loadgen import Workload
from slmpack.profiler.run import ProfileSettings, gpu_engine_memory, model_footprint

# nvidia-smi's memory.total in MiB.
GPUS = {"T4": 15360, "L4": 23034, "A100-40GB": 40960, "H100-80GB": 81559, "H200": 143771}
# A CUDA context with PyTorch as nvidia-smi shows it on Ampere and Hopper.
CONTEXT_MIB = 600
SMOLLM2_360M = MemoryFootprint(weights_mib=690, kv_bytes_per_token=81920, overhead_mib=1536)


def vllm_starts(total_mib: float, free_mib: float, utilization: float) -> bool:
    return free_mib * MIB >= math.ceil(total_mib * MIB * utilization)


def readings(gpu_mib: int, cap_mib: int, neighbours_mib: int) -> dict[str, tuple[float, float]]:
    """(total, free) as CUDA might report them to an MPS client capped at `cap_mib`, whose neighbours hold
    `neighbours_mib` of the GPU."""
    return {
        "whole GPU": (gpu_mib, gpu_mib - neighbours_mib - CONTEXT_MIB),
        "the cap": (cap_mib, cap_mib - CONTEXT_MIB),
        "whole GPU as total, the cap less the context as free": (gpu_mib, cap_mib - CONTEXT_MIB),
    }


def assert_fits(gpu_mib: int, cap_mib: int, utilization: float, kv_bytes: int | None, neighbours_mib: int,
                footprint: MemoryFootprint = SMOLLM2_360M) -> None:
    for reading, (total, free) in readings(gpu_mib, cap_mib, neighbours_mib).items():
        assert vllm_starts(total, free, utilization), f"vLLM refuses to start when CUDA reports {reading}"
    assert kv_bytes is not None, "without KV bytes vLLM sizes its cache from a total it may misread"
    assert footprint.weights_mib + footprint.overhead_mib + kv_bytes / MIB + CUDA_CONTEXT_MIB <= cap_mib


def spec(**extra) -> SLMDeploymentSpec:
    return SLMDeploymentSpec.model_validate({"model": {"name": "m", "maxModelLen": 4096}, **extra})


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("slots", [1, 2, 4, 7, 8])
def test_planned_replicas_under_the_plugins_mps_start_under_every_reading(gpu, slots):
    from tests.unit.test_planner import profile

    total = GPUS[gpu]
    cap = mps_client_limit_mib(total, slots)
    longest_mib = math.ceil(SMOLLM2_360M.kv_bytes_per_token * 4096 / MIB)
    if 690 + 1536 + headroom_mib(cap, capped=True) + longest_mib > cap:  # small GPUs in 7-8 slices: refused
        with pytest.raises(InvalidSpec, match=f"do not fit one replica's {cap} MiB share"):
            plan(spec(replicas=slots), profile(memory=SMOLLM2_360M), total, sharing_slots=slots, plugin_mps=True)
        return
    result = plan(spec(replicas=slots), profile(memory=SMOLLM2_360M), total, sharing_slots=slots, plugin_mps=True)
    for started in range(slots):  # the last replica starts with every other one at its cap
        assert_fits(total, cap, result.gpu_memory_utilization, result.kv_cache_memory_bytes, started * cap)


@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 8])
def test_planned_replicas_under_a_dra_claims_pinned_limit_start_under_every_reading(replicas):
    total = GPUS["H100-80GB"]
    from tests.unit.test_planner import profile

    result = plan(spec(replicas=replicas, placement="dra"), profile(memory=SMOLLM2_360M), total)
    cap = result.mps_pinned_memory_limit_mib
    assert cap == result.memory_per_replica_mib
    for started in range(replicas):
        assert_fits(total, cap, result.gpu_memory_utilization, result.kv_cache_memory_bytes, started * cap)


def settings(**extra) -> ProfileSettings:
    return ProfileSettings(grid=[1, 2, 4], adaptive=True, workload=Workload(128, 128), **extra)


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("slots", [2, 4, 8])
def test_profiled_engines_under_the_plugins_mps_fit_the_plugins_cap_for_every_count(gpu, slots):
    # The sweep's engine (k = 1) and every count k <= R: each is a client of the plugin's daemon, capped at
    # memory/R whatever k is; the old 0.9/k share asked an H100 at R = 4 for 72 GiB under a 20 GiB cap.
    total = GPUS[gpu]
    profiled = settings(gpu_memory_mib=total, sharing="mps", sharing_slots=slots, max_replicas=slots)
    cap = mps_client_limit_mib(total, slots)
    if 690 + 1536 + headroom_mib(cap, capped=True) >= cap:  # a T4 or an L4 in 8 slices: no room for any KV
        with pytest.raises(EngineError, match=f"each has {cap} MiB"):
            gpu_engine_memory(profiled, 1, SMOLLM2_360M, own_mps=False)
        return
    for k in range(1, slots + 1):
        memory = gpu_engine_memory(profiled, k, SMOLLM2_360M, own_mps=False)
        assert memory.share_mib == cap
        assert_fits(total, cap, memory.utilization, memory.kv_bytes, (k - 1) * cap)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_profiled_engines_under_the_profilers_own_caps_fit_them(k):
    total = GPUS["L4"]
    memory = gpu_engine_memory(settings(gpu_memory_mib=total, sharing="mps", max_replicas=4), k, SMOLLM2_360M,
                               own_mps=True)
    assert memory.share_mib == int(total * math.floor(900 / k) / 1000)
    assert_fits(total, memory.share_mib, memory.utilization, memory.kv_bytes, (k - 1) * memory.share_mib)


def test_time_sliced_engines_keep_their_share_of_the_budget():
    memory = gpu_engine_memory(settings(gpu_memory_mib=GPUS["H100-80GB"], sharing="time-slicing"), 3,
                               SMOLLM2_360M, own_mps=False)
    assert memory.utilization == 0.3
    assert memory.kv_bytes == (memory.share_mib - 690 - 1536 - headroom_mib(memory.share_mib)) * MIB


def test_an_engine_that_cannot_fit_its_cap_fails_with_the_numbers():
    big = MemoryFootprint(weights_mib=15317, kv_bytes_per_token=128 * 1024, overhead_mib=2048)
    with pytest.raises(EngineError, match="each has 2879 MiB, less than the model's 15317 MiB of weights"):
        gpu_engine_memory(settings(gpu_memory_mib=GPUS["L4"], sharing="mps", sharing_slots=8), 1, big, False)


def test_the_headroom_holds_a_context_on_an_l4_with_four_slots():
    # The old 256 MiB floor left 288 MiB under a 5758 MiB cap: less than a context, so vLLM's check fails
    # where free is the cap less the client's own context.
    cap = mps_client_limit_mib(GPUS["L4"], 4)
    assert cap == 5758
    old_utilization = math.floor((cap - max(256, math.ceil(cap * 0.05))) / GPUS["L4"] * 1000) / 1000
    assert not vllm_starts(GPUS["L4"], cap - CONTEXT_MIB, old_utilization)
    assert headroom_mib(cap, capped=True) >= CONTEXT_MIB + 256
    assert vllm_starts(GPUS["L4"], cap - CONTEXT_MIB, start_utilization(GPUS["L4"], cap, capped=True))


# ---------------------------------------------------------------- the memory model of a Hugging Face model ID


def write_safetensors(path, tensors: dict[str, list[int]]) -> None:
    """A safetensors file (an 8-byte header length, a JSON header, the data) of bfloat16 zeros."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(offset))


def test_a_hugging_face_model_id_gets_its_memory_model_from_the_downloaded_snapshot(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # The Hub cache's layout (huggingface_hub file_download.py): refs/<revision> names the snapshot.
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    config = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}
    (snapshot / "config.json").write_text(json.dumps(config))
    write_safetensors(snapshot / "model.safetensors", {"embed": [1000, 64], "layer.0": [64, 64]})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    footprint = model_footprint("org/tiny", "bfloat16")
    assert footprint.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2
    assert footprint.weights_mib == 1  # 68096 parameters x 2 bytes, rounded up


def test_a_model_id_that_cannot_be_fetched_has_no_memory_model(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert model_footprint("org/absent", "auto") is None
