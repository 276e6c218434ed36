"""A fixed `spec.replicas: N` without a profile, against one replica of the same spec, as a new user meets it:
one keep-alive `AsyncOpenAI` client at a fixed concurrency through the deployment's Service, for the same time.

Run on the test bed against the CPU example with `replicas` fixed (see benchmarks/fixed_replicas.md):

    python benchmarks/fixed_replicas.py --namespace bench --deployment smollm2-cpu --out benchmarks/fixed_replicas.json

For each N it sets `spec.replicas`, waits until N engines are ready and the Service answers, then runs the
client for `--seconds` and counts the requests each engine finished (its own `vllm:request_success_total`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kubernetes import client  # noqa: E402

from routing import kube, openai_load, pods, served  # noqa: E402
from slmpack.profiler.run import environment  # noqa: E402


def rolled(deployment: str, namespace: str, replicas: int) -> bool:
    """Every replica runs the StatefulSet's current template: a plan change rolls the replicas one by one, and
    one that restarts mid-run would serve nothing."""
    sts = client.AppsV1Api().read_namespaced_stateful_set(deployment, namespace)
    return (sts.status.observed_generation == sts.metadata.generation and sts.status.updated_replicas == replicas
            and sts.status.current_revision == sts.status.update_revision)


def set_replicas(core, custom, namespace: str, deployment: str, replicas: int) -> str:
    custom.patch_namespaced_custom_object("slmpack.dev", "v1alpha1", namespace, "slmdeployments", deployment,
                                          {"spec": {"replicas": replicas}})
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        body = custom.get_namespaced_custom_object("slmpack.dev", "v1alpha1", namespace, "slmdeployments", deployment)
        status = body.get("status") or {}
        if (status.get("readyReplicas") == replicas and len(pods(core, namespace, deployment)) == replicas
                and rolled(deployment, namespace, replicas)):
            service = core.read_namespaced_service(deployment, namespace)
            time.sleep(10)  # the router's agent and kube-proxy follow the Endpoints
            return f"http://{service.spec.cluster_ip}:{service.spec.ports[0].port}/v1"
        time.sleep(2)
    raise TimeoutError(f"{deployment} never had {replicas} ready replicas")


async def for_seconds(url: str, model: str, concurrency: int, output_tokens: int, seconds: float) -> dict:
    stop = asyncio.Event()
    load = asyncio.create_task(openai_load(url, model, 20_000, concurrency, output_tokens, stop))
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    stop.set()
    result = await load  # the requests in flight finish and count
    return {**result, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/fixed_replicas.json"))
    args = parser.parse_args()
    core, custom, namespace = kube(args.namespace)
    runs = {}
    for replicas in args.replicas:
        url = set_replicas(core, custom, namespace, args.deployment, replicas)
        body = custom.get_namespaced_custom_object("slmpack.dev", "v1alpha1", namespace, "slmdeployments",
                                                   args.deployment)
        ips = pods(core, namespace, args.deployment)
        before = served(ips, args.port)
        result = asyncio.run(for_seconds(url, args.deployment, args.concurrency, args.output_tokens, args.seconds))
        after = served(ips, args.port)
        finished = {name: after[name] - before.get(name, 0) for name in sorted(after)}
        runs[replicas] = {**result, "requests_per_replica": finished,
                          "requests_per_minute": sum(finished.values()) * 60 / result["seconds"],
                          "plan": (body.get("status") or {}).get("plan")}
        print(json.dumps({replicas: runs[replicas]}, indent=2), flush=True)
    one = runs.get(1)
    result = {"runs": runs, "environment": environment(None),
              "load_average": Path("/proc/loadavg").read_text().split()[:3],
              "ratio_to_one": {n: r["output_tok_s"] / one["output_tok_s"] for n, r in runs.items()} if one else None}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratio_to_one"], indent=2))


if __name__ == "__main__":
    main()
