"""Load the recorded curves in tests/data/curves/ as profile points."""

import json
from pathlib import Path

from slmpack.api.models import Percentiles, ProfilePoint

CURVES = Path(__file__).resolve().parents[1] / "data" / "curves"


def load_curve(name: str) -> list[ProfilePoint]:
    return [ProfilePoint.model_validate(p) for p in json.loads((CURVES / f"{name}.json").read_text())["points"]]


def curve_names() -> list[str]:
    return sorted(p.stem for p in CURVES.glob("*.json"))


def point(batch: int, tokens_per_s: float, itl_ms: float, p99_itl_ms: float | None = None,
          p99_ttft_ms: float | None = None, error: str | None = None) -> ProfilePoint:
    return ProfilePoint(batch_size=batch, output_throughput_tokens_per_s=tokens_per_s,
                        itl_ms=Percentiles(mean=itl_ms, p99=p99_itl_ms or itl_ms),
                        ttft_ms=Percentiles(p99=p99_ttft_ms), error=error)
