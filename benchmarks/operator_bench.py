"""Operator scale, latency and memory on the shared control plane.

    PYTHONPATH=operator python3 benchmarks/operator_bench.py [--deployments 1000] [--namespaces 4]

1. N SLMDeployments, spread over their own namespaces, each namespace with a cached (Ready)
   profile, applied at once from 8 client threads: the time until every StatefulSet exists
   (goal: 60 s), seen through a watch.
2. The operator's peak RSS (goal: < 300 MB), from /proc.
3. API requests per reconcile, from the operator's own counters (`slmpack_operator_api_requests_total`
   over `slmpack_operator_reconciles_total`; kopf's watch streams are not counted).
4. apply → StatefulSet for 5 more, one at a time, with the N present.

`slmpack operator` runs as a subprocess against $KUBECONFIG (default `.cluster/kubeconfig`),
watching only the benchmark's namespaces. The deployments target a GPU node object made for the
benchmark that no kubelet serves, so no engine runs and only the operator's work is measured.
Everything it made is deleted at the end.
"""

import argparse
import concurrent.futures
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from kubernetes import client, config, utils, watch
from kubernetes.client.rest import ApiException

ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION = "slmpack.dev", "v1alpha1"
NODE = "bench-gpu"
SPEC = {"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "gpu": {"product": "NVIDIA-H100-80GB-HBM3"},
        "replicas": "auto"}
READY_PROFILE = {"phase": "Ready", "knee": {"batchSize": 64, "rule": "bca", "throughputTokensPerS": 9000},
                 "replication": [{"replicas": 3, "batchSizePerReplica": 64, "aggregateThroughputTokensPerS": 12000}],
                 "recommendedReplicas": 3}


def rss_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def print_table(rows: list[tuple[str, str, str]]) -> None:
    """The measures as the Markdown table the write-ups quote."""
    print("| measure | value | goal |")
    print("|---|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def deployment(name: str) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SLMDeployment", "metadata": {"name": name}, "spec": SPEC}


class StatefulSetWatch(threading.Thread):
    """Records when each StatefulSet of the namespaces first appears, as a client sees it."""

    def __init__(self, apps: client.AppsV1Api, namespaces: list[str]):
        super().__init__(daemon=True)
        self.apps, self.namespaces, self.seen, self.stop = apps, set(namespaces), {}, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for event in watch.Watch().stream(self.apps.list_stateful_set_for_all_namespaces, timeout_seconds=30):
                    meta = event["object"].metadata
                    if meta.namespace in self.namespaces:
                        self.seen.setdefault((meta.namespace, meta.name), time.perf_counter())
                    if self.stop.is_set():
                        return
            except Exception:  # a dropped watch is reopened
                time.sleep(0.5)

    def wait_for(self, key, deadline: float) -> float | None:
        while time.perf_counter() < deadline:
            if key in self.seen:
                return self.seen[key]
            time.sleep(0.01)
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deployments", type=int, default=1000)
    parser.add_argument("--namespaces", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for all StatefulSets")
    args = parser.parse_args()
    kubeconfig = os.environ.get("KUBECONFIG") or str(ROOT / ".cluster/kubeconfig")
    api = config.new_client_from_config(kubeconfig)
    api.configuration.connection_pool_maxsize = 16
    core, custom, apps = client.CoreV1Api(api), client.CustomObjectsApi(api), client.AppsV1Api(api)
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        try:
            utils.create_from_yaml(api, str(path))
        except utils.FailToCreateError as error:
            if any(e.status != 409 for e in error.api_exceptions):
                raise
    try:
        core.create_node({"metadata": {"name": NODE, "labels": {
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.memory": "81559",
            "nvidia.com/gpu.replicas": "4", "nvidia.com/gpu.sharing-strategy": "mps"}},
            "spec": {"taints": [{"key": "slmpack.dev/benchmark", "effect": "NoSchedule"}]}})
    except ApiException as error:
        if error.status != 409:
            raise
    core.patch_node_status(NODE, {"status": {"capacity": {"nvidia.com/gpu": "4000"},
                                             "allocatable": {"nvidia.com/gpu": "4000"}}})
    run_id = uuid.uuid4().hex[:6]
    namespaces = [f"bench-{run_id}-{i}" for i in range(args.namespaces)]
    for ns in namespaces:
        core.create_namespace({"metadata": {"name": ns, "labels": {"slmpack.dev/benchmark": "true"}}})
    metrics_port = free_port()
    command = [sys.executable, "-m", "slmpack.cli", "--log-level", "WARNING", "operator",
               "--metrics-port", str(metrics_port), "--health-port", "0"]
    for ns in namespaces:
        command += ["--namespace", ns]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"operator-bench-{run_id}.log", "w")  # noqa: SIM115
    operator = subprocess.Popen(command, env={**os.environ, "KUBECONFIG": kubeconfig}, stderr=log, stdout=log)
    seen = StatefulSetWatch(apps, namespaces)
    seen.start()
    rows = []
    try:
        # One cached profile per namespace: a seed deployment creates it, the benchmark measures it.
        for ns in namespaces:
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, "slmdeployments", deployment("seed"))
        for ns in namespaces:
            while not (profiles := custom.list_namespaced_custom_object(GROUP, VERSION, ns, "slmprofiles")["items"]):
                time.sleep(0.2)
            custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "slmprofiles",
                                                         profiles[0]["metadata"]["name"], {"status": READY_PROFILE})
        for ns in namespaces:
            if seen.wait_for((ns, "seed"), time.perf_counter() + 120) is None:
                raise SystemExit(f"the seed deployment of {ns} got no StatefulSet")
        time.sleep(2)
        requests_before = metric(metrics_port, "slmpack_operator_api_requests_total")
        reconciles_before = metric(metrics_port, "slmpack_operator_reconciles_total")
        seconds_before = metric(metrics_port, "slmpack_operator_reconcile_duration_seconds_sum")
        conflicts_before = metric(metrics_port, "slmpack_operator_conflicts_total")

        names = [(namespaces[i % len(namespaces)], f"many-{i}") for i in range(args.deployments)]
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda key: custom.create_namespaced_custom_object(
                GROUP, VERSION, key[0], "slmdeployments", deployment(key[1])), names))
        applied = time.perf_counter() - started
        deadline = started + args.timeout
        last = max((seen.wait_for(key, deadline) or float("inf")) for key in names)
        all_created = last - started
        within_60 = sum(1 for key in names if seen.seen.get(key, float("inf")) - started <= 60)
        created = sum(1 for key in names if key in seen.seen)
        time.sleep(5)  # let the status writes that follow settle
        requests = metric(metrics_port, "slmpack_operator_api_requests_total") - requests_before
        reconciles = metric(metrics_port, "slmpack_operator_reconciles_total") - reconciles_before
        seconds = metric(metrics_port, "slmpack_operator_reconcile_duration_seconds_sum") - seconds_before
        conflicts = metric(metrics_port, "slmpack_operator_conflicts_total") - conflicts_before

        latencies = []
        for i in range(5):
            key = (namespaces[0], f"latency-{i}")
            t0 = time.perf_counter()
            custom.create_namespaced_custom_object(GROUP, VERSION, key[0], "slmdeployments", deployment(key[1]))
            latencies.append((seen.wait_for(key, t0 + 60) or float("inf")) - t0)
        peak, now = rss_mb(operator.pid, "VmHWM"), rss_mb(operator.pid, "VmRSS")
        rows = [
            (f"{args.deployments} SLMDeployments applied (8 client threads)", f"{applied:.1f} s", ""),
            (f"{args.deployments} StatefulSets all created, from the first apply",
             f"{all_created:.1f} s" if created == len(names) else f"not within {args.timeout:.0f} s ({created})",
             "≤ 60 s"),
            ("StatefulSets created within 60 s of the first apply", f"{within_60}", f"{args.deployments}"),
            ("reconciles during the burst", f"{reconciles:.0f}", ""),
            ("mean reconcile time (decide, act, write status)", f"{1000 * seconds / max(reconciles, 1):.0f} ms", ""),
            ("writes refused with 409 and requeued", f"{conflicts:.0f}", ""),
            ("API requests during the burst", f"{requests:.0f}", ""),
            ("API requests per reconcile", f"{requests / max(reconciles, 1):.2f}", "reported"),
            (f"apply → StatefulSet with {args.deployments} present, median of 5",
             f"{statistics.median(latencies):.3f} s", ""),
            ("apply → StatefulSet, worst of 5", f"{max(latencies):.3f} s", ""),
            ("operator peak RSS", f"{peak:.0f} MB", "< 300 MB"),
            ("operator RSS at the end", f"{now:.0f} MB", ""),
        ]
    finally:
        seen.stop.set()
        operator.terminate()
        operator.wait(30)
        for ns in namespaces:
            core.delete_namespace(ns)
        core.delete_node(NODE)
    print(f"operator log: {log.name}")
    print_table(rows)


if __name__ == "__main__":
    main()
