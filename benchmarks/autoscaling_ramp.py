"""A load ramp on vLLM CPU engines: slmpack's GPU-aware autoscaler against an HPA that scales one replica per GPU.

    python3 benchmarks/autoscaling_ramp.py [--steps 4:180,12:240,24:300,12:240,4:300] [--out benchmarks/autoscaling]

Both run in one invocation, one after the other, on the local test bed (e2e/cluster) with the operator from the
chart, SmolLM2-135M on vLLM CPU, the same closed-loop ramp of offered concurrency through the Service, and the same
per-replica target: `targetKneePercent` of the profile's knee batch, in requests running plus waiting.
- slmpack: the emulated node has G GPUs shared by MPS, R slots each, `packed` allocation. The SLMDeployment is
  profiled (a real profiling Job), then `spec.autoscaling` fills a pack (a GPU) before it takes another.
- HPA: the same node with whole GPUs (sharing none), an SLMDeployment of one replica per pack, and the HPA's own
  algorithm (benchmarks/hpa.py) on `vllm:num_requests_running + vllm:num_requests_waiting` per pod, writing the
  packs through the scale subresource every 15 s: how an HPA on request concurrency runs one replica per GPU.
The HPA's downscale stabilization window is set to slmpack's scale-in cooldown, so both wait as long to scale in.

Every 5 s it samples replicas, ready replicas and the GPUs the deployment's pods hold (the ConfigMap
slmpack-gpus-localhost that the exporter, run on the host, writes from the kubelet's PodResources; a pod not there yet
counts as one more GPU).
Every request's inter-token gaps are kept. Writes timeline.csv, requests.json, summary.json and timeline.png.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator")]

from benchmarks.hpa import Hpa, PodSample  # noqa: E402
from e2e.scenario import get, items, kubectl, sh, wait  # noqa: E402

from e2e import scenario  # noqa: E402
from slmpack.adapters.engine_metrics import EngineMetricsReader  # noqa: E402
from slmpack.core.gpu_assignments import config_map_name, gpus_by_pod_uid  # noqa: E402
from slmpack.profiler.loadgen import Endpoint, stream_completion, synthetic_prompt  # noqa: E402
from slmpack.profiler.run import environment  # noqa: E402

NS = scenario.APP_NS
SELECTOR = "app.kubernetes.io/name=slmpack-engine,slmpack.dev/deployment={}"  # engine pods, not the profiler
ENGINE_METRICS = EngineMetricsReader()


@dataclass(frozen=True)
class Step:
    concurrency: int
    seconds: float


@dataclass
class Sample:
    setup: str
    t_s: float
    offered: int
    replicas: int
    ready: int
    gpus: int


# slmpack's set-up shares each GPU by MPS in this many slots.
SLOTS_PER_GPU = 2


@dataclass
class Request:
    setup: str
    started_s: float
    ended_s: float
    ok: bool
    output_tokens: int
    itl_ms: list[float]
    error: str = ""


def parse_steps(text: str) -> list[Step]:
    return [Step(int(c), float(s)) for c, s in (part.split(":") for part in text.split(","))]


def engine_spec(name: str, **spec) -> dict:
    """The CPU example's engine, profiling and resources, with requests small enough for four replicas on two
    cores (the engines share the cores whatever they request)."""
    example = yaml.safe_load((ROOT / "examples/slmdeployment-cpu.yaml").read_text())
    body = {**example["spec"], "resources": {"requests": {"cpu": "100m", "memory": "1Gi"}, "limits": {"memory": "6Gi"}},
            **spec}
    return {"apiVersion": "slmpack.dev/v1alpha1", "kind": "SLMDeployment", "metadata": {"name": name, "namespace": NS},
            "spec": body}


def gpu_node(gpus: int, sharing: str, replicas: int, policy: str) -> None:
    """Restart the emulated device plugin with these GPUs: its labels and the node's nvidia.com/gpu follow."""
    env = {"SLMPACK_GPUS": str(gpus), "SLMPACK_GPU_SHARING": sharing, "SLMPACK_GPU_REPLICAS": str(replicas),
           "SLMPACK_GPU_ALLOCATION_POLICY": policy}
    sh("env", *[f"{k}={v}" for k, v in env.items()], "make", "-s", "-C", str(ROOT), "fake-gpu")
    capacity = str(gpus * replicas)
    wait(lambda: (get("node", "localhost", namespace="default") or {}).get("status", {}).get("allocatable", {})
         .get("nvidia.com/gpu") == capacity, 120, f"nvidia.com/gpu {capacity} allocatable")


def gpu_publisher(log: Path) -> subprocess.Popen:
    """The exporter on the host, as root, publishing the GPUs the kubelet gave each engine pod in the release's
    namespace, where the operator reads them: the chart's exporter runs as non-root in devMode.cpu and may not
    connect to the kubelet's root-owned PodResources socket."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "slmpack.cli", "exporter", "--address", "127.0.0.1", "--port", "19411",
             "--fake-devices", "1:1", "--node-name", "localhost", "--gpu-assignments-interval-seconds", "2",
             "--gpu-assignments-namespace", scenario.SYSTEM_NS,
             "--pod-resources-socket", str(ROOT / ".cluster/kubelet/pod-resources/kubelet.sock")],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "KUBECONFIG": scenario.KUBECONFIG})


def pods_of(name: str) -> list[dict]:
    return items("pods", selector=SELECTOR.format(name))


def gpus_held(pods: list[dict]) -> int:
    published = gpus_by_pod_uid([get("configmap", config_map_name("localhost"), namespace=scenario.SYSTEM_NS) or {}])
    uuids: set[str] = set()
    unknown = 0
    for pod in pods:
        held = published.get(pod["metadata"]["uid"])
        if held:
            uuids.update(held)
        elif pod["status"].get("phase") in ("Pending", "Running"):
            unknown += 1
    return len(uuids) + unknown


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def engine_load(pod: dict, port: int) -> float | None:
    """Requests running + waiting, read as slmpack's autoscaler reads them; None when the engine does not answer."""
    ip = pod["status"].get("podIP")
    if not ip:
        return None

    async def read():
        async with httpx.AsyncClient() as client:
            return await ENGINE_METRICS.read(client, pod["metadata"]["name"], f"http://{ip}:{port}/metrics")

    reading = asyncio.run(read())  # the sampler's own thread has no event loop
    return reading.load.load if reading.load else None


class Sampler(threading.Thread):
    """Every 5 s: the deployment's replicas, ready replicas and GPUs held; with an Hpa, its sync every 15 s."""

    def __init__(self, setup: str, name: str, started: float, offered, hpa: Hpa | None = None):
        super().__init__(daemon=True)
        self.setup, self.deployment, self.started, self.offered, self.hpa = setup, name, started, offered, hpa
        self.samples: list[Sample] = []
        self.decisions: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        last_sync = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            pods = [p for p in pods_of(self.deployment) if not p["metadata"].get("deletionTimestamp")]
            self.samples.append(Sample(self.setup, round(now - self.started, 1), self.offered(), len(pods),
                                       sum(ready(p) for p in pods), gpus_held(pods)))
            if self.hpa and now - last_sync >= 15:
                last_sync = now
                self.hpa_sync(now, pods)
            self.stop.wait(5)

    def hpa_sync(self, now: float, pods: list[dict]) -> None:
        current = (get("slmd", self.deployment) or {}).get("spec", {}).get("packs", 1)
        samples = [PodSample(p["metadata"]["name"], p["status"].get("phase", "Pending"),
                             engine_load(p, 8000) if ready(p) else None) for p in pods]
        wanted = self.hpa.sync(now - self.started, current, samples)
        if wanted != current:
            kubectl("scale", "-n", NS, f"slmd/{self.deployment}", f"--replicas={wanted}")
            self.decisions.append({"t_s": round(now - self.started, 1), "from": current, "to": wanted,
                                   "loads": [s.value for s in samples]})


async def ramp(setup: str, url: str, model: str, steps: list[Step], started: float, level: list[int],
               output_tokens: int) -> list[Request]:
    """A closed loop whose concurrency follows the steps: a client leaves after its request when the level drops."""
    endpoint = Endpoint(url, model)
    done: list[Request] = []
    limits = httpx.Limits(max_connections=max(s.concurrency for s in steps) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits) as client:
        running: set[asyncio.Task] = set()
        counter = iter(range(10**9))

        async def client_loop(slot: int) -> None:
            while slot < level[0]:
                n = next(counter)
                began = time.monotonic()
                result = await stream_completion(client, endpoint, synthetic_prompt(32, n), output_tokens)
                done.append(Request(setup, round(began - started, 2), round(time.monotonic() - started, 2),
                                    result.ok, result.output_tokens, [round(g * 1000, 1) for g in result.token_gaps_s],
                                    result.error or ""))

        for step in steps:
            level[0] = step.concurrency
            alive = {t for t in running if not t.done()}
            for slot in range(len(alive), step.concurrency):
                alive.add(asyncio.create_task(client_loop(slot)))
            running = alive
            print(f"    {setup}: {step.concurrency} concurrent for {step.seconds:.0f} s", flush=True)
            await asyncio.sleep(step.seconds)
        level[0] = 0
        await asyncio.gather(*running)
    return done


def run_setup(setup: str, name: str, body: dict, steps: list[Step], hpa: Hpa | None) -> dict:
    kubectl("apply", "-f", "-", input=json.dumps(body))

    def progress() -> str:
        status = (get("slmd", name) or {}).get("status", {})
        return f"{status.get('phase')} {status.get('profilingPhase') or ''} {status.get('readyReplicas')}"

    wait(lambda: (get("slmd", name) or {}).get("status", {}).get("phase") == "Ready", 1800, f"{name} Ready", 10,
         progress)
    ready_status = get("slmd", name)["status"]
    service = get("service", name)
    url = f"http://{service['spec']['clusterIP']}:8000"
    started = time.monotonic()
    level = [0]
    sampler = Sampler(setup, name, started, lambda: level[0], hpa)
    sampler.start()
    requests = asyncio.run(ramp(setup, url, name, steps, started, level, output_tokens=16))
    sampler.stop.set()
    sampler.join(30)
    events = [e for e in items("events") if e["involvedObject"].get("name") == name
              and e["reason"] in ("ScaledUp", "ScaledDown")]
    decisions = sampler.decisions or [{"t_s": None, "reason": e["reason"], "message": e["message"]} for e in events]
    kubectl("delete", "slmd", name, "-n", NS, "--wait=true")
    wait(lambda: not pods_of(name), 300, f"{name}'s pods gone")
    return {"samples": sampler.samples, "requests": requests, "decisions": decisions, "status": ready_status}


def held_seconds(samples: list[Sample], value) -> float:
    """The integral of value(sample) over the samples' own times: each sample holds until the next one is
    taken (the sampler's period drifts from 5 s to 5.6 s under load), and the last one ends the run."""
    return sum(value(a) * (b.t_s - a.t_s) for a, b in zip(samples, samples[1:], strict=False))


def packed_gpu_seconds(samples: list[Sample], slots_per_gpu: int) -> float:
    """GPU-seconds of the same replica timeline with its pods packed `slots_per_gpu` to a GPU: what the HPA would
    have held on slmpack's packed slots. On this test bed the engines run on the CPU whatever GPU slot they hold, so
    the HPA's load per pod, and so its timeline, would be the same."""
    return held_seconds(samples, lambda s: math.ceil(s.replicas / slots_per_gpu))


def summarize(samples: list[Sample], requests: list[Request], steps: list[Step]) -> dict:
    gaps = [g for r in requests if r.ok for g in r.itl_ms]
    gpu_seconds = round(held_seconds(samples, lambda s: s.gpus))
    duration = samples[-1].t_s - samples[0].t_s
    bounds, at = [], 0.0
    for step in steps:
        bounds.append((at, at + step.seconds, step.concurrency))
        at += step.seconds
    per_step = []
    for low, high, concurrency in bounds:
        in_step = [s for s in samples if low <= s.t_s < high]
        step_gaps = [g for r in requests if r.ok and low <= r.started_s < high for g in r.itl_ms]
        tokens = sum(r.output_tokens for r in requests if r.ok and low <= r.ended_s < high)
        per_step.append({"concurrency": concurrency, "from_s": low, "to_s": high,
                         "max_gpus": max((s.gpus for s in in_step), default=0),
                         "mean_gpus": round(float(np.mean([s.gpus for s in in_step])), 2) if in_step else 0,
                         "max_replicas": max((s.replicas for s in in_step), default=0),
                         "tokens_per_s": round(tokens / (high - low), 1),
                         "p99_itl_ms": round(float(np.percentile(step_gaps, 99)), 1) if step_gaps else None})
    return {"requests": len(requests), "failed": sum(not r.ok for r in requests),
            "errors": sorted({r.error for r in requests if not r.ok})[:5],
            "tokens": sum(r.output_tokens for r in requests if r.ok),
            "gpu_seconds": gpu_seconds, "max_gpus": max(s.gpus for s in samples),
            "mean_gpus": round(gpu_seconds / duration, 2) if duration else None,
            "p50_itl_ms": round(float(np.percentile(gaps, 50)), 1),
            "p99_itl_ms": round(float(np.percentile(gaps, 99)), 1),
            "per_step": per_step}


def plot(samples: list[Sample], requests: list[Request], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (load, gpus, itl) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for setup, color in (("slmpack", "tab:green"), ("hpa", "tab:red")):
        mine = [s for s in samples if s.setup == setup]
        t = [s.t_s for s in mine]
        if setup == "slmpack":
            load.step(t, [s.offered for s in mine], where="post", color="black", label="offered concurrency")
        load.step(t, [s.replicas for s in mine], where="post", color=color, linestyle="--", label=f"{setup} replicas")
        gpus.step(t, [s.gpus for s in mine], where="post", color=color, label=f"{setup} GPUs held")
        done = [r for r in requests if r.setup == setup and r.ok and r.itl_ms]
        windows = np.arange(0, max(t) + 30, 30)
        p99 = [np.percentile([g for r in done if w <= r.ended_s < w + 30 for g in r.itl_ms] or [np.nan], 99)
               for w in windows]
        itl.plot(windows + 15, p99, color=color, marker=".", label=f"{setup} p99 ITL (30 s windows)")
    load.set_ylabel("concurrency / replicas")
    gpus.set_ylabel("GPUs held")
    itl.set_ylabel("ms")
    itl.set_xlabel("seconds into the ramp")
    for axis in (load, gpus, itl):
        axis.legend(loc="upper right", fontsize=8)
        axis.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M on vLLM CPU: slmpack's autoscaler vs an HPA with one replica per GPU")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def hpa_on_packed_slots(samples: list[Sample], slots_per_gpu: int) -> dict:
    """The second baseline: the HPA's own replica timeline on slmpack's packed slots, so that the table separates
    packing's share of the saving from the autoscaler's."""
    return {"gpu_seconds": round(packed_gpu_seconds(samples, slots_per_gpu)), "slots_per_gpu": slots_per_gpu,
            "derived_from": "the hpa samples' replicas, ceil(replicas / slots_per_gpu) GPUs, over their times"}


def recompute(out: Path) -> int:
    """summary.json again from the raw files, with the figures the current code derives."""
    summary = json.loads((out / "summary.json").read_text())
    with (out / "timeline.csv").open() as f:
        samples = [Sample(r["setup"], float(r["t_s"]), int(r["offered"]), int(r["replicas"]), int(r["ready"]),
                          int(r["gpus"])) for r in csv.DictReader(f)]
    requests = [Request(**r) for r in json.loads((out / "requests.json").read_text())]
    steps = [Step(**s) for s in summary["steps"]]
    for setup in ("slmpack", "hpa"):
        mine = [s for s in samples if s.setup == setup]
        summary[setup].update(summarize(mine, [r for r in requests if r.setup == setup], steps))
    summary["hpa_on_packed_slots"] = hpa_on_packed_slots([s for s in samples if s.setup == "hpa"], SLOTS_PER_GPU)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k]["gpu_seconds"] for k in ("slmpack", "hpa", "hpa_on_packed_slots")}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="4:180,12:240,24:300,12:240,4:300",
                        help="offered concurrency:seconds, in order")
    parser.add_argument("--gpus", type=int, default=4, help="emulated GPUs on the node, for both setups")
    parser.add_argument("--cooldown", type=int, default=120,
                        help="slmpack's scaleInCooldownSeconds and the HPA's downscale stabilization window")
    parser.add_argument("--target-knee-percent", type=int, default=80)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/autoscaling")
    parser.add_argument("--skip-setup", action="store_true", help="the cluster and the chart are already up")
    parser.add_argument("--hpa-only", action="store_true",
                        help="run the HPA again; the slmpack run and its plan come from --out's files")
    parser.add_argument("--recompute", action="store_true",
                        help="run nothing: recompute summary.json from --out's timeline.csv and requests.json")
    args = parser.parse_args()
    steps = parse_steps(args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.recompute:
        return recompute(args.out)
    if not args.skip_setup:
        scenario.set_up_local_cluster()
        scenario.helm_install()
    annotator = gpu_publisher(args.out / "annotator.log")

    if args.hpa_only:  # the slmpack run of an earlier invocation, from its files
        before = json.loads((args.out / "summary.json").read_text())
        with (args.out / "timeline.csv").open() as f:
            s_samples = [Sample(r["setup"], float(r["t_s"]), int(r["offered"]), int(r["replicas"]), int(r["ready"]),
                                int(r["gpus"])) for r in csv.DictReader(f) if r["setup"] == "slmpack"]
        s_requests = [Request(**r) for r in json.loads((args.out / "requests.json").read_text())
                      if r["setup"] == "slmpack"]
        slmpack = {"status": {"plan": before["slmpack"]["plan"], "profile": before["profile"]},
                   "decisions": before["slmpack"]["decisions"]}
    else:
        print("--> slmpack: MPS, 2 slots per GPU, packed; profiled, then autoscaled", flush=True)
        gpu_node(args.gpus, "mps", SLOTS_PER_GPU, "packed")
        autoscaling = {"minPacks": 1, "maxPacks": args.gpus, "targetKneePercent": args.target_knee_percent,
                       "scaleInCooldownSeconds": args.cooldown, "periodSeconds": 15}
        slmpack = run_setup("slmpack", "ramp-slmpack", engine_spec("ramp-slmpack", autoscaling=autoscaling), steps,
                            None)
        s_samples, s_requests = slmpack["samples"], slmpack["requests"]
    plan, profile = slmpack["status"]["plan"], slmpack["status"]["profile"]
    per_replica = plan["kneeBatchSize"] * args.target_knee_percent / 100

    print(f"--> HPA: whole GPUs, one replica per GPU, target {per_replica:g} requests per pod", flush=True)
    gpu_node(args.gpus, "none", 1, "distributed")
    body = engine_spec("ramp-hpa", replicas=1, packs=1)
    # The same engine per replica as slmpack's plan, so that only the scaling differs: a fixed spec.replicas takes
    # no plan from a profile, so the plan's batch limit and CPU threads are given by hand.
    engine = body["spec"]["engine"]
    engine["extraArgs"] = [*engine.get("extraArgs", []), f"--max-num-seqs={plan['maxNumSeqs']}"]
    if plan.get("cpuThreadsPerReplica"):
        engine["env"] = [{"name": "OMP_NUM_THREADS", "value": str(plan["cpuThreadsPerReplica"])}]
    hpa = run_setup("hpa", "ramp-hpa", body, steps,
                    Hpa(target=per_replica, min_replicas=1, max_replicas=args.gpus, downscale_window_s=args.cooldown))
    h_samples, h_requests = hpa["samples"], hpa["requests"]
    annotator.terminate()
    annotator.wait(10)
    samples, requests = s_samples + h_samples, s_requests + h_requests
    with (args.out / "timeline.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(samples[0])))
        writer.writeheader()
        writer.writerows(asdict(s) for s in samples)
    (args.out / "requests.json").write_text(json.dumps([asdict(r) for r in requests]))
    summary = {"command": " ".join(sys.argv), "environment": environment(None), "cores": len(os.sched_getaffinity(0)),
               "steps": [asdict(s) for s in steps], "cooldown_s": args.cooldown, "profile": profile,
               "target_per_replica": per_replica,
               "slmpack": {**summarize(s_samples, s_requests, steps), "plan": plan, "decisions": slmpack["decisions"]},
               "hpa": {**summarize(h_samples, h_requests, steps), "plan": hpa["status"]["plan"],
                       "engine": body["spec"]["engine"], "decisions": hpa["decisions"]},
               "hpa_on_packed_slots": hpa_on_packed_slots(h_samples, SLOTS_PER_GPU)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(samples, requests, args.out / "timeline.png")
    for setup in ("slmpack", "hpa"):
        s = summary[setup]
        print(f"{setup}: {s['gpu_seconds']} GPU-s, max {s['max_gpus']} GPUs, p99 ITL {s['p99_itl_ms']} ms, "
              f"{s['failed']}/{s['requests']} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
