"""How often the replicate-or-not decision packs when packing gains nothing, and when it gains 15 %.

The runs of every replica count are drawn from one distribution (or k > 1 from one 15 % higher), in the
profiler's own rounds with its own stopping rule (`round_order`, `replication_stop`), 2000 profiles per
line. "now" is `decide_replicas` (Holm over the counts tried, each count's first minRepeats runs); "before"
is the rule it replaced: the best k > 1 against k = 1 by Welch's test at the full alpha, on all runs.

    PYTHONPATH=operator python benchmarks/false_packing.py > benchmarks/false_packing.txt
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.unit.test_replication_decision import REPEATS, profile_runs  # noqa: E402

from slmpack.api.models import LatencySLO  # noqa: E402
from slmpack.core.replication import decide_replicas, runs  # noqa: E402
from slmpack.core.stats import gain_test  # noqa: E402

DRAWS = 2000


def packed_before(points) -> bool:
    best = max((p for p in points if p.replicas > 1), key=lambda p: p.aggregate_throughput_tokens_per_s)
    return gain_test(runs(best), runs(points[0]), 0.05).significant


def main() -> None:
    print(f"{DRAWS} simulated profiles per line, alpha 5 %, minRepeats {REPEATS.min_samples}, "
          f"maxRepeats {REPEATS.max_samples}, precision {REPEATS.relative_half_width_percent} %")
    for gain in (0.0, 0.15):
        for counts in (2, 3, 4):
            for cv in (0.03, 0.10):
                rng = random.Random(counts * 100 + int(cv * 100))
                means = {k: 1000.0 * (1 + gain if k > 1 else 1) for k in range(1, counts + 1)}
                now = before = 0
                for _ in range(DRAWS):
                    points = sorted(profile_runs(means, cv, rng), key=lambda p: p.replicas)
                    now += decide_replicas(points, LatencySLO(), 95, REPEATS.min_samples).replicas > 1
                    before += packed_before(points)
                print(f"true gain {gain:4.0%}  K={counts}  CV={cv:4.0%}: packs now {now / DRAWS:6.1%}, "
                      f"before {before / DRAWS:6.1%}")


if __name__ == "__main__":
    main()
