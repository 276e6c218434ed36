"""The autoscaler's decision, table-driven: a GPU's free slots are used before another GPU is taken."""

from datetime import UTC, datetime, timedelta

import pytest

from slmpack.api.models import AutoscalingSpec
from slmpack.core.autoscale import EngineLoad, decide_scale

NOW = datetime(2026, 1, 1, tzinfo=UTC)
PACKS = ["chat", "chat-pack-1", "chat-pack-2"]
PER_PACK, KNEE = 4, 32  # target 80 % of the knee: 25.6 requests per replica


def loads(*per_pack: list[float]) -> list[EngineLoad]:
    """Engine loads, pack by pack: each list holds the running requests of that pack's replicas."""
    return [EngineLoad(f"{PACKS[p]}-{i}", running=load, waiting=0) for p, pack in enumerate(per_pack)
            for i, load in enumerate(pack)]


CASES = [
    # (why, policy, current replicas, loads, ready, seconds since the last scaling, replicas, direction, reason)
    ("busy single replica: a second one joins its GPU", {}, 1, loads([30]), 1, None, 2, "up", "PackHasFreeSlots"),
    ("waiting requests count as load", {}, 1, [EngineLoad("chat-0", 10, 30)], 1, None, 2, "up", "PackHasFreeSlots"),
    ("much more load fills the pack, but no further", {}, 2, loads([60, 60]), 2, None, 4, "up", "PackHasFreeSlots"),
    ("a full pack at its knee takes a second GPU", {}, 4, loads([30] * 4), 4, None, 5, "up", "AllPacksAtKnee"),
    ("a full pack below its knee gets no second GPU", {}, 8, loads([50] * 4, [10] * 4), 8, None, 8, "none",
     "PacksBelowKnee"),
    ("no scaling up while a replica still starts", {}, 2, loads([60, 0]), 1, None, 2, "none", "ReplicaStarting"),
    ("a replica without metrics holds the count", {}, 2, loads([20]), 2, None, 2, "none", "MetricsUnavailable"),
    ("a replica without metrics does not block scale-in", {}, 2, loads([0]), 1, 400, 1, "down", "BelowTarget"),
    ("load on target holds", {}, 3, loads([25, 25, 25]), 3, None, 3, "none", "AtTarget"),
    ("idle within the cooldown holds", {}, 4, loads([2] * 4), 4, 10, 4, "none", "CoolingDown"),
    ("idle after the cooldown scales in", {}, 4, loads([2] * 4), 4, 400, 1, "down", "BelowTarget"),
    ("scale-in leaves a GPU", {}, 5, loads([5] * 4, [5]), 5, 400, 1, "down", "BelowTarget"),
    ("minPacks keeps a replica in the second pack", {"minPacks": 2}, 5, loads([0] * 4, [0]), 5, 400, 5, "none",
     "AtTarget"),
    ("below minPacks is raised at once", {"minPacks": 2}, 1, loads([0]), 1, None, 5, "up", "OutOfBounds"),
    ("maxPacks caps a busy deployment", {"maxPacks": 1}, 4, loads([90] * 4), 4, None, 4, "none", "AtTarget"),
    ("a lower target adds replicas sooner", {"targetKneePercent": 50}, 1, loads([20]), 1, None, 2, "up",
     "PackHasFreeSlots"),
    # A pack pod's supervisor reports all its engines in one reading.
    ("a pack pod's one reading counts its three engines", {}, 3, [EngineLoad("chat-0", 75, 0, engines=3)], 3, None,
     3, "none", "AtTarget"),
    ("a pack pod with an engine unreported holds", {}, 3, [EngineLoad("chat-0", 50, 0, engines=2)], 3, None, 3,
     "none", "MetricsUnavailable"),
    ("a full pack pod at its knee takes a second GPU", {}, 4, [EngineLoad("chat-0", 120, 0, engines=4)], 4, None, 5,
     "up", "AllPacksAtKnee"),
]


@pytest.mark.parametrize(("why", "policy", "current", "engines", "ready", "since", "replicas", "direction", "reason"),
                         CASES, ids=[c[0] for c in CASES])
def test_scaling_decision(why, policy, current, engines, ready, since, replicas, direction, reason):
    last = NOW - timedelta(seconds=since) if since is not None else None
    decision = decide_scale(AutoscalingSpec.model_validate(policy), current, PER_PACK, KNEE, PACKS, engines, ready,
                            last, NOW)
    assert (decision.replicas, decision.direction, decision.reason) == (replicas, direction, reason), \
        decision.message


def pack_pods(*loads_per_pod: float) -> list[EngineLoad]:
    """One reading per pack pod, each covering its pack's PER_PACK engines."""
    return [EngineLoad(f"{PACKS[p]}-0", running=load, waiting=0, engines=PER_PACK)
            for p, load in enumerate(loads_per_pod)]


WHOLE_PACK_CASES = [
    # A pack pod's engines change only with the pod, which restarts them all: packs come and go whole.
    ("a pack pod at its knee takes a whole second pack", 4, pack_pods(120), None, 8, "up", "AllPacksAtKnee"),
    ("below target a pack pod keeps all its engines", 4, pack_pods(30), 400, 4, "none", "AtTarget"),
    ("an idle second pack pod leaves whole", 8, pack_pods(30, 0), 400, 4, "down", "BelowTarget"),
    ("a count that is no whole pack is rounded up", 3, pack_pods(30), None, 4, "up", "OutOfBounds"),
]


@pytest.mark.parametrize(("why", "current", "engines", "since", "replicas", "direction", "reason"),
                         WHOLE_PACK_CASES, ids=[c[0] for c in WHOLE_PACK_CASES])
def test_pack_pods_scale_by_whole_packs(why, current, engines, since, replicas, direction, reason):
    last = NOW - timedelta(seconds=since) if since is not None else None
    decision = decide_scale(AutoscalingSpec(), current, PER_PACK, KNEE, PACKS, engines, current, last, NOW,
                            whole_packs=True)
    assert (decision.replicas, decision.direction, decision.reason) == (replicas, direction, reason), \
        decision.message


def test_the_message_carries_the_numbers_behind_the_decision():
    decision = decide_scale(AutoscalingSpec(), 4, PER_PACK, KNEE, PACKS,
                            [EngineLoad(f"chat-{i}", 30, 0, tokens_per_s=100) for i in range(4)], 4, None, NOW)
    assert "120 requests" in decision.message and "30.0 per replica" in decision.message
    assert "target 25.6 (80% of knee batch 32)" in decision.message and "400 tokens/s" in decision.message
    assert "pack 2 takes another GPU" in decision.message


def test_requests_queued_at_the_router_count_as_load_the_capped_engines_do_not_show():
    from datetime import UTC, datetime

    from slmpack.api.models import AutoscalingSpec
    from slmpack.core.autoscale import EngineLoad, decide_scale

    now = datetime(2026, 1, 1, tzinfo=UTC)
    policy = AutoscalingSpec(min_packs=1, max_packs=2, target_knee_percent=100)
    # Two replicas held at their knee of 8 by the router: 16 running, nothing waiting in the engines, on target.
    capped = [EngineLoad("chat-0", 8, 0), EngineLoad("chat-1", 8, 0)]
    held = decide_scale(policy, 2, 4, 8, ["chat"], capped, 2, None, now)
    assert held.replicas == 2
    # The same engines with 10 requests queued at the router: the demand is 26, so more replicas.
    queued = decide_scale(policy, 2, 4, 8, ["chat"], capped, 2, None, now, queued=10)
    assert queued.replicas == 4 and "10 of them queued at the router" in queued.message


def test_the_router_queue_is_read_from_haproxys_exporter():
    from slmpack.adapters.engine_metrics import parse

    text = ('# HELP haproxy_backend_current_queue Number of queued requests.\n'
            '# TYPE haproxy_backend_current_queue gauge\n'
            'haproxy_backend_current_queue{proxy="engines"} 7\n')
    assert parse(text).waiting == 7
