"""Read `vllm bench serve` result files into profile points (pure apart from reading the files).

The batch size of a file comes from, in order: a `FILE:B` argument, `max_concurrency`,
or a `max_num_seqs` / `batch_size` key (as `--metadata max_num_seqs=96` writes it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from slmpack.api.models import Percentiles, ProfilePoint

BATCH_KEYS = ("max_concurrency", "max_num_seqs", "batch_size")


class BenchResultError(ValueError):
    """A result file that cannot be read or does not fit with the others; the message names it."""


def split_argument(argument: str) -> tuple[Path, int | None]:
    path, sep, batch = argument.rpartition(":")
    if sep and batch.isdigit():
        return Path(path), int(batch)
    return Path(argument), None


def percentiles(result: dict, metric: str) -> Percentiles | None:
    values = {"mean": result.get(f"mean_{metric}_ms"), "p50": result.get(f"median_{metric}_ms"),
              "p90": result.get(f"p90_{metric}_ms"), "p99": result.get(f"p99_{metric}_ms")}
    return Percentiles(**values) if any(v is not None for v in values.values()) else None


def point_from_result(result: dict, batch: int) -> ProfilePoint:
    return ProfilePoint(
        batch_size=batch, completed=int(result.get("completed", 0)), failed=int(result.get("failed", 0) or 0),
        duration_s=result.get("duration"), request_throughput_per_s=result.get("request_throughput"),
        output_throughput_tokens_per_s=result.get("output_throughput"),
        total_throughput_tokens_per_s=result.get("total_token_throughput"),
        ttft_ms=percentiles(result, "ttft"), itl_ms=percentiles(result, "itl"), tpot_ms=percentiles(result, "tpot"),
        e2e_latency_ms=percentiles(result, "e2el"))


def batch_of(result: dict, given: int | None, name: str) -> int:
    if given is not None:
        return given
    for key in BATCH_KEYS:
        value = result.get(key) if key in result else (result.get("metadata") or {}).get(key)
        if value not in (None, ""):
            try:
                return int(value)
            except (TypeError, ValueError):
                raise BenchResultError(f"{name}: {key} is {value!r}, not an integer") from None
    raise BenchResultError(f"{name}: no batch size: it has none of {', '.join(BATCH_KEYS)}; "
                           f"pass it as {name}:B")


def load_points(arguments: Sequence[str]) -> list[ProfilePoint]:
    points: dict[int, tuple[str, ProfilePoint]] = {}
    models = set()
    for argument in arguments:
        path, given = split_argument(argument)
        try:
            result = json.loads(path.read_text())
        except OSError as error:
            raise BenchResultError(f"{path}: cannot be read: {error.strerror}") from None
        except json.JSONDecodeError as error:
            raise BenchResultError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(result, dict) or "output_throughput" not in result:
            raise BenchResultError(f"{path}: not a `vllm bench serve` result (no output_throughput)")
        batch = batch_of(result, given, str(path))
        if batch in points:
            raise BenchResultError(f"batch size {batch} is given twice: {points[batch][0]} and {path}")
        models.add(result.get("model_id"))
        points[batch] = (str(path), point_from_result(result, batch))
    if len(models - {None}) > 1:
        raise BenchResultError(f"the files measure different models: {sorted(models - {None})}")
    return [points[b][1] for b in sorted(points)]
