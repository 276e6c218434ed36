"""The status is written as a JSON merge patch (RFC 7386): nothing of the status before may survive it."""

from slmpack.api.models import Plan, SLMDeploymentStatus


def merge(target, patch):
    """RFC 7386, section 2, as the apiserver applies a merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


def test_a_fixed_replica_plan_clears_what_the_profiled_plan_had():
    profiled = SLMDeploymentStatus(profile="p", plan=Plan(
        knee_batch_size=24, replicas=2, max_num_seqs=24, predicted_throughput_tokens_per_s=76.5,
        predicted_p99_itl_ms=906.0, explanation="2 replicas gave 1.35x"))
    fixed = SLMDeploymentStatus(plan=Plan(replicas=1, max_num_seqs=256, explanation="1 replicas fixed"))
    stored = merge(profiled.to_wire(), fixed.merge_patch())
    assert stored == fixed.to_wire()
    assert "kneeBatchSize" not in stored["plan"] and "profile" not in stored
    assert merge(fixed.to_wire(), profiled.merge_patch()) == profiled.to_wire()
