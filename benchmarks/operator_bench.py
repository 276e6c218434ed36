"""Operator latency and memory on the local real cluster.

    python3 benchmarks/operator_bench.py [--deployments 200]

1. apply → StatefulSet created, with a cached (Ready) profile: median and worst of 10 (target ≤ 2 s).
2. N SLMDeployments reconciled (each with a plan in status); the operator's peak RSS (target < 250 MB).

It runs `slmpack operator` as a subprocess against `.cluster/kubeconfig` (or $KUBECONFIG), on a
node object made for the benchmark (a GPU node no kubelet serves, so no pod runs).
"""

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from kubernetes import client, config, utils
from kubernetes.client.rest import ApiException

ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION = "slmpack.dev", "v1alpha1"


def rss_mb(pid: int, key: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deployments", type=int, default=200)
    args = parser.parse_args()
    kubeconfig = os.environ.get("KUBECONFIG") or str(ROOT / ".cluster/kubeconfig")
    api = config.new_client_from_config(kubeconfig)
    core, custom, apps = client.CoreV1Api(api), client.CustomObjectsApi(api), client.AppsV1Api(api)
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        with contextlib.suppress(utils.FailToCreateError):  # already there
            utils.create_from_yaml(api, str(path))
    node = "bench-gpu"
    try:
        core.create_node({"metadata": {"name": node, "labels": {
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.memory": "81559",
            "nvidia.com/gpu.replicas": "1000", "nvidia.com/gpu.sharing-strategy": "mps"}},
            "spec": {"unschedulable": False, "taints": [{"key": "bench", "effect": "NoSchedule"}]}})
    except ApiException as error:
        if error.status != 409:
            raise
    core.patch_node_status(node, {"status": {"capacity": {"nvidia.com/gpu": "1000"},
                                             "allocatable": {"nvidia.com/gpu": "1000"}}})
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})
    spec = {"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}, "replicas": "auto"}
    operator = subprocess.Popen([sys.executable, "-m", "slmpack.cli", "--log-level", "WARNING", "operator",
                                 "--namespace", namespace, "--metrics-port", "0", "--health-port", "0"],
                                env={**os.environ, "KUBECONFIG": kubeconfig},
                                stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        # A cached profile: the first deployment creates it; we write its measurement.
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "slmdeployments", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "SLMDeployment", "metadata": {"name": "seed"}, "spec": spec})
        while not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "slmprofiles")["items"]:
            time.sleep(0.2)
        profile = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "slmprofiles")["items"][0]
        custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, "slmprofiles",
                                                     profile["metadata"]["name"], {"status": {
            "phase": "Ready", "knee": {"batchSize": 64, "rule": "bca", "throughputTokensPerS": 9000},
            "replication": [{"replicas": 3, "batchSizePerReplica": 64, "aggregateThroughputTokensPerS": 12000}],
            "recommendedReplicas": 3}})
        latencies = []
        for i in range(10):
            name = f"latency-{i}"
            started = time.perf_counter()
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "slmdeployments", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "SLMDeployment", "metadata": {"name": name},
                "spec": spec})
            while True:
                try:
                    apps.read_namespaced_stateful_set(name, namespace)
                    break
                except ApiException:
                    time.sleep(0.02)
            latencies.append(time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(args.deployments):
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "slmdeployments", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "SLMDeployment", "metadata": {"name": f"many-{i}"},
                "spec": spec})
        while True:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "slmdeployments")["items"]
            planned = sum(1 for d in items if (d.get("status") or {}).get("plan"))
            if planned == len(items):
                break
            time.sleep(1)
        all_done = time.perf_counter() - started
        peak, now = rss_mb(operator.pid), rss_mb(operator.pid, "VmRSS")
    finally:
        operator.terminate()
        operator.wait(30)
        core.delete_namespace(namespace)
        core.delete_node(node)
    print("| measure | value | target |")
    print("|---|---:|---:|")
    print(f"| apply → StatefulSet, cached profile, median of 10 | {statistics.median(latencies):.3f} s | ≤ 2 s |")
    print(f"| apply → StatefulSet, worst of 10 | {max(latencies):.3f} s | |")
    print(f"| {args.deployments} more SLMDeployments all planned | {all_done:.1f} s | |")
    print(f"| operator peak RSS with {len(items)} SLMDeployments | {peak:.0f} MB | < 250 MB |")
    print(f"| operator RSS at the end | {now:.0f} MB | |")


if __name__ == "__main__":
    main()
