"""The operator's memory in a cluster full of pods that are not slmpack's.

    rm -rf .cluster/etcd && make cluster-api     # a fresh control plane: etcd keeps the last run's pods
    KUBECONFIG=.cluster/kubeconfig PYTHONPATH=operator python3 benchmarks/operator_unrelated_pods.py [--pods 10000]
    make cluster-down && rm -rf .cluster/etcd

1. `slmpack operator` (every namespace, as the chart's default scope) starts on the control plane
   with no pod but its own test deployment's, settles, and its RSS is read from /proc.
One SLMDeployment (fixed replicas, a CPU engine, on a node object no kubelet serves) runs
throughout, so the operator has its own StatefulSet and pods to follow.

2. N pods that are not slmpack's (a Deployment's pods as a ReplicaSet would make them: labels, an
   annotation, one container with env and resources) are created in 10 namespaces, 16 client
   threads; no kubelet runs them, so they stay Pending, and the scheduler marks each unschedulable
   (a status write the watches see).
3. The same operator, having watched them arrive, settles and is read again; then a second operator
   starts with them present (its initial list) and is read after it settles.

Goal: within 10 % of the RSS without them. Run it against another checkout's operator with
PYTHONPATH to compare.
"""

import argparse
import concurrent.futures
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from kubernetes import client, config, utils
from kubernetes.client.rest import ApiException

# The sibling script's helpers: run as a script, this directory is on the path.
from operator_bench import print_table, rss_mb

ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION = "slmpack.dev", "v1alpha1"
SETTLE_SECONDS = 45
NAMESPACES = 10


def unrelated_pod(i: int) -> dict:
    """A pod of someone else's web Deployment, about as large as such pods are before a kubelet runs them."""
    return {"metadata": {"name": f"web-{i:05d}", "labels": {"app": "web", "pod-template-hash": "5d8f7c9b6d",
                                                             "team": "others"},
                         "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-01T00:00:00Z",
                                         "example.com/config": "x" * 512}},
            "spec": {"containers": [{"name": "web", "image": "registry.example.com/web:1.2.3",
                                     "env": [{"name": f"SETTING_{k}", "value": f"value-{k}"} for k in range(8)],
                                     "ports": [{"containerPort": 8080, "name": "http"}],
                                     "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}


def start_operator(kubeconfig: str, run_id: str, which: str) -> tuple[subprocess.Popen, Path]:
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"operator-unrelated-{run_id}-{which}.log"
    command = [sys.executable, "-m", "slmpack.cli", "--log-level", "WARNING", "operator",
               "--metrics-port", "0", "--health-port", "0"]
    with log.open("w") as out:
        return subprocess.Popen(command, env={**os.environ, "KUBECONFIG": kubeconfig}, stdout=out, stderr=out), log


def settled_rss(pid: int) -> tuple[float, float]:
    time.sleep(SETTLE_SECONDS)
    return rss_mb(pid, "VmRSS"), rss_mb(pid, "VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=10_000)
    args = parser.parse_args()
    kubeconfig = os.environ.get("KUBECONFIG") or str(ROOT / ".cluster/kubeconfig")
    api = config.new_client_from_config(kubeconfig)
    api.configuration.connection_pool_maxsize = 16
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        try:
            utils.create_from_yaml(api, str(path))
        except utils.FailToCreateError as error:
            if any(e.status != 409 for e in error.api_exceptions):
                raise
    run_id = uuid.uuid4().hex[:6]
    own = f"slmpack-{run_id}"
    others = [f"others-{run_id}-{i}" for i in range(NAMESPACES)]
    for ns in [own, *others]:
        core.create_namespace({"metadata": {"name": ns}})
    # A node object for the deployment's pack, tainted so that nothing is scheduled on it: no kubelet serves it.
    node = f"bench-{run_id}"
    core.create_node({"metadata": {"name": node}, "spec": {"taints": [
        {"key": "slmpack.dev/benchmark", "effect": "NoSchedule"}]}})
    core.patch_node_status(node, {"status": {"capacity": {"cpu": "2", "memory": "8Gi"},
                                             "allocatable": {"cpu": "2", "memory": "8Gi"}}})
    time.sleep(2)  # the controller-manager gives each namespace its default ServiceAccount
    custom.create_namespaced_custom_object(GROUP, VERSION, own, "slmdeployments", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SLMDeployment", "metadata": {"name": "chat"},
        "spec": {"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "engine": {"device": "cpu"},
                 "replicas": 2}})
    rows, operators = [], []
    try:
        first, first_log = start_operator(kubeconfig, run_id, "first")
        operators.append(first)
        without, without_peak = settled_rss(first.pid)

        def create(i: int) -> None:
            for attempt in range(5):
                try:
                    core.create_namespaced_pod(others[i % NAMESPACES], unrelated_pod(i))
                    return
                except ApiException as error:
                    if error.status == 409:
                        return
                    if attempt == 4:
                        raise
                    time.sleep(1)

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(args.pods)))
        created_s = time.perf_counter() - started
        watched, watched_peak = settled_rss(first.pid)
        second, second_log = start_operator(kubeconfig, run_id, "second")
        operators.append(second)
        listed, listed_peak = settled_rss(second.pid)
        present = sum(len(core.list_namespaced_pod(ns, limit=500, _preload_content=False).data) > 0
                      for ns in others)
        rows = [
            (f"{args.pods} unrelated pods created (16 client threads)", f"{created_s:.0f} s", ""),
            ("namespaces that hold them", f"{present} of {NAMESPACES}", ""),
            ("operator RSS without them, settled", f"{without:.0f} MB", ""),
            ("the same operator after they arrived by its watches, settled", f"{watched:.0f} MB",
             f"≤ {1.1 * without:.0f} MB"),
            ("a second operator started with them present, settled", f"{listed:.0f} MB", f"≤ {1.1 * without:.0f} MB"),
            ("peak RSS: first operator before, after; second operator", f"{without_peak:.0f}, {watched_peak:.0f}; "
             f"{listed_peak:.0f} MB", ""),
        ]
    finally:
        for operator in operators:
            operator.terminate()
            operator.wait(30)
        for ns in [own, *others]:
            core.delete_namespace(ns)
        core.delete_node(node)
    print(f"operator logs: {first_log}, {second_log}")
    print_table(rows)


if __name__ == "__main__":
    main()
