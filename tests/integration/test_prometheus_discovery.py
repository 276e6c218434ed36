"""Debian's real Prometheus with the chart's scrape configuration and the pod discovery's answer:
the targets it keeps, and the labels they get, are the ones the J/token rules join on."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from tests.unit.test_chart import ENGINE_POD, HELM, _pod_sd

pytestmark = [pytest.mark.prometheus]
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod(name: str, namespace: str, labels: dict, annotations: dict, ip: str, ports: list[int]) -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "uid": name, "labels": labels,
                         "annotations": annotations},
            "spec": {"nodeName": "node-1", "containers": [{"name": "main", "ports": [
                {"name": f"p{p}", "containerPort": p} for p in ports]}]},
            "status": {"podIP": ip, "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}


PODS = [
    ENGINE_POD,
    # This release's exporter and operator (two ports, scraped once at the annotated one).
    pod("demo-slmpack-exporter-x", "slmpack-system", {"app.kubernetes.io/name": "slmpack",
        "app.kubernetes.io/instance": "demo", "app.kubernetes.io/component": "exporter"},
        {"prometheus.io/scrape": "true", "prometheus.io/port": "9400"}, "10.1.0.8", [9400]),
    pod("demo-slmpack-operator-x", "slmpack-system", {"app.kubernetes.io/name": "slmpack",
        "app.kubernetes.io/instance": "demo", "app.kubernetes.io/component": "operator"},
        {"prometheus.io/scrape": "true", "prometheus.io/port": "8080"}, "10.1.0.9", [8080, 8081]),
    # Another release's exporter, and an unrelated annotated pod: neither is this release's to scrape.
    pod("other-slmpack-exporter-y", "other-system", {"app.kubernetes.io/name": "slmpack",
        "app.kubernetes.io/instance": "other", "app.kubernetes.io/component": "exporter"},
        {"prometheus.io/scrape": "true", "prometheus.io/port": "9400"}, "10.1.0.10", [9400]),
    pod("web-0", "shop", {"app": "web"}, {"prometheus.io/scrape": "true"}, "10.1.0.11", [80]),
]


@pytest.fixture
def discovery():
    body = json.dumps(_pod_sd().target_groups(PODS)).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


def chart_prometheus_config() -> dict:
    if not HELM.exists():
        subprocess.run(["make", "-s", "helm"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    done = subprocess.run([str(HELM), "template", "demo", str(ROOT / "charts/slmpack"), "--namespace",
                           "slmpack-system", "--set", "monitoring.prometheus.enabled=true",
                           "-s", "templates/prometheus.yaml"], capture_output=True, text=True, check=True)
    config_map = next(d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "ConfigMap")
    return yaml.safe_load(config_map["data"]["prometheus.yml"])


def test_prometheus_keeps_this_releases_pods_and_the_engines_with_the_rule_labels(tmp_path, discovery):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("Debian's prometheus is not installed: run `make system-deps`")
    config = chart_prometheus_config()
    config.pop("rule_files")
    for job in config["scrape_configs"]:
        job["http_sd_configs"] = [{"url": discovery, "refresh_interval": "1s"}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        targets = []
        while time.monotonic() < deadline and len(targets) < 3:
            # Until it is ready Prometheus answers 503 with a text body, not JSON.
            with contextlib.suppress(httpx.HTTPError, ValueError):
                targets = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2).json()["data"][
                    "activeTargets"]
            time.sleep(0.5)
        found = {(t["labels"]["job"], t["labels"]["instance"]): t["labels"] for t in targets}
        assert set(found) == {("slmpack", "10.1.0.8:9400"), ("slmpack", "10.1.0.9:8080"),
                              ("slmpack-engines", "10.1.0.7:8000")}
        engine = found["slmpack-engines", "10.1.0.7:8000"]
        assert (engine["namespace"], engine["pod"], engine["slmdeployment"]) == ("ai", "chat-0", "chat")
        assert targets[0]["scrapeUrl"].endswith("/metrics")
        # The exporter's own series name the engine pods: no target label may overwrite them.
        assert "namespace" not in found["slmpack", "10.1.0.8:9400"]
    finally:
        process.terminate()
        process.wait(10)
