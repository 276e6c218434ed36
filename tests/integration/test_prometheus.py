"""Debian's real Prometheus scrapes the exporter and a real vLLM engine; the J/token rule evaluates."""

import asyncio
import math
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from slmpack.profiler.loadgen import Workload, closed_loop

pytestmark = [pytest.mark.prometheus, pytest.mark.engine]
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not come up in {seconds}s")


@pytest.fixture
def exporter():
    """The exporter on a fake GPU node whose two engine pods belong to SLMDeployment ai/chat."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "slmpack.cli", "exporter", "--address", "127.0.0.1",
                                "--port", str(port), "--fake-devices", "1:2", "--fake-deployment", "ai/chat"])
    wait_http(f"http://127.0.0.1:{port}/healthz")
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


@pytest.fixture
def prometheus(tmp_path, exporter, vllm_cpu_server):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("Debian's prometheus is not installed: run `make system-deps`")
    port = free_port()
    engine = vllm_cpu_server.base_url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deploy/prometheus/slmpack-rules.yaml")],
        "scrape_configs": [
            {"job_name": "slmpack-exporter", "static_configs": [{"targets": [exporter]}]},
            # In a cluster these labels come from the pod relabeling in docs/exporter.md.
            {"job_name": "slmpack-engine", "static_configs": [{"targets": [engine], "labels": {
                "namespace": "ai", "pod": "chat-0", "slmdeployment": "chat"}}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/-/ready")
    yield url
    process.terminate()
    process.wait(10)


def query(url: str, expr: str) -> list[dict]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def scraped(url: str, job: str, seconds: float = 60) -> None:
    """Prometheus applies new targets at most every 5 s, so a ready server may not have scraped yet."""
    deadline = time.monotonic() + seconds
    while not query(url, f'up{{job="{job}"}} == 1'):
        assert time.monotonic() < deadline, f"Prometheus never scraped {job}"
        time.sleep(0.5)


def test_energy_per_token_evaluates_to_a_finite_figure(prometheus, vllm_cpu_server):
    # Traffic only after the engine's first scrape, across a few more, so that generated tokens grow
    # inside the rate window: traffic that ends before the first scrape leaves the counter flat.
    scraped(prometheus, "slmpack-engine")
    for _ in range(3):
        results, _ = asyncio.run(closed_loop([vllm_cpu_server], concurrency=4, requests=8,
                                             workload=Workload(input_tokens=16, output_tokens=16)))
        assert all(r.ok for r in results)
        time.sleep(1.2)
    deadline = time.monotonic() + 60
    while not (found := query(prometheus, 'slmpack:energy_per_token:joules{slmdeployment="chat"}')):
        assert time.monotonic() < deadline, query(prometheus, "slmpack:generation_tokens:rate5m")
        time.sleep(1)
    joules = float(found[0]["value"][1])
    assert math.isfinite(joules) and joules > 0
    assert found[0]["metric"]["namespace"] == "ai"
    # Both pods of ai/chat share the one fake GPU, so the deployment's share is all of its energy.
    # (Absolute watts are not checked: over a series younger than the 5m window, rate() divides
    # the increase by the whole window.)
    gpu = float(query(prometheus, "slmpack:gpu_energy_joules:rate5m")[0]["value"][1])
    deployment = float(query(prometheus, "slmpack:deployment_energy_joules:rate5m")[0]["value"][1])
    assert gpu > 0 and deployment == pytest.approx(gpu, rel=0.2)
    assert query(prometheus, "slmpack:gpu_energy_per_token:joules")
