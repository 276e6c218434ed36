"""The engines enforce the API key the operator hands them (spec.apiKeySecretRef → VLLM_API_KEY), on the
real vLLM CPU engine: /v1 needs the bearer token, /health and /metrics stay open for probes and scrapes."""

import socket

import httpx
import pytest

from slmpack.core.validation import API_KEY_ENV
from slmpack.profiler.engines import VllmEngine, stop

pytestmark = pytest.mark.engine

KEY = "k-" + "7" * 30


@pytest.fixture(scope="module")
def guarded_engine(smollm2_model_dir):
    engine = VllmEngine(str(smollm2_model_dir), device="cpu", max_model_len=512, extra_args=["--enforce-eager"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = engine.start(port=port, max_num_seqs=2, extra_env={API_KEY_ENV: KEY}, name="api-key")
    yield running.endpoint
    stop(running)


def test_v1_refuses_a_request_without_the_key_and_serves_one_with_it(guarded_engine):
    url = f"{guarded_engine.base_url}/v1/completions"
    body = {"model": guarded_engine.model, "prompt": "Hello", "max_tokens": 2}
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
    served = httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert served.status_code == 200 and served.json()["choices"]


def test_health_and_metrics_stay_open_for_probes_and_the_autoscaler(guarded_engine):
    assert httpx.get(f"{guarded_engine.base_url}/health", timeout=10).status_code == 200
    metrics = httpx.get(f"{guarded_engine.base_url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "vllm:num_requests_running" in metrics.text
