"""The profiler against the real vLLM CPU engine serving SmolLM2-135M-Instruct (minutes)."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from slmpack.api.models import Knee
from slmpack.core.replication import run_requests
from slmpack.profiler.engines import EngineError, VllmEngine
from slmpack.profiler.loadgen import Workload, closed_loop

pytestmark = pytest.mark.engine

# Read here, not through slmpack, so that the test checks the profiler's choice against the CPU itself.
CPU_FLAGS = next((set(line.split(":", 1)[1].split()) for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), set())


def test_closed_loop_streams_exactly_the_requested_tokens(vllm_cpu_server):
    results, duration = asyncio.run(closed_loop([vllm_cpu_server], concurrency=4, requests=8,
                                                workload=Workload(input_tokens=32, output_tokens=12)))
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.output_tokens for r in results] == [12] * 8
    assert all(0 < r.ttft_s <= r.e2e_s for r in results)
    assert all(len(r.token_gaps_s) >= 10 for r in results)
    assert duration > 0


def test_a_port_in_use_is_named(smollm2_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(EngineError, match=f"port {port} is in use"):
            VllmEngine(str(smollm2_model_dir), device="cpu").start(port, 4)


def test_an_engine_that_dies_while_starting_shows_its_log(tmp_path):
    with pytest.raises(EngineError, match="exited with code"):
        VllmEngine(str(tmp_path / "no-such-model"), device="cpu").start(18099, 4)


def test_profile_sweeps_adaptively_and_measures_two_replicas(smollm2_model_dir, tmp_path):
    out = tmp_path / "profile"
    done = subprocess.run(
        [sys.executable, "-m", "slmpack.cli", "profile", "--engine", "vllm", "--device", "cpu",
         "--model", str(smollm2_model_dir), "--max-model-len", "512", "--min-batch", "1", "--max-batch", "8",
         "--input-tokens", "32", "--output-tokens", "16", "--max-replicas", "2", "--precision-percent", "10",
         "--min-repeats", "3", "--max-repeats", "3", "--port-base", "18110", "--engine-arg=--enforce-eager",
         "--out", str(out)],
        # Eager engines start in seconds; compiled ones compile for minutes each on two cores.
        capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    batches = [p["batchSize"] for p in report["points"]]
    assert batches[0] == 1, batches
    assert report["knee"]["batchSize"] in batches
    assert report["sweep"]["mode"] == "adaptive" and report["sweep"]["probes"] == len(batches)
    # dtype auto: bfloat16 only where this CPU computes it natively, float32 otherwise.
    native_bf16 = any(f in CPU_FLAGS for f in ("avx512_bf16", "amx_bf16"))
    assert report["dtype"] == ("bfloat16" if native_bf16 else "float32"), sorted(CPU_FLAGS)
    # Probes stopped on their own interval (its width, or its side of BCA's bar): at least three windows each.
    assert all(p["throughputSpread"]["samples"] >= 3 for p in report["points"])
    assert {p["stoppedBy"] for p in report["points"]} <= {"precision", "verdict", "samples"}
    assert report["points"][0]["stoppedBy"] != "verdict"  # T(1) is the bar itself: it needs its precision
    # Both replica counts faced the same load, each run at least three times.
    replication = report["replication"]
    assert [r["replicas"] for r in replication] == [1, 2]
    # One replica was measured on the sweep's warm engine: one start for the sweep, one for the pair.
    assert len(report["sweep"]["engineStartSeconds"]) == 2
    assert len({r["offeredConcurrency"] for r in replication}) == 1
    # Every run of every count is the same length: two windows of the offered load, or 20 s at the knee's rate.
    knee = Knee.model_validate(report["knee"])
    assert {r["requestsPerRun"] for r in replication} == {run_requests(replication[0]["offeredConcurrency"], knee)}
    assert all(len(r["runsTokensPerS"]) >= 3 and r["throughputSpread"]["ciLow"] <= r["aggregateThroughputTokensPerS"]
               for r in replication)
    decision = report["decision"]
    assert report["recommendedReplicas"] == decision["replicas"]
    assert (decision["replicas"] == 2) == decision["significant"]
    assert "same load" in decision["explanation"]
    assert report["memory"]["weightsMib"] > 100  # 135M parameters, two or four bytes each
    for point in report["points"]:
        assert "energyJoules" not in point  # no GPU: null, never zero
        assert point["energyNote"].startswith("not measured")
    assert [c["type"] for c in report["conditions"] if c["status"] == "True"] == ["Ready"]
    assert (out / "profile.png").exists()
    assert "<- knee" in done.stdout


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def profile_crd(api_client):
    """The SLMProfile CRD of this tree, so the apiserver keeps (does not prune) every status field it writes."""
    crd = yaml.safe_load((ROOT / "crds" / "slmprofiles.slmpack.dev.yaml").read_text())
    extensions = client.ApiextensionsV1Api(api_client)
    try:
        extensions.create_custom_resource_definition(crd)
    except client.ApiException as error:
        if error.status != 409:
            raise
        current = extensions.read_custom_resource_definition(crd["metadata"]["name"])
        crd["metadata"]["resourceVersion"] = current.metadata.resource_version
        extensions.replace_custom_resource_definition(crd["metadata"]["name"], crd)
    time.sleep(2)  # the apiserver serves a changed schema after a moment
    return client.CustomObjectsApi(api_client)


@pytest.mark.cluster
def test_a_profiler_killed_mid_sweep_resumes_without_measuring_again(vllm_cpu_server, profile_crd, namespace,
                                                                     kubeconfig, tmp_path):
    custom, name = profile_crd, "smollm2-resume"
    custom.create_namespaced_custom_object("slmpack.dev", "v1alpha1", namespace, "slmprofiles", {
        "apiVersion": "slmpack.dev/v1alpha1", "kind": "SLMProfile", "metadata": {"name": name},
        "spec": {"conditions": {"model": vllm_cpu_server.model, "device": "cpu"}}})
    command = [sys.executable, "-m", "slmpack.cli", "profile", "--engine", "openai",
               "--base-url", vllm_cpu_server.base_url, "--batch-sizes", "1,2,4,8", "--requests-per-point", "8",
               "--input-tokens", "32", "--output-tokens", "32", "--write-profile", f"{namespace}/{name}",
               "--out", str(tmp_path / "out")]
    env = os.environ | {"KUBECONFIG": str(kubeconfig)}

    def stored() -> dict:
        return custom.get_namespaced_custom_object("slmpack.dev", "v1alpha1", namespace, "slmprofiles",
                                                   name).get("status") or {}

    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while len(stored().get("points", [])) < 2:
        assert first.poll() is None, "the profiler ended before it could be killed mid-sweep"
        assert time.monotonic() < deadline, "no two points were written within 10 minutes"
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)  # as when the node or the pod goes: nothing is cleaned up
    first.wait(30)
    before = {p["batchSize"]: p for p in stored()["points"]}
    assert stored()["phase"] == "Profiling"

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming: {len(before)} batch sizes" in second.stderr
    after = {p["batchSize"]: p for p in stored()["points"]}
    assert sorted(after) == [1, 2, 4, 8]
    for batch, point in before.items():  # measured once: the very same numbers
        assert after[batch]["durationS"] == point["durationS"]
    final = stored()
    assert final["phase"] == "Ready" and final["progress"]["probesDone"] == 4
    assert next(c for c in final["conditions"] if c["type"] == "Ready")["status"] == "True"
