"""`slmpack profile`: measure an engine, find the knee, measure co-located replicas, report."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group("engine")
    engine.add_argument("--engine", choices=["vllm", "openai"], default="vllm",
                        help="vllm starts servers here; openai measures --base-url endpoints that already run")
    engine.add_argument("--model", help="model id or path (vllm), or served name (openai; default: asked)")
    engine.add_argument("--base-url", action="append", default=[], help="openai: an endpoint (repeatable)")
    engine.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    engine.add_argument("--dtype", default="auto")
    engine.add_argument("--max-model-len", type=int, default=2048)
    engine.add_argument("--engine-arg", action="append", default=[], help="extra argument for vllm (repeatable)")
    engine.add_argument("--cpu-kv-cache-space-gib", type=int, default=1)
    engine.add_argument("--gpu-memory-mib", type=int, default=None, help="GPU memory, for the memory model")
    engine.add_argument("--sharing-slots", type=int, default=None,
                        help="the node's pods per GPU (nvidia.com/gpu.replicas, R): the device plugin's MPS caps "
                             "every engine at memory/R")
    engine.add_argument("--revision", default=None, help="the Hugging Face revision of --model")
    engine.add_argument("--port-base", type=int, default=18100)
    engine.add_argument("--restart-per-batch", action="store_true",
                        help="restart vLLM with --max-num-seqs B at every probe instead of varying concurrency")
    engine.add_argument("--sharing", choices=["mps", "time-slicing", "none"], default="time-slicing",
                        help="how the deployment shares a GPU; mps runs co-located replicas as MPS clients, "
                             "none (a GPU per replica) measures one replica only")
    engine.add_argument("--placement", choices=["device-plugin", "dra", "pack-pod"], default="device-plugin",
                        help="whose MPS daemon caps the replicas: the device plugin's caps every client at 1/R; "
                             "a DRA claim's sets no limits, so each replica gets the plan's caps in its env")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--batch-sizes", help="comma-separated batch sizes: a full sweep of exactly these")
    sweep.add_argument("--min-batch", type=int, default=1)
    sweep.add_argument("--max-batch", type=int, default=256)
    sweep.add_argument("--full", action="store_true", help="probe the whole default grid, not adaptively")
    sweep.add_argument("--input-tokens", type=int, default=128)
    sweep.add_argument("--output-tokens", type=int, default=128)
    sweep.add_argument("--requests-per-point", type=int, default=0,
                       help="a fixed request count per probe; 0 stops once the throughput is known to --precision")
    sweep.add_argument("--max-replicas", type=int, default=2)
    stats = parser.add_argument_group("statistics")
    stats.add_argument("--confidence-percent", type=int, default=95,
                       help="confidence of the intervals and of the test that k > 1 replicas beat one")
    stats.add_argument("--precision-percent", type=int, default=5,
                       help="stop a probe, and a replica count's repeats, at this relative interval half width")
    stats.add_argument("--min-repeats", type=int, default=3, help="runs of each replica count, at least")
    stats.add_argument("--max-repeats", type=int, default=5, help="runs of each replica count, at most")
    stats.add_argument("--replication-budget-seconds", type=int, default=0,
                       help="after --min-repeats runs each, stop the replica counts' runs once this is spent (0: none)")
    knee = parser.add_argument_group("knee")
    knee.add_argument("--rule", choices=["bca", "kneedle"], default="bca")
    knee.add_argument("--efficiency-threshold-percent", type=int, default=20)
    knee.add_argument("--latency-factor", type=int, default=5)
    knee.add_argument("--slo-p99-itl-ms", type=int, default=None)
    knee.add_argument("--slo-p99-ttft-ms", type=int, default=None)
    parser.add_argument("--held-slots", type=Path, metavar="DIR",
                        help="the directory shared with the pod's slot holders (in a Job): measure only the "
                             "replicas whose slots are on this container's GPU")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("profile-out"), help="report.json and plots go here")
    out.add_argument("--write-profile", metavar="NAMESPACE/NAME",
                     help="write progress and the result into this SLMProfile's status (in a Job)")


def parse_batches(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--batch-sizes must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from slmpack.api.models import KneeRule, LatencySLO
    from slmpack.core import profile_status
    from slmpack.core.knee import KneeParams
    from slmpack.core.stats import Precision
    from slmpack.core.sweep import batch_grid
    from slmpack.profiler.engines import EngineError, VllmEngine, openai_endpoints
    from slmpack.profiler.loadgen import Workload
    from slmpack.profiler.report import plot, table
    from slmpack.profiler.run import ProfileSettings, profile

    try:
        grid = batch_grid(args.min_batch, args.max_batch, parse_batches(args.batch_sizes))
        windows = Precision(args.confidence_percent, args.precision_percent, 3, 12)
        repeats = Precision(args.confidence_percent, args.precision_percent, args.min_repeats, args.max_repeats)
    except ValueError as error:
        print(f"slmpack profile: {error}", file=sys.stderr)
        return 2
    gpu_slots, max_replicas = None, args.max_replicas
    if args.held_slots:
        from slmpack.core.gpu_pin import profiling_slots
        from slmpack.profiler.slots import holder_gpus

        max_replicas, gpu_slots = profiling_slots(os.environ.get("NVIDIA_VISIBLE_DEVICES", ""),
                                                  holder_gpus(args.held_slots, args.max_replicas - 1), max_replicas)
        log.info("GPU slots: %s", gpu_slots)
    settings = ProfileSettings(
        grid=grid, adaptive=not (args.batch_sizes or args.full),
        workload=Workload(args.input_tokens, args.output_tokens),
        knee=KneeParams(KneeRule(args.rule), args.efficiency_threshold_percent, args.latency_factor,
                        LatencySLO(p99_itl_ms=args.slo_p99_itl_ms, p99_ttft_ms=args.slo_p99_ttft_ms)),
        requests_per_point=args.requests_per_point, max_replicas=max_replicas, port_base=args.port_base,
        gpu_memory_mib=args.gpu_memory_mib, restart_per_batch=args.restart_per_batch, windows=windows,
        repeats=repeats, replication_budget_seconds=args.replication_budget_seconds, sharing=args.sharing,
        placement=args.placement,
        sharing_slots=args.sharing_slots, gpu_slots=gpu_slots)

    # SIGTERM (a Job's pod deleted, `timeout`) unwinds like Ctrl-C, so the engines started in
    # their own process groups are stopped by the run's cleanup instead of outliving it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    writer, resume, own_policy = status_writer(args.write_profile)
    if own_policy is not None:  # the knee and decision the profile shows are at its own policy's SLO
        from slmpack.core.replication import knee_params

        settings.own_knee = knee_params(own_policy)
    bar = tqdm(total=0, desc="profiling", unit="probe", disable=not sys.stderr.isatty())

    def report(status) -> None:
        if status.progress:
            bar.total = status.progress.probes_planned
            bar.n = status.progress.probes_done
        bar.set_postfix_str(status.message or "")
        bar.refresh()
        writer(status.to_wire())

    try:
        if args.engine == "openai":
            if not args.base_url:
                print("slmpack profile: --engine openai needs --base-url", file=sys.stderr)
                return 2
            status = profile(None, settings, report, openai_endpoints(args.base_url, args.model), resume=resume)
        else:
            if not args.model:
                print("slmpack profile: --model is required with --engine vllm", file=sys.stderr)
                return 2
            engine = VllmEngine(args.model, args.device, args.max_model_len, args.dtype, args.engine_arg,
                                args.cpu_kv_cache_space_gib, args.revision)
            status = profile(engine, settings, report, resume=resume)
    except EngineError as error:
        print(f"slmpack profile: {error}", file=sys.stderr)
        writer({"phase": "Failed", "profilingPhase": "Failed", "message": str(error)})
        return 1
    finally:
        bar.close()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(status.model_dump_json(by_alias=True, exclude_none=True, indent=1))
    if status.points:
        plot(status, args.out, title=f"{args.model or args.base_url[0]} ({args.device})")
    print(table(status))
    print(f"report: {args.out / 'report.json'}; plots: {args.out / 'profile.png'}")
    try:
        writer(status.to_wire(), final=True)
    except ProfileNotWritten as error:
        # A result the operator never sees is a failed Job, so the deployment says so instead of waiting.
        print(f"slmpack profile: {error}", file=sys.stderr)
        return 3
    return 0 if status.phase == "Ready" and not profile_status.extension_failed(status.conditions) else 1


class ProfileNotWritten(RuntimeError):
    """The final result could not be written to the SLMProfile."""


def status_writer(target: str | None, attempts: int = 3, retry_seconds: float = 2.0):
    """Writes SLMProfile status when running as the profiling Job, and reads what an earlier run of the
    Job measured, to resume from, and the profile's own profiling policy; a no-op and Nones otherwise.

    Progress writes that fail are logged and skipped; the final write is retried, then raises."""
    if not target:
        return (lambda status, final=False: None), None, None
    from slmpack.adapters.kube import Kube, load_config
    from slmpack.api.models import ProfilingSpec, SLMProfileStatus

    namespace, _, name = target.partition("/")
    if not name:
        raise SystemExit("--write-profile must be NAMESPACE/NAME")
    kube = Kube(load_config())

    def write(status: dict, final: bool = False) -> None:
        for attempt in range(1, (attempts if final else 1) + 1):
            try:
                kube.patch_profile_status(namespace, name, without_empty_strings(status))
                return
            except Exception as error:  # progress must not stop the measurement
                log.warning("could not write SLMProfile %s status (attempt %d): %s", target, attempt, error)
                last = error
                if final and attempt < attempts:
                    time.sleep(retry_seconds * attempt)
        if final:
            raise ProfileNotWritten(f"could not write the result to SLMProfile {target}: {last}")

    try:
        stored = kube.get_profile(namespace, name) or {}
    except Exception as error:
        log.warning("could not read SLMProfile %s to resume from: %s", target, error)
        stored = {}
    policy = (stored.get("spec") or {}).get("profiling")
    return (write, SLMProfileStatus.from_stored(stored["status"]) if stored.get("status") else None,
            ProfilingSpec.model_validate(policy) if policy else None)


def without_empty_strings(value):
    """The status with empty strings left out: the Kubernetes client sends "" as null, which a string field
    of the CRD's schema refuses, failing the whole write."""
    if isinstance(value, dict):
        return {k: without_empty_strings(v) for k, v in value.items() if v != ""}
    if isinstance(value, list):
        return [without_empty_strings(v) for v in value]
    return value
