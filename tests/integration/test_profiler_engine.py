"""The profiler against the real vLLM CPU engine serving SmolLM2-135M-Instruct (minutes)."""

import asyncio
import json
import socket
import subprocess
import sys

import pytest

from slmpack.profiler.engines import EngineError, VllmEngine
from slmpack.profiler.loadgen import Workload, closed_loop

pytestmark = pytest.mark.engine


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
         "--input-tokens", "32", "--output-tokens", "16", "--requests-per-point", "8", "--max-replicas", "2",
         "--port-base", "18110", "--out", str(out)],
        capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    batches = [p["batchSize"] for p in report["points"]]
    assert batches[:2] == [1, 8] or batches[0] == 1, batches
    assert report["knee"]["batchSize"] in batches
    assert report["sweep"]["mode"] == "adaptive" and report["sweep"]["probes"] == len(batches)
    assert [r["replicas"] for r in report["replication"]] == [1, 2]
    assert all(r.get("aggregateThroughputTokensPerS", 0) > 0 for r in report["replication"])
    assert report["recommendedReplicas"] in (1, 2)
    assert report["memory"]["weightsMib"] > 100  # 135M parameters in float32
    for point in report["points"]:
        assert "energyJoules" not in point  # no GPU: null, never zero
        assert point["energyNote"].startswith("not measured")
    assert (out / "profile.png").exists()
    assert "<- knee" in done.stdout
