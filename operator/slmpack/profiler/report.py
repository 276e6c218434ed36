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
        mark = "  <- knee" if p.batch_size == knee else ""
        note = p.error or p.energy_note or ""
        lines.append(f"{p.batch_size:>6} {_fmt(p.request_throughput_per_s, '.2f'):>8} "
                     f"{_fmt(p.output_throughput_tokens_per_s):>9} "
                     f"{_fmt(p.ttft_ms.p99 if p.ttft_ms else None):>9} {_fmt(p.itl_ms.mean if p.itl_ms else None):>9} "
                     f"{_fmt(p.itl_ms.p99 if p.itl_ms else None):>8} {_fmt(p.kv_cache_usage_percent):>6} "
                     f"{_fmt(p.energy_per_token_joules, '.4f'):>8}  {note}{mark}")
    if status.knee:
        lines.append(f"knee: batch {status.knee.batch_size} by {status.knee.rule}; next: {status.knee.reason}")
    if status.sweep:
        lines.append(f"sweep: {status.sweep.mode}, {status.sweep.probes} probes, {_fmt(status.sweep.duration_s)} s")
    for r in status.replication:
        ci = r.throughput_spread
        interval = (f" [{_fmt(ci.ci_low)}, {_fmt(ci.ci_high)}] at {ci.confidence_percent}%"
                    if ci and ci.ci_low is not None else "")
        lines.append(f"replicas {r.replicas} x batch {r.batch_size_per_replica}: "
                     f"{_fmt(r.aggregate_throughput_tokens_per_s)} tok/s aggregate{interval} over "
                     f"{len(r.runs_tokens_per_s)} runs, p99 ITL {_fmt(r.p99_itl_ms)} ms"
                     + (f"  ({r.error})" if r.error else ""))
    if status.sharing_regime:
        lines.append(f"sharing: {status.sharing_regime}")
    if status.recommended_replicas:
        lines.append(f"recommended: {status.recommended_replicas} replica(s) per GPU"
                     + (f": {status.decision.explanation}" if status.decision else ""))
    if status.phase == "Failed":
        lines.append(f"FAILED: {status.message}")
    return "\n".join(lines)


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
    ax.plot([p.batch_size for p in ok], [p.output_throughput_tokens_per_s for p in ok], "o-", label="measured")
    if status.knee:
        ax.axvline(status.knee.batch_size, color="tab:red", ls="--", label=f"knee B={status.knee.batch_size}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set(xlabel="batch size (concurrent requests)", ylabel="output tokens/s", title="Throughput vs batch")
    ax.legend()

    ax = axes[1]
    with_itl = [p for p in ok if p.itl_ms and p.itl_ms.mean]
    ax.plot([p.output_throughput_tokens_per_s for p in with_itl], [p.itl_ms.mean for p in with_itl], "o",
            color="tab:gray", label="probes")
    for p in with_itl:
        ax.annotate(str(p.batch_size), (p.output_throughput_tokens_per_s, p.itl_ms.mean), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")
    frontier = sorted(pareto_frontier(ok), key=lambda p: p.output_throughput_tokens_per_s)
    ax.plot([p.output_throughput_tokens_per_s for p in frontier], [p.itl_ms.mean for p in frontier], "-",
            color="tab:blue", label="Pareto frontier")
    ax.set(xlabel="output tokens/s", ylabel="mean ITL (ms)", title="Latency vs throughput")
    ax.legend()

    if status.replication:
        ax = axes[2]
        measured = [r for r in status.replication if r.aggregate_throughput_tokens_per_s]
        ax.bar([r.replicas for r in measured], [r.aggregate_throughput_tokens_per_s for r in measured],
               color=["tab:green" if r.replicas == status.recommended_replicas else "tab:gray" for r in measured])
        ax.set(xlabel="co-located replicas", ylabel="aggregate output tokens/s", title="Replicas per GPU",
               xticks=[r.replicas for r in measured])
    paths = [out / "profile.png", out / "profile.svg"]
    for path in paths:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return paths
