"""The GPU collector on a fake device set, the cgroup parser, and energy attribution."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from slmpack.core.attribution import EnergyLedger, split
from slmpack.exporter.collector import GpuCollector
from slmpack.exporter.fake import FakeNode, FakePods, FakeProcess, fake_node
from slmpack.exporter.nvml import SourceDown
from slmpack.exporter.pods import PodDirectory, PodRef, parse_cgroup

ROOT = Path(__file__).resolve().parents[2]
CHAT = [PodRef("ai", f"chat-{i}", "engine", "chat") for i in range(3)]


def mps_node() -> FakeNode:
    """GPU 0 reports per-process utilization, GPU 1 does not (NotSupported, as under MPS on many boards)."""
    return FakeNode(gpus=2, utilization_supported={0}, processes=[
        FakeProcess(101, 0, CHAT[0], sm_percent=30), FakeProcess(102, 0, CHAT[1], sm_percent=10),
        FakeProcess(103, 0, CHAT[1], sm_percent=20),  # a second process of the same pod
        FakeProcess(201, 1, CHAT[2]), FakeProcess(202, 1, PodRef("ai", "batch-0", "engine", "batch")),
        FakeProcess(203, 1, PodRef("ai", "gone-0", "engine", "gone"), exits_after_reads=1),
    ])


def scrape(registry):
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


@pytest.fixture
def collected():
    node = mps_node()
    collector = GpuCollector(node, FakePods(node))
    registry = CollectorRegistry()
    registry.register(collector)
    return node, collector, registry


def test_gpu_families_have_dcgm_like_names_labels_types_and_help(collected):
    _, _, registry = collected
    families = scrape(registry)
    power = families["slmpack_gpu_power_watts"]
    assert power.type == "gauge" and "DCGM_FI_DEV_POWER_USAGE" in power.documentation
    assert {s.labels["gpu"] for s in power.samples} == {"0", "1"}
    assert set(power.samples[0].labels) == {"gpu", "uuid", "product"}
    energy = families["slmpack_gpu_energy_joules"]
    assert energy.type == "counter" and "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION" in energy.documentation
    for name in ("slmpack_gpu_power_limit_watts", "slmpack_gpu_utilization_ratio", "slmpack_gpu_memory_used_bytes",
                 "slmpack_gpu_memory_total_bytes", "slmpack_gpu_sm_clock_hertz", "slmpack_gpu_temperature_celsius"):
        assert families[name].samples, name
    assert registry.get_sample_value("slmpack_exporter_nvml_up") == 1


def test_process_memory_is_summed_per_pod(collected):
    _, _, registry = collected
    value = registry.get_sample_value("slmpack_pod_gpu_memory_used_bytes", {
        "gpu": "0", "uuid": "GPU-fake-0000", "namespace": "ai", "pod": "chat-1", "container": "engine",
        "slmdeployment": "chat"})
    assert value == 2 * 2 * 1024**3


def test_attribution_sums_to_the_gpu_energy_and_names_its_method(collected):
    node, collector, registry = collected
    scrape(registry)
    time.sleep(0.05)
    before = dict(collector.ledger.last_total)
    families = scrape(registry)
    pods = families["slmpack_pod_gpu_energy_joules"].samples
    for uuid, method in (("GPU-fake-0000", "process_utilization"), ("GPU-fake-0001", "equal_share")):
        shares = [s for s in pods if s.labels["uuid"] == uuid]
        assert {s.labels["method"] for s in shares} == {method}
        gpu_delta = collector.ledger.last_total[uuid] - before[uuid]
        assert gpu_delta > 0
        # Counters started at 0 on the first scrape, so their sum is all energy split so far.
        assert sum(s.value for s in shares) == pytest.approx(gpu_delta, rel=1e-9)
    chat0 = next(s.value for s in pods if s.labels["pod"] == "chat-0")
    chat1 = next(s.value for s in pods if s.labels["pod"] == "chat-1")
    assert chat0 == pytest.approx(chat1)  # 30 % vs 10 % + 20 %


def test_counters_are_monotonic_and_survive_a_process_exit_and_a_restart(collected):
    node, _, registry = collected
    seen = []
    for _ in range(4):
        time.sleep(0.02)
        families = scrape(registry)
        seen.append({s.labels["pod"]: s.value for s in families["slmpack_pod_gpu_energy_joules"].samples})
        if len(seen) == 2:  # chat-2 restarts: its process goes, a new one of the same pod comes
            node.processes = [p for p in node.processes if p.pid != 201] + [FakeProcess(301, 1, CHAT[2])]
    for earlier, later in zip(seen, seen[1:], strict=False):
        for pod, value in earlier.items():
            assert later.get(pod, value) >= value, pod
    assert seen[-1]["chat-2"] > seen[1]["chat-2"]
    assert "gone-0" in seen[0]  # its counter stays, no longer growing
    assert seen[-1]["gone-0"] == seen[1]["gone-0"]


def test_no_gpu_serves_nvml_down_with_the_error():
    registry = CollectorRegistry()
    collector = GpuCollector(None, None, source_error="NVMLError_LibraryNotFound: NVML Shared Library Not Found")
    registry.register(collector)
    assert registry.get_sample_value("slmpack_exporter_nvml_up") == 0
    assert registry.get_sample_value("slmpack_exporter_nvml_info",
                                     {"error": "NVMLError_LibraryNotFound: NVML Shared Library Not Found"}) == 1
    assert "slmpack_gpu_power_watts" not in scrape(registry)


def test_a_source_that_goes_down_is_reported_not_raised():
    class Broken:
        def read(self):
            raise SourceDown("NVMLError_Unknown: driver gone")

    registry = CollectorRegistry()
    registry.register(GpuCollector(Broken(), None))
    assert registry.get_sample_value("slmpack_exporter_nvml_up") == 0


def test_split_by_utilization_or_equal_shares():
    assert split(90.0, {"a": 20.0, "b": 10.0}) == ({"a": 60.0, "b": 30.0}, "process_utilization")
    assert split(90.0, {"a": 20.0, "b": None}) == ({"a": 45.0, "b": 45.0}, "equal_share")
    assert split(90.0, {}) == ({}, "equal_share")


def test_a_driver_reload_does_not_make_counters_go_back():
    ledger = EnergyLedger()
    ledger.record("g", 1000.0, {"p": None})
    ledger.record("g", 1100.0, {"p": None})
    ledger.record("g", 5.0, {"p": None})  # counter reset
    ledger.record("g", 25.0, {"p": None})
    assert ledger.counters["p"] == pytest.approx(120.0)


@pytest.mark.parametrize("line, uid, container", [
    ("4:memory:/kubepods/burstable/pod1f3c5a2e-9b8d-4c7e-a1b2-c3d4e5f60718/" + "a" * 64,
     "1f3c5a2e-9b8d-4c7e-a1b2-c3d4e5f60718", "a" * 64),
    ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f3c5a2e_9b8d_4c7e_a1b2_c3d4e5f60718.slice/"
     "cri-containerd-" + "b" * 64 + ".scope", "1f3c5a2e-9b8d-4c7e-a1b2-c3d4e5f60718", "b" * 64),
    ("0::/kubepods/besteffort/pod1f3c5a2e-9b8d-4c7e-a1b2-c3d4e5f60718/crio-" + "c" * 64,
     "1f3c5a2e-9b8d-4c7e-a1b2-c3d4e5f60718", "c" * 64),
    ("0::/user.slice/user-0.slice/session-1.scope", None, None),
])
def test_cgroup_lines_give_the_pod_uid_and_container(line, uid, container):
    assert parse_cgroup(line) == (uid, container)


def test_pod_directory_maps_a_pid_to_its_pod_and_caches_the_list(tmp_path):
    uid, cid = "1f3c5a2e-9b8d-4c7e-a1b2-c3d4e5f60718", "d" * 64
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(f"1:name=systemd:/kubepods/pod{uid}/{cid}\n")
    calls = []

    def fetch():
        calls.append(1)
        return {"items": [{"metadata": {"uid": uid, "namespace": "ai", "name": "chat-0",
                                        "labels": {"slmpack.dev/deployment": "chat"}},
                           "spec": {"containers": [{"name": "engine"}, {"name": "sidecar"}]},
                           "status": {"containerStatuses": [{"name": "engine", "containerID": f"containerd://{cid}"}]}}]}

    pods = PodDirectory(fetch, proc=tmp_path, ttl_s=60)
    assert pods.lookup(42) == PodRef("ai", "chat-0", "engine", "chat")
    assert pods.lookup(42) == PodRef("ai", "chat-0", "engine", "chat")
    assert pods.lookup(43).pod == ""  # exited
    assert len(calls) == 1


def test_fake_node_shape():
    node = fake_node(8, 4)
    assert len(node.read().processes) == 32 and len(node.read().gpus) == 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_exporter_process_serves_nvml_down_here_without_crashing():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "slmpack.cli", "exporter", "--port", str(port),
                                "--address", "127.0.0.1"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "the exporter did not serve /metrics"
                time.sleep(0.2)
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read())
        assert "slmpack_exporter_nvml_up 0.0" in metrics
        assert "NVMLError_LibraryNotFound" in metrics
        assert health["nvml"] == "down" and "NVMLError_LibraryNotFound" in health["error"]
        assert process.poll() is None
    finally:
        process.terminate()
        stderr = process.communicate(timeout=10)[1]
    assert stderr.count("NVML is not available") == 1  # one clear line, not one per scrape


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus package")
def test_recording_rules_pass_their_promtool_tests():
    done = subprocess.run(["promtool", "test", "rules", "slmpack-rules_test.yaml"], cwd=ROOT / "deploy/prometheus",
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
