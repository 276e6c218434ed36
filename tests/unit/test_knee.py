"""Knee rules on hand-made points and on the recorded curves."""

import pytest

from slmpack.api.models import KneeRule, LatencySLO
from slmpack.core.knee import KneeParams, NoKneeError, efficiency_bar, find_knee, pareto_frontier

from .curves import curve_names, load_curve, point

# Tokens/s grow until B=16, then flatten; ITL grows slowly, then fast past 64.
CURVE = [point(1, 100, 10), point(2, 195, 10.2), point(4, 380, 10.5), point(8, 700, 11.4),
         point(16, 1100, 14.5), point(32, 1400, 22.8), point(64, 1500, 42), point(128, 1550, 82)]


def test_bca_takes_the_largest_batch_above_the_efficiency_threshold():
    knee = find_knee(CURVE)
    # Efficiency at 32 is 1400/(32*100) = 44 %, at 64 it is 23 %, at 128 it is 12 %.
    assert knee.batch_size == 64
    assert "B=128: efficiency 12% is not above 20%" in knee.reason
    assert knee.rule == "bca(eps=20%, L=5)"


def test_bca_latency_rule_uses_the_probed_batch_nearest_32():
    # With L=1, ITL must not exceed ITL(32) = 22.8 ms, so 64 fails on latency, not efficiency.
    knee = find_knee(CURVE, KneeParams(latency_factor=1))
    assert knee.batch_size == 32
    assert "mean ITL 42.0 ms exceeds 1 x ITL(B=32)" in knee.reason


def test_efficiency_is_relative_to_the_smallest_batch_when_one_is_not_probed():
    knee = find_knee(CURVE[2:])  # from B=4: efficiency(64) = 1500*4/(64*380) = 25 %
    assert knee.batch_size == 64


def test_the_efficiency_bar_is_where_bcas_verdict_turns():
    # From B=4 (380 tok/s): B=64 must exceed 0.2 * 64 * 380 / 4 = 1216 tok/s; the curve's 1500 does (25 %).
    assert efficiency_bar(64, CURVE[2], KneeParams()) == pytest.approx(1216)
    just_below = find_knee([CURVE[2], point(32, 1400, 22.8), point(64, 1215, 42)])
    just_above = find_knee([CURVE[2], point(32, 1400, 22.8), point(64, 1217, 42)])
    assert (just_below.batch_size, just_above.batch_size) == (32, 64)
    assert efficiency_bar(64, point(1, 0, 10, error="died"), KneeParams()) is None


def test_a_latency_slo_caps_the_knee():
    knee = find_knee(CURVE, KneeParams(slo=LatencySLO(p99_itl_ms=25)))
    assert knee.batch_size == 32
    assert "SLO 25 ms" in knee.reason
    assert "capped by SLO p99 ITL<=25ms" in knee.rule


def test_a_ttft_slo_caps_the_knee():
    curve = [point(1, 100, 10, p99_ttft_ms=50), point(8, 700, 11, p99_ttft_ms=90),
             point(16, 1100, 14, p99_ttft_ms=400)]
    assert find_knee(curve, KneeParams(slo=LatencySLO(p99_ttft_ms=100))).batch_size == 8


def test_failed_points_are_skipped_and_reported():
    curve = CURVE[:5] + [point(32, 0, 0, error="engine died")]
    assert find_knee(curve).batch_size == 16


def test_no_usable_point_is_a_clear_error():
    with pytest.raises(NoKneeError, match="no batch size was measured successfully"):
        find_knee([point(1, 0, 0, error="connection refused")])


def test_kneedle_finds_where_the_curve_bends():
    knee = find_knee(CURVE, KneeParams(rule=KneeRule.kneedle))
    assert knee.batch_size in (16, 32)
    assert knee.rule == "kneedle"


def test_pareto_frontier_drops_dominated_points():
    dominated = point(48, 1300, 30)  # less throughput and more latency than B=32
    frontier = pareto_frontier(CURVE + [dominated])
    assert dominated not in frontier
    assert [p.batch_size for p in frontier] == [1, 2, 4, 8, 16, 32, 64, 128]


@pytest.mark.parametrize("name", curve_names())
def test_recorded_curves_have_a_knee_inside_the_grid(name):
    curve = load_curve(name)
    knee = find_knee(curve)
    assert curve[0].batch_size < knee.batch_size < curve[-1].batch_size
    assert knee.throughput_tokens_per_s > curve[0].output_throughput_tokens_per_s
