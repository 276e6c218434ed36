"""An engine pins CUDA to the GPUs its container was given: the plugin's MPS clients see every GPU of the node."""

import os
import subprocess
import sys

import pytest

from slmpack.adapters import gpu_devices
from slmpack.adapters.gpu_devices import device_minors, pinned_environment
from slmpack.api.models import SLMDeploymentSpec
from slmpack.core.gpu_pin import allocated_gpus
from slmpack.core.manifests import engine_command

A, B = "GPU-0b8e2c3a-1111-2222-3333-444455556666", "GPU-9f1d7e42-7777-8888-9999-aaaabbbbcccc"


def test_the_uuids_the_plugin_names_are_pinned_as_they_are():
    pin = allocated_gpus({"NVIDIA_VISIBLE_DEVICES": B}, set(), {})
    assert pin.devices == B and "NVIDIA_VISIBLE_DEVICES" in pin.reason
    assert allocated_gpus({"NVIDIA_VISIBLE_DEVICES": f"{A},{B}"}, set(), {}).devices == f"{A},{B}"


def test_under_cdi_the_device_nodes_name_the_gpus_through_nvml():
    # The toolkit's CDI spec sets NVIDIA_VISIBLE_DEVICES=void for every container and injects /dev/nvidia<minor>.
    pin = allocated_gpus({"NVIDIA_VISIBLE_DEVICES": "void"}, {3}, {0: A, 3: B})
    assert pin.devices == B and "/dev/nvidia3" in pin.reason


def test_a_users_cuda_visible_devices_is_kept():
    pin = allocated_gpus({"CUDA_VISIBLE_DEVICES": "1", "NVIDIA_VISIBLE_DEVICES": A}, set(), {})
    assert pin.devices is None and "kept" in pin.reason


@pytest.mark.parametrize("env, minors, nvml, why", [
    ({"NVIDIA_VISIBLE_DEVICES": "0,1"}, set(), {}, "'0,1' names no GPU by UUID"),
    ({"NVIDIA_VISIBLE_DEVICES": "all"}, set(), {}, "no /dev/nvidia<minor>"),
    ({}, {2}, {0: A}, "NVML names no GPU for the device nodes (minors [2])"),
])
def test_nothing_that_names_a_gpu_leaves_the_engine_unpinned_and_says_why(env, minors, nvml, why):
    pin = allocated_gpus(env, minors, nvml)
    assert pin.devices is None and why in pin.reason and pin.reason.startswith("not pinned")


def test_only_numbered_gpu_nodes_count(tmp_path):
    for name in ("nvidia0", "nvidia7", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "null"):
        (tmp_path / name).touch()
    (tmp_path / "nvidia-caps").mkdir()
    assert device_minors(tmp_path) == {0, 7}
    assert device_minors(tmp_path / "absent") == set()


def test_the_environment_is_pinned_from_the_nodes_nvml_maps(tmp_path, monkeypatch):
    (tmp_path / "nvidia1").touch()
    monkeypatch.setattr(gpu_devices, "uuid_by_minor", lambda: {0: A, 1: B})
    env, pin = pinned_environment({"NVIDIA_VISIBLE_DEVICES": "void", "PATH": "/bin"}, dev=tmp_path)
    assert env == {"NVIDIA_VISIBLE_DEVICES": "void", "PATH": "/bin", "CUDA_VISIBLE_DEVICES": B}


def test_slmpack_engine_runs_the_command_pinned():
    env = {**os.environ, "NVIDIA_VISIBLE_DEVICES": B}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    shown = subprocess.run([sys.executable, "-m", "slmpack.cli", "engine", "--", sys.executable, "-c",
                            "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"],
                           env=env, capture_output=True, text=True, timeout=60, check=True)
    assert shown.stdout.strip() == B
    assert "the GPUs NVIDIA_VISIBLE_DEVICES names" in shown.stderr


def test_gpu_replicas_start_through_the_pin_and_cpu_replicas_do_not():
    gpu = SLMDeploymentSpec.model_validate({"model": {"name": "m"}})
    cpu = SLMDeploymentSpec.model_validate({"model": {"name": "m"}, "engine": {"device": "cpu"}})
    assert engine_command(gpu)[:3] == ["slmpack", "engine", "--"]
    assert engine_command(cpu) == ["python3", "-m", "vllm.entrypoints.openai.api_server"]


def test_the_profiler_measures_only_the_replicas_whose_slots_are_on_its_gpu():
    from slmpack.core.gpu_pin import profiling_slots

    assert profiling_slots(A, [A, A], 3) == (3, f"held 3 slot(s), all on {A}")
    kmax, said = profiling_slots(A, [B, A], 3)
    assert kmax == 2 and f"1 of them on another GPU ({B})" in said and f"up to 2 replica(s) on {A}" in said
    # Under CDI no container sees which GPU it holds: measured as asked, and said to be unverified.
    kmax, said = profiling_slots("void", ["void"], 2)
    assert kmax == 2 and "not verified" in said
    assert profiling_slots(A, [None], 2)[0] == 2
