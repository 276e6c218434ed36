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
from slmpack.exporter.fake import MPS_DAEMON_POD, FakeNode, FakeNvml, FakePods, FakeProcess, fake_node
from slmpack.exporter.nvml import NvmlSource, SourceDown
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


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def serve(node: FakeNode, **options) -> tuple[GpuCollector, CollectorRegistry]:
    """The real NVML reading code on the fake NVML, collected into a registry."""
    collector = GpuCollector(NvmlSource(FakeNvml(node)), FakePods(node), **options)
    registry = CollectorRegistry()
    registry.register(collector)
    return collector, registry


@pytest.fixture
def collected():
    node = mps_node()
    collector, registry = serve(node)
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
    split_by = {(s.labels["uuid"], s.labels["share"]): s.value
                for s in families["slmpack_gpu_energy_split_joules"].samples}
    for uuid, method in (("GPU-fake-0000", "process_utilization"), ("GPU-fake-0001", "equal_share")):
        shares = [s for s in pods if s.labels["uuid"] == uuid]
        gpu_delta = collector.ledger.last_total[uuid] - before[uuid]
        assert gpu_delta > 0
        # Counters started at 0 on the first scrape, so their sum is all energy split so far.
        assert sum(s.value for s in shares) == pytest.approx(gpu_delta, rel=1e-9)
        assert split_by[(uuid, method)] == pytest.approx(gpu_delta, rel=1e-9)
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


def test_a_lost_gpu_sets_nvml_down_and_nvml_is_initialised_again_once_it_is_back(caplog):
    node = fake_node(2, 1)
    collector, registry = serve(node)
    assert registry.get_sample_value("slmpack_exporter_nvml_up") == 1 and node.inits == 1
    node.lost = True  # nvmlDeviceGetCount raises GPU_IS_LOST
    assert registry.get_sample_value("slmpack_exporter_nvml_up") == 0  # a scrape, not a 500
    assert "GPU is lost" in collector.last_error and not collector.nvml_up
    assert "slmpack_gpu_power_watts" not in scrape(registry)
    assert "GPU is lost" in caplog.text  # reported once, in the log
    node.lost, inits = False, node.inits
    assert registry.get_sample_value("slmpack_exporter_nvml_up") == 1
    assert node.inits == inits + 1  # the next scrape initialised NVML again
    assert registry.get_sample_value("slmpack_gpu_power_watts", {"gpu": "1", "uuid": "GPU-fake-0001",
                                                                 "product": node.product}) == 310.0


def test_split_by_utilization_or_equal_shares():
    assert split(90.0, {"a": 20.0, "b": 10.0}) == ({"a": 60.0, "b": 30.0}, "process_utilization")
    assert split(90.0, {"a": 20.0, "b": None}) == ({"a": 45.0, "b": 45.0}, "equal_share")
    assert split(90.0, {"a": 0.0, "b": 0.0}) == ({"a": 45.0, "b": 45.0}, "equal_share")  # all idle
    assert split(90.0, {}) == ({}, "idle")


def test_a_driver_reload_does_not_make_counters_go_back():
    ledger = EnergyLedger()
    for now, total in enumerate((1000.0, 1100.0, 5.0, 25.0)):  # the counter resets at 5.0
        ledger.record("g", total, {"p": None}, now)
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


def test_a_pack_pods_processes_are_told_apart_by_the_engine_port_their_server_listens_on(tmp_path):
    uid, cid = "1f3c5a2e-9b8d-4c7e-a1b2-c3d4e5f60718", "d" * 64
    # The supervisor (10), engine-1's server on 8001 (11) and its engine core (12), which holds the GPU; a helper
    # the supervisor ran that is no engine (13). World-readable files only: cmdline and stat.
    processes = {10: (["slmpack", "supervise"], 1), 11: (["python3", "-m", "vllm.entrypoints.openai.api_server",
                                                         "--model", "m", "--port", "8001"], 10),
                 12: (["VLLM::EngineCore"], 11), 13: (["sh", "-c", "true"], 10)}
    for pid, (argv, parent) in processes.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(f"1:name=systemd:/kubepods/pod{uid}/{cid}\n")
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({argv[0][:15]}) S {parent} {pid} {pid} 0 -1\n")
    ports = [{"name": "engine-0", "containerPort": 8000}, {"name": "engine-1", "containerPort": 8001},
             {"name": "supervisor", "containerPort": 8090}]
    pods = PodDirectory(lambda: {"items": [{"metadata": {"uid": uid, "namespace": "ai", "name": "chat-pack-0",
                                                         "labels": {"slmpack.dev/deployment": "chat"}},
                                            "spec": {"containers": [{"name": "supervisor", "ports": ports}]}}]},
                        proc=tmp_path)
    assert pods.lookup(12) == PodRef("ai", "chat-pack-0", "supervisor", "chat", "engine-1")
    assert pods.lookup(11).engine == "engine-1"
    assert pods.lookup(13).engine == ""  # no engine's server above it

    # Each engine gets its own series; a pod that runs one engine keeps an empty label, which Prometheus drops.
    engines = [PodRef("ai", "chat-pack-0", "supervisor", "chat", f"engine-{i}") for i in range(2)]
    node = FakeNode(gpus=1, processes=[FakeProcess(100 + i, 0, ref, sm_percent=30 + 40 * i)
                                       for i, ref in enumerate(engines)])
    registry = CollectorRegistry()
    registry.register(GpuCollector(NvmlSource(FakeNvml(node)), FakePods(node)))
    scrape(registry)
    info = scrape(registry)["slmpack_pod_gpu_info"].samples
    assert sorted(s.labels["engine"] for s in info) == ["engine-0", "engine-1"]
    assert {s.labels["pod"] for s in info} == {"chat-pack-0"}
    energy = scrape(registry)["slmpack_pod_gpu_energy_joules"].samples
    assert {s.labels["engine"] for s in energy if s.name.endswith("_total")} == {"engine-0", "engine-1"}


def test_fake_node_shape():
    snapshot = NvmlSource(FakeNvml(fake_node(8, 4))).read()
    assert len(snapshot.processes) == 32 and len(snapshot.gpus) == 8


def test_the_mps_server_is_not_a_tenant_and_its_clients_are():
    node = fake_node(1, 3, namespace="ai", deployment="chat", mps=True)
    _, registry = serve(node)
    families = scrape(registry)
    pods = {s.labels["pod"] for s in families["slmpack_pod_gpu_info"].samples}
    assert pods == {"chat-0", "chat-1", "chat-2"}
    assert MPS_DAEMON_POD.pod not in {s.labels["pod"] for f in families.values() for s in f.samples
                                      if "pod" in s.labels}
    assert {s.value for s in families["slmpack_pod_gpu_memory_used_bytes"].samples} == {2 * 1024**3}


def test_an_idle_process_shows_as_idle_not_missing():
    clock = Clock()
    node = FakeNode(gpus=1, utilization_supported={0}, clock=clock, processes=[
        FakeProcess(1, 0, CHAT[0], sm_percent=40), FakeProcess(2, 0, CHAT[1], sm_percent=0)])
    _, registry = serve(node, clock=clock)
    scrape(registry)
    clock.now += 10
    families = scrape(registry)
    sm = {s.labels["pod"]: s.value for s in families["slmpack_pod_gpu_sm_utilization_ratio"].samples}
    assert sm == {"chat-0": 0.4, "chat-1": 0.0}
    energy = {s.labels["pod"]: s.value for s in families["slmpack_pod_gpu_energy_joules"].samples}
    assert energy["chat-1"] == 0.0 and energy["chat-0"] == pytest.approx(300.0 * 10, rel=1e-6)
    node.processes[0].sm_percent = 0  # now both idle: NVML has no newer sample (NOT_FOUND)
    clock.now += 10
    sm = {s.labels["pod"]: s.value for s in scrape(registry)["slmpack_pod_gpu_sm_utilization_ratio"].samples}
    assert sm == {"chat-0": 0.0, "chat-1": 0.0}


def test_utilization_covers_the_time_since_the_last_read_only():
    node = FakeNode(gpus=1, utilization_supported={0}, processes=[FakeProcess(1, 0, CHAT[0], sm_percent=80)])
    source = NvmlSource(FakeNvml(node))
    assert source.read().processes[0].sm_utilization_percent == 80
    node.processes[0].sm_percent = 20
    # With timestamp 0 the buffer's old 80 % sample would be averaged in; from the last seen one it is not.
    assert source.read().processes[0].sm_utilization_percent == 20


def test_pods_plus_idle_add_up_to_the_board_energy():
    clock = Clock()
    node = FakeNode(gpus=2, utilization_supported={0}, clock=clock, mps=True, processes=[
        FakeProcess(1, 0, CHAT[0], sm_percent=70), FakeProcess(2, 0, CHAT[1], sm_percent=0),
        FakeProcess(3, 1, CHAT[2])])
    _, registry = serve(node, clock=clock)

    def board_and_parts():
        families = scrape(registry)
        board = {s.labels["uuid"]: s.value for s in families["slmpack_gpu_energy_joules"].samples}
        pods, by_share = {}, {}
        for s in families["slmpack_pod_gpu_energy_joules"].samples:
            pods[s.labels["uuid"]] = pods.get(s.labels["uuid"], 0.0) + s.value
        for s in families["slmpack_gpu_energy_split_joules"].samples:
            by_share[s.labels["uuid"]] = by_share.get(s.labels["uuid"], 0.0) + s.value
        idle = {s.labels["uuid"]: s.value for s in families["slmpack_gpu_energy_split_joules"].samples
                if s.labels["share"] == "idle"}
        return board, pods, idle, by_share

    start, *_ = board_and_parts()
    for step, processes in enumerate((node.processes, [], node.processes[:1], [])):
        node.processes = list(processes)
        clock.now += 15 + step
        board, pods, idle, by_share = board_and_parts()
    for uuid in board:
        used = board[uuid] - start[uuid]
        assert used > 0
        assert pods.get(uuid, 0.0) + idle[uuid] == pytest.approx(used, rel=1e-9)
        assert by_share[uuid] == pytest.approx(used, rel=1e-9)
        assert idle[uuid] > 0  # the steps with no pod on the GPU


def test_series_of_gone_pods_are_dropped_after_the_grace_period():
    clock = Clock()
    node = FakeNode(gpus=1, clock=clock, processes=[])
    _, registry = serve(node, clock=clock, forget_after_s=30)
    counts = []
    for i in range(300):  # a new pod every 5 s, each living 10 s
        node.processes = [p for p in node.processes if p.pid > i - 2] + [
            FakeProcess(i, 0, PodRef("ai", f"job-{i}", "engine", "jobs"))]
        clock.now += 5
        counts.append(len(scrape(registry)["slmpack_pod_gpu_energy_joules"].samples))
    # Seen pods plus those gone less than 30 s ago: about (10 + 30) / 5, never growing with churn.
    assert max(counts[50:]) <= 9 and counts[-1] == counts[100]
    last = {s.labels["pod"] for s in scrape(registry)["slmpack_pod_gpu_energy_joules"].samples}
    assert "job-0" not in last and "job-299" in last


def test_every_family_keeps_one_label_set_over_its_lifetime(collected):
    node, _, registry = collected
    label_sets: dict[str, set] = {}
    for step in range(4):
        node.utilization_supported = {0} if step % 2 else set()  # the split method changes
        time.sleep(0.01)
        for family in scrape(registry).values():
            for sample in family.samples:
                label_sets.setdefault(sample.name, set()).add(tuple(sorted(sample.labels)))
    assert {name: len(sets) for name, sets in label_sets.items() if len(sets) > 1} == {}
    assert "method" not in label_sets["slmpack_pod_gpu_energy_joules_total"].pop()


def test_pod_list_failures_are_counted_and_the_last_list_kept(tmp_path):
    uid = "1f3c5a2e-9b8d-4c7e-a1b2-c3d4e5f60718"
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(f"0::/kubepods/pod{uid}/" + "e" * 64 + "\n")
    answers = [{"items": [{"metadata": {"uid": uid, "namespace": "ai", "name": "chat-0"},
                           "spec": {"containers": [{"name": "engine"}]}}]}, TimeoutError("read timed out")]

    def fetch():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    pods = PodDirectory(fetch, proc=tmp_path, ttl_s=0)
    assert pods.lookup(42).pod == "chat-0"
    time.sleep(0.01)
    assert pods.lookup(42).pod == "chat-0"  # the failed list keeps the last one
    registry = CollectorRegistry()
    registry.register(GpuCollector(None, pods))
    assert registry.get_sample_value("slmpack_exporter_pod_lookup_errors_total") == 1


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
    # SIGTERM is handled (exit 0, not -15): as a pod's PID 1 an unhandled one would be ignored.
    assert process.returncode == 0


def test_a_stalled_client_does_not_hold_up_scrapes():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "slmpack.cli", "exporter", "--port", str(port),
                                "--address", "127.0.0.1", "--fake-devices", "2:2"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the exporter did not start"
                time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never finishes its request
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'slmpack_pod_gpu_info{container="engine"' in metrics
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus package")
def test_recording_rules_pass_their_promtool_tests():
    done = subprocess.run(["promtool", "test", "rules", "slmpack-rules_test.yaml"], cwd=ROOT / "deploy/prometheus",
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
