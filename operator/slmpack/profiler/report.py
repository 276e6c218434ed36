"""Reports of a profile: a terminal table and plots (PNG and SVG). Kept apart from measuring."""

from __future__ import annotations

from pathlib import Path

from slmpack.api.models import SLMProfileStatus
from slmpack.core.knee import pareto_frontier


def _fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(status: SLMProfileStatus) -> str:
    """The curve, the knee and the replication run as plain text."""
    knee = status.knee.batch_size if status.knee else None
    lines = [f"{'batch':>6} {'req/s':>8} {'tok/s':>9} {'TTFT p99':>9} {'ITL mean':>9} {'ITL p99':>8} "
             f"{'KV %':>6} {'J/tok':>8}  note"]
    for p in status.points:
        failing = first_failing_probe(status)
        mark = ("  <- knee" if p.batch_size == knee else
                f"  <- first failing: {status.knee.reason}" if failing is not None and p is failing else "")
        note = p.error or p.energy_note or ""
        lines.append(f"{p.batch_size:>6} {_fmt(p.request_throughput_per_s, '.2f'):>8} "
                     f"{_fmt(p.output_throughput_tokens_per_s):>9} "
                     f"{_fmt(p.ttft_ms.p99 if p.ttft_ms else None):>9} {_fmt(p.itl_ms.mean if p.itl_ms else None):>9} "
                     f"{_fmt(p.itl_ms.p99 if p.itl_ms else None):>8} {_fmt(p.kv_cache_usage_percent):>6} "
                     f"{_fmt(p.energy_per_token_joules, '.4f'):>8}  {note}{mark}")
    if status.knee:
        lines.append(f"knee: batch {status.knee.batch_size} by {status.knee.rule}; next: {status.knee.reason}")
    if status.sweep:
        settled = sum(p.stopped_by == "verdict" for p in status.points)
        lines.append(f"sweep: {status.sweep.mode}, {status.sweep.probes} probes"
                     + (f" ({settled} stopped once their verdict was settled, before their precision)"
                        if settled else "")
                     + f"; the whole profile took {_fmt(status.sweep.duration_s)} s")
    for r in status.replication:
        ci = r.throughput_spread
        interval = (f" [{_fmt(ci.ci_low)}, {_fmt(ci.ci_high)}] at {ci.confidence_percent}%"
                    if ci and ci.ci_low is not None else "")
        lines.append(f"replicas {r.replicas} x batch {r.batch_size_per_replica}: "
                     f"{_fmt(r.aggregate_throughput_tokens_per_s)} tok/s aggregate{interval} over "
                     f"{len(r.runs_tokens_per_s)} runs"
                     + (f" of {r.requests_per_run} requests" if r.requests_per_run else "")
                     + f", p99 ITL {_fmt(r.p99_itl_ms)} ms"
                     + (f"  ({r.error})" if r.error else ""))
    if status.replication_stop == "TimeBudget":
        lines.append("replication: stopped by its time budget after the minimum runs; the intervals above are wider "
                     "than the precision asked for")
    if status.sharing_regime:
        lines.append(f"sharing: {status.sharing_regime}")
    if status.recommended_replicas:
        lines.append(f"recommended: {status.recommended_replicas} replica(s) per GPU"
                     + (f": {status.decision.explanation}" if status.decision else ""))
    if status.phase == "Failed":
        lines.append(f"FAILED: {status.message}")
    return "\n".join(lines)


def interval_arms(points) -> list[list[float]]:
    """Error-bar arms below and above each probe's throughput, from its interval (none where unknown)."""
    def arm(p, low: bool) -> float:
        spread = p.throughput_spread
        if spread is None or spread.ci_low is None or spread.ci_high is None or not spread.mean:
            return 0.0
        # The interval is of the windows' mean; scaled to the probe's own throughput figure.
        scale = p.output_throughput_tokens_per_s / spread.mean
        return max((spread.mean - spread.ci_low) if low else (spread.ci_high - spread.mean), 0.0) * scale

    return [[arm(p, True) for p in points], [arm(p, False) for p in points]]


def first_failing_probe(status: SLMProfileStatus):
    """The probe just above the knee, whose failure `knee.reason` gives, if one was probed."""
    larger = [p for p in status.points if status.knee and p.batch_size > status.knee.batch_size]
    return min(larger, key=lambda p: p.batch_size, default=None)


def wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def plot(status: SLMProfileStatus, out: Path, title: str = "") -> list[Path]:
    """Throughput vs batch (knee marked), latency vs throughput (frontier), replicas vs throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out.mkdir(parents=True, exist_ok=True)
    ok = [p for p in status.points if p.error is None and p.output_throughput_tokens_per_s]
    panels = 3 if status.replication else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), constrained_layout=True)
    fig.suptitle(title or "slmpack profile")

    ax = axes[0]
    batches = [p.batch_size for p in ok]
    throughputs = [p.output_throughput_tokens_per_s for p in ok]
    ax.errorbar(batches, throughputs, yerr=interval_arms(ok), fmt="o-", capsize=3, label="probes (95% interval)")
    if status.knee:
        ax.axvline(status.knee.batch_size, color="tab:red", ls="--", label=f"knee B={status.knee.batch_size}")
        failing = first_failing_probe(status)
        if failing is not None:
            ax.plot([failing.batch_size], [failing.output_throughput_tokens_per_s], "x", color="tab:red", ms=11,
                    mew=2, label=f"first failing probe B={failing.batch_size}")
            ax.annotate(wrap(status.knee.reason, 34), (failing.batch_size, failing.output_throughput_tokens_per_s),
                        # Below the curve's right end, which a curve rising to a plateau leaves empty.
                        xytext=(0.3, 0.08), textcoords="axes fraction", fontsize=7, color="tab:red",
                        arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 0.8})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_ylim(bottom=0)
    ax.set(xlabel="batch size (concurrent requests)", ylabel="output tokens/s", title="Throughput vs batch")
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1]
    with_itl = [p for p in ok if p.itl_ms and p.itl_ms.mean]
    ax.plot([p.output_throughput_tokens_per_s for p in with_itl], [p.itl_ms.mean for p in with_itl], "o",
            color="tab:gray", label="probes (batch size)")
    for p in with_itl:
        ax.annotate(str(p.batch_size), (p.output_throughput_tokens_per_s, p.itl_ms.mean), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")
    frontier = sorted(pareto_frontier(ok), key=lambda p: p.output_throughput_tokens_per_s)
    ax.plot([p.output_throughput_tokens_per_s for p in frontier], [p.itl_ms.mean for p in frontier], "-",
            color="tab:blue", label="Pareto frontier")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set(xlabel="output tokens/s", ylabel="mean ITL (ms)", title="Latency vs throughput")
    ax.legend(fontsize=8)

    if status.replication:
        ax = axes[2]
        at_knee = [r for r in status.replication if r.aggregate_throughput_tokens_per_s
                   and (status.knee is None or r.batch_size_per_replica == status.knee.batch_size)]
        spreads = [r.throughput_spread for r in at_knee]
        arms = [[max(r.aggregate_throughput_tokens_per_s - (s.ci_low if s and s.ci_low is not None else
                                                            r.aggregate_throughput_tokens_per_s), 0)
                 for r, s in zip(at_knee, spreads, strict=True)],
                [max((s.ci_high if s and s.ci_high is not None else r.aggregate_throughput_tokens_per_s)
                     - r.aggregate_throughput_tokens_per_s, 0) for r, s in zip(at_knee, spreads, strict=True)]]
        ax.bar([r.replicas for r in at_knee], [r.aggregate_throughput_tokens_per_s for r in at_knee], yerr=arms,
               capsize=4, color=["tab:green" if r.replicas == status.recommended_replicas else "tab:gray"
                                 for r in at_knee])
        ax.set_ylim(bottom=0)
        batch = f" at batch {status.knee.batch_size} each" if status.knee else ""
        ax.set(xlabel="co-located replicas", ylabel="aggregate output tokens/s (95% interval)",
               title=f"Replicas per GPU{batch}", xticks=[r.replicas for r in at_knee])
        if status.decision and status.decision.ratio is not None:
            d = status.decision
            adjusted = f", Holm p={d.p_value_adjusted:.3g}" if d.p_value_adjusted is not None else ""
            ax.text(0.03, 0.97, wrap(f"{d.best_candidate} vs 1 replica: {d.ratio:.2f}x, p={d.p_value:.3g}"
                                     f"{adjusted}; decided {d.replicas}", 40),
                    transform=ax.transAxes, va="top", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    paths = [out / "profile.png", out / "profile.svg"]
    for path in paths:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return paths
