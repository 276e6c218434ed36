"""From per-request measurements to one profile point (pure).

The load generator records what each request saw; this turns a batch of them into
the percentiles and throughputs a `ProfilePoint` holds, in the manner of vLLM's
`bench serve` (calculate_metrics): time units in the field names, failures counted,
never raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from slmpack.api.models import Percentiles, ProfilePoint


@dataclass(frozen=True)
class RequestResult:
    """What one streamed completion saw. `error` is set instead of raising."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    token_gaps_s: Sequence[float] = field(default_factory=tuple)
    e2e_s: float | None = None
    error: str | None = None
    finished_at_s: float | None = None  # perf_counter() when the stream ended, for windowed throughput

    @property
    def ok(self) -> bool:
        return self.error is None


def percentiles_ms(seconds: Sequence[float]) -> Percentiles | None:
    if len(seconds) == 0:
        return None
    ms = np.asarray(seconds, dtype=float) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return Percentiles(mean=round(float(ms.mean()), 3), p50=round(float(p50), 3), p90=round(float(p90), 3),
                       p99=round(float(p99), 3))


def summarize(batch_size: int, results: Sequence[RequestResult], duration_s: float) -> ProfilePoint:
    """One point of the curve from the requests measured at this batch size."""
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    if not done:
        reason = failed[0].error if failed else "no request completed"
        return ProfilePoint(batch_size=batch_size, failed=len(failed), error=reason,
                            duration_s=round(duration_s, 3))
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in done
            if r.output_tokens > 1 and r.e2e_s is not None and r.ttft_s is not None]
    return ProfilePoint(
        batch_size=batch_size,
        completed=len(done),
        failed=len(failed),
        duration_s=round(duration_s, 3),
        request_throughput_per_s=round(len(done) / duration_s, 4),
        output_throughput_tokens_per_s=round(output / duration_s, 2),
        total_throughput_tokens_per_s=round((output + prompt) / duration_s, 2),
        ttft_ms=percentiles_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        itl_ms=percentiles_ms([gap for r in done for gap in r.token_gaps_s]),
        tpot_ms=percentiles_ms(tpot),
        e2e_latency_ms=percentiles_ms([r.e2e_s for r in done if r.e2e_s is not None]),
    )


def window_throughputs(results: Sequence[RequestResult], started_at_s: float, window: int) -> list[float]:
    """Output tokens/s of each run of `window` consecutive completions (batch means), in completion order.

    In a closed loop of B clients a window of B completions is one turn of every client,
    so the windows are close to independent samples of the steady-state throughput.
    """
    done = sorted((r for r in results if r.ok and r.finished_at_s is not None), key=lambda r: r.finished_at_s)
    samples, begin = [], started_at_s
    for end in range(window, len(done) + 1, window):
        chunk = done[end - window:end]
        finished = chunk[-1].finished_at_s
        if finished > begin:
            samples.append(sum(r.output_tokens for r in chunk) / (finished - begin))
        begin = finished
    return samples
