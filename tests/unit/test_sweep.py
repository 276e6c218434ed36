"""The adaptive sweep finds the full sweep's knee with at most half the probes."""

import pytest

from slmpack.core.knee import find_knee
from slmpack.core.sweep import batch_grid, next_probe, sweep_order

from .curves import curve_names, load_curve, point


@pytest.mark.parametrize("name", curve_names())
def test_adaptive_sweep_matches_the_full_sweep_with_half_the_probes(name):
    curve = load_curve(name)
    by_batch = {p.batch_size: p for p in curve}
    grid = sorted(by_batch)
    full_knee = find_knee(curve).batch_size
    probed = sweep_order(grid, by_batch.__getitem__)
    adaptive_knee = find_knee(probed.values()).batch_size
    assert abs(grid.index(adaptive_knee) - grid.index(full_knee)) <= 1
    assert len(probed) <= len(grid) / 2


def test_first_probes_are_the_efficiency_and_latency_references():
    grid = batch_grid(1, 256)
    assert next_probe(grid, {}) == 1
    assert next_probe(grid, {1: point(1, 100, 10)}) == 32


def test_growth_doubles_then_bisection_stops_at_one_grid_step():
    grid = [1, 2, 4, 8, 16, 32, 48, 64, 96, 128]
    seen = {1: point(1, 100, 10), 32: point(32, 1500, 20)}
    assert next_probe(grid, seen) == 64
    seen[64] = point(64, 1000, 40)  # efficiency 16 %: fails
    assert next_probe(grid, seen) == 48
    seen[48] = point(48, 1200, 30)  # 25 %: passes; 48 and 64 are neighbours
    assert next_probe(grid, seen) is None


def test_a_sweep_stops_when_the_base_point_fails():
    assert next_probe([1, 32], {1: point(1, 0, 0, error="engine died"), 32: point(32, 0, 0, error="x")}) is None


def test_grid_bounds_and_explicit_sizes():
    assert batch_grid(4, 40) == [4, 6, 8, 12, 16, 24, 32, 40]
    assert batch_grid(1, 1, [8, 2, 4]) == [2, 4, 8]
    with pytest.raises(ValueError, match=r"batch sizes given more than once: \[4\]"):
        batch_grid(1, 1, [4, 8, 4])
    with pytest.raises(ValueError, match="min batch 64 is larger than max batch 8"):
        batch_grid(64, 8)


def test_profile_phase_comes_from_its_conditions():
    from datetime import UTC, datetime

    from slmpack.core import profile_status

    now = datetime.now(UTC)
    assert profile_status.derive_phase([]) == "Pending"
    running = profile_status.in_progress([], "measuring batch 8", now)
    assert profile_status.derive_phase(running) == "Profiling"
    done = profile_status.measured(running, "knee at 64", now)
    assert profile_status.derive_phase(done) == "Ready"
    assert all(c.message for c in running + done)  # the client would send "" as null, which the CRD refuses
    broken = profile_status.failed(done, "EngineFailed", "the engine exited with code 1", now)
    assert profile_status.derive_phase(broken) == "Failed"
    failed = next(c for c in broken if c.type == "Failed")
    assert (failed.status, failed.reason, failed.message) == ("True", "EngineFailed", "the engine exited with code 1")


def test_progress_estimates_the_time_left_from_the_probes_so_far():
    from slmpack.core.profile_status import planned_sweep_probes, progress

    assert planned_sweep_probes(12, 5, adaptive=False, finished=False) == 12
    assert planned_sweep_probes(12, 5, adaptive=True, finished=True) == 5
    assert 5 < planned_sweep_probes(12, 2, adaptive=True, finished=False) < 12
    shown = progress(done=3, planned=9, probe_seconds=[10, 20, 30], starts_left=1, start_seconds=60)
    assert (shown.probes_done, shown.probes_planned, shown.eta_seconds) == (3, 9, 6 * 20 + 60)
    assert progress(0, 9, []).eta_seconds is None


def slo_curve() -> dict:
    """BCA passes every batch up to 256; the p99 ITL meets 21 ms up to batch 24 only."""
    grid = batch_grid(1, 256)
    return {b: point(b, 100 * b / (1 + b / 64), 10 * (1 + b / 64), p99_itl_ms=15 * (1 + b / 64)) for b in grid}


def test_the_sweep_bisects_below_a_probe_that_breaks_the_slo():
    from slmpack.api.models import LatencySLO
    from slmpack.core.knee import KneeParams

    by_batch, params = slo_curve(), KneeParams(slo=LatencySLO(p99_itl_ms=21))
    full = find_knee(by_batch.values(), params)
    probed = sweep_order(sorted(by_batch), by_batch.__getitem__, params)
    # Probing by BCA alone went 1, 32, 64, 128, 192, 256 and stepped down to 1.
    assert full.batch_size == find_knee(probed.values(), params).batch_size == 24
    assert len(probed) < len(by_batch) / 2 and full.slo_met


def test_a_slo_no_batch_meets_is_said_not_met():
    from slmpack.api.models import LatencySLO
    from slmpack.core.knee import KneeParams

    knee = find_knee(slo_curve().values(), KneeParams(slo=LatencySLO(p99_itl_ms=10)))
    assert knee.batch_size == 1 and not knee.slo_met
    assert knee.reason.startswith("no probed batch meets the SLO: B=1: p99 ITL 15.2 ms exceeds the SLO 10 ms")
