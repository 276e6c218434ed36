"""The replicate-or-not decision packs by chance no more often than its confidence allows, and packs a real gain.

The runs are simulated with the profiler's own round structure and stopping rule
(`round_order`, `replication_stop`), so the chance of a false gain is the one a profile has.
"""

import random

import pytest

from slmpack.api.models import Knee, LatencySLO, ReplicationPoint
from slmpack.core.replication import decide_replicas, replication_stop, round_order, run_requests
from slmpack.core.stats import Precision

REPEATS = Precision(95, 5, min_samples=3, max_samples=5)  # the CRD's defaults
DRAWS = 1000


def profile_runs(means: dict[int, float], cv: float, rng: random.Random) -> list[ReplicationPoint]:
    """Rounds of one run per count, in the profiler's order, until its stopping rule holds."""
    points = {k: ReplicationPoint(replicas=k, batch_size_per_replica=64, offered_concurrency=64 * len(means))
              for k in means}
    rounds = 0
    while replication_stop(list(points.values()), rounds, REPEATS) is None:
        for k in round_order(len(means), rounds, warm=True, rng=rng):
            runs = [*points[k].runs_tokens_per_s, rng.gauss(means[k], means[k] * cv)]
            points[k] = points[k].model_copy(update={"runs_tokens_per_s": runs,
                                                     "aggregate_throughput_tokens_per_s": sum(runs) / len(runs)})
        rounds += 1
    return list(points.values())


def packing_rate(counts: int, cv: float, gain: float, seed: int) -> float:
    rng = random.Random(seed)
    means = {k: 1000.0 * (1 + gain if k > 1 else 1) for k in range(1, counts + 1)}
    packed = sum(decide_replicas(profile_runs(means, cv, rng), LatencySLO(), 95, REPEATS.min_samples).replicas > 1
                 for _ in range(DRAWS))
    return packed / DRAWS


@pytest.mark.parametrize("counts", [2, 3, 4])
@pytest.mark.parametrize("cv", [0.03, 0.10])
def test_under_the_null_packing_happens_at_most_as_often_as_alpha(counts, cv):
    # Testing the best of K - 1 counts at the full alpha, with the runs stopped on precision, packed 6 % of
    # the time at K = 2 and 12-14.5 % at K = 4. Holm's correction on a fixed number of runs keeps it within
    # alpha: 5 % plus 2.5 Monte-Carlo standard errors (0.69 % at 1000 draws).
    assert packing_rate(counts, cv, gain=0.0, seed=counts * 100 + int(cv * 100)) <= 0.05 + 2.5 * 0.0069


@pytest.mark.parametrize("counts", [2, 3, 4])
def test_a_true_fifteen_percent_gain_packs_at_least_four_times_in_five(counts):
    assert packing_rate(counts, 0.03, gain=0.15, seed=counts) >= 0.8


def test_among_significant_counts_the_smallest_not_below_the_best_is_chosen():
    def point(k, runs):
        return ReplicationPoint(replicas=k, batch_size_per_replica=64, offered_concurrency=256,
                                runs_tokens_per_s=runs, aggregate_throughput_tokens_per_s=sum(runs) / len(runs))

    plateau = [point(1, [1000, 1010, 990]), point(2, [1300, 1290, 1310]), point(3, [1320, 1270, 1340]),
               point(4, [1310, 1300, 1290])]
    decided = decide_replicas(plateau, LatencySLO())
    assert decided.replicas == 2 and decided.significant and decided.candidates_tested == 3
    assert "were the best" in decided.explanation  # 3 had the highest mean, not significantly above 2
    climbing = [point(1, [1000, 1010, 990]), point(2, [1200, 1190, 1210]), point(3, [1500, 1490, 1510])]
    assert decide_replicas(climbing, LatencySLO()).replicas == 3
    # The bounds shown are Fieller's at the level the chosen count was tested at: above 1, as it is significant.
    assert decided.ratio_ci_low > 1 and decided.bounds_confidence_percent == pytest.approx(100 - 5 / 3, abs=0.01)


def test_only_the_first_runs_decide_so_stopping_on_precision_cannot_tip_it():
    def point(k, runs):
        return ReplicationPoint(replicas=k, batch_size_per_replica=64, offered_concurrency=128,
                                runs_tokens_per_s=runs, aggregate_throughput_tokens_per_s=sum(runs) / len(runs))

    # Two lucky later runs would make the gain significant; the test sees the first three of each.
    later = decide_replicas([point(1, [1000, 1100, 900, 1000, 1000]), point(2, [1050, 950, 1150, 1300, 1300])],
                            LatencySLO(), 95, test_runs=3)
    assert later.replicas == 1 and later.runs_tested == 3


def test_rounds_interleave_the_counts_so_that_drift_cancels():
    rng = random.Random(3)
    # Engines started in turn: ABBA, each count's runs adjacent across a round boundary (no extra start).
    assert [k for r in range(4) for k in round_order(2, r, warm=False, rng=rng)] == [1, 2, 2, 1, 1, 2, 2, 1]
    # Every count warm: each round a permutation, not always with one replica first.
    rounds = [round_order(3, r, warm=True, rng=rng) for r in range(20)]
    assert all(sorted(r) == [1, 2, 3] for r in rounds) and len({r[0] for r in rounds}) == 3


def test_rounds_stop_on_precision_on_the_run_budget_or_on_time_after_the_minimum():
    from slmpack.core.replication import replication_stop

    def point(k, runs):
        return ReplicationPoint(replicas=k, batch_size_per_replica=8, offered_concurrency=16, runs_tokens_per_s=runs)

    tight = [point(1, [100, 101, 99]), point(2, [150, 151, 149])]
    loose = [point(1, [100, 140, 70]), point(2, [150, 90, 200])]
    assert replication_stop(tight, 2, REPEATS) is None  # the minimum first, whatever the spread
    assert replication_stop(tight, 3, REPEATS) == "Precise"
    assert replication_stop(loose, 3, REPEATS) is None
    # A busy machine: the time budget ends the rounds after the minimum, never before it.
    assert replication_stop(loose, 3, REPEATS, elapsed_seconds=130, budget_seconds=120) == "TimeBudget"
    assert replication_stop(loose, 2, REPEATS, elapsed_seconds=130, budget_seconds=120) is None
    assert replication_stop(loose, 5, REPEATS) == "MaxRepeats"


@pytest.mark.parametrize("knee_rate, expected", [
    (14.7, 294),  # a slow engine: 20 s at the knee's 14.7 requests/s outlasts two windows of 64
    (1.0, 128),  # two windows of the offered load at least
    (None, 128),  # no rate measured: windows alone
])
def test_a_run_lasts_two_windows_and_twenty_seconds_at_the_knees_rate(knee_rate, expected):
    knee = Knee(batch_size=32, rule="bca(eps=20%, L=5)", request_throughput_per_s=knee_rate)
    assert run_requests(64, knee) == expected
