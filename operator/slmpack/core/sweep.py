"""The adaptive sweep: which batch size to probe next, given what was measured (pure).

The search runs over the same grid a full sweep would probe, so the knee it finds is
a grid point. It probes the smallest batch (BCA's T(1)) and the batch nearest 32
(BCA's latency reference) first, so that every later verdict uses the same
references a full sweep would. Then it grows geometrically (doubling the batch,
snapped to the grid) while BCA's tests and the SLO pass, and bisects the grid between
the last pass and the first fail. Stateless: the next probe is derived from the results so
far, so a restarted profiler picks up where it stopped.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

from slmpack.api.models import ProfilePoint
from slmpack.core.knee import BCA_DEFAULTS, KneeParams, bca_failure, latency_reference, slo_failure, usable

DEFAULT_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def batch_grid(min_batch: int, max_batch: int, explicit: Sequence[int] = ()) -> list[int]:
    """The batch sizes a full sweep probes: the explicit list, or the default grid within the range."""
    if explicit:
        if len(set(explicit)) != len(explicit):
            repeated = sorted({b for b in explicit if list(explicit).count(b) > 1})
            raise ValueError(f"batch sizes given more than once: {repeated}")
        return sorted(explicit)
    if min_batch > max_batch:
        raise ValueError(f"min batch {min_batch} is larger than max batch {max_batch}")
    grid = [b for b in DEFAULT_GRID if min_batch <= b <= max_batch]
    return sorted({min_batch, *grid, max_batch})


def next_probe(grid: Sequence[int], measured: Mapping[int, ProfilePoint],
               params: KneeParams = BCA_DEFAULTS) -> int | None:
    """The next batch size to measure, or None when the knee is bracketed to one grid step."""
    first = grid[0]
    if first not in measured:
        return first
    reference_batch = min(grid, key=lambda b: (abs(b - 32), b))
    if reference_batch not in measured:
        return reference_batch
    base = measured[first]
    if base.error is not None:
        return None  # without T(1) no verdict is possible; the report says why
    reference = latency_reference(usable(measured.values()))
    # A probe passes when it passes BCA's tests and meets the SLO, so the search brackets the SLO-capped knee
    # as tightly as BCA's: bisecting below a probe that breaks the SLO finds the largest grid batch that meets it.
    verdicts = {b: bca_failure(p, base, reference, params) is None and slo_failure(p, params.slo) is None
                for b, p in measured.items()}
    failing = sorted(b for b, ok in verdicts.items() if not ok)
    if not failing:
        largest = max(measured)
        if largest == grid[-1]:
            return None
        # Grow: the first grid point at or above twice the largest pass.
        return grid[min(bisect.bisect_left(grid, 2 * largest), len(grid) - 1)]
    first_fail = failing[0]
    last_pass = max((b for b, ok in verdicts.items() if ok and b < first_fail), default=first)
    low, high = grid.index(last_pass), grid.index(first_fail)
    if high - low <= 1:
        return None
    return grid[(low + high) // 2]


def sweep_order(grid: Sequence[int], measure, params: KneeParams = BCA_DEFAULTS) -> dict[int, ProfilePoint]:
    """Run the adaptive sweep with `measure(batch) -> ProfilePoint`; returns every probed point."""
    measured: dict[int, ProfilePoint] = {}
    while (batch := next_probe(grid, measured, params)) is not None:
        measured[batch] = measure(batch)
    return measured
