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
