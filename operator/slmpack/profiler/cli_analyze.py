"""`slmpack analyze FILE...`: the knee and plots from existing `vllm bench serve` results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE[:B]", help="result JSON files, one per batch size")
    parser.add_argument("--format", choices=["table", "json"], default="table",
                        help="json prints the report with snake_case keys (knee.batch_size, points[], ...)")
    parser.add_argument("--write-profile", metavar="NAMESPACE/NAME",
                        help="also write the report into this SLMProfile's status, so no profiling is needed")
    parser.add_argument("--out", type=Path, default=None, help="write plots (PNG and SVG) here")
    parser.add_argument("--rule", choices=["bca", "kneedle"], default="bca")
    parser.add_argument("--efficiency-threshold-percent", type=int, default=20)
    parser.add_argument("--latency-factor", type=int, default=5)
    parser.add_argument("--slo-p99-itl-ms", type=int, default=None)
    parser.add_argument("--slo-p99-ttft-ms", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    from slmpack.api.models import KneeRule, LatencySLO, SLMProfileStatus, SweepInfo
    from slmpack.core.knee import KneeParams, NoKneeError, find_knee
    from slmpack.profiler.bench_results import BenchResultError, load_points
    from slmpack.profiler.report import plot, table

    try:
        points = load_points(args.files)
        params = KneeParams(KneeRule(args.rule), args.efficiency_threshold_percent, args.latency_factor,
                            LatencySLO(p99_itl_ms=args.slo_p99_itl_ms, p99_ttft_ms=args.slo_p99_ttft_ms))
        status = SLMProfileStatus(phase="Ready", points=points, knee=find_knee(points, params),
                                  sweep=SweepInfo(mode="full", probes=len(points)))
    except (BenchResultError, NoKneeError) as error:
        print(f"slmpack analyze: {error}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(status.model_dump_json(exclude_none=True, indent=1))
    else:
        print(table(status))
    if args.write_profile:
        from datetime import UTC, datetime

        from slmpack.core import profile_status
        from slmpack.profiler.cli_profile import status_writer

        status.message = f"imported from {len(args.files)} vllm bench serve result files"
        status.conditions = profile_status.measured([], status.message, datetime.now(UTC))
        write, _ = status_writer(args.write_profile)
        write(status.to_wire())
    if args.out:
        paths = plot(status, args.out, title="vllm bench serve results")
        print(f"plots: {', '.join(map(str, paths))}", file=sys.stderr)
    return 0
