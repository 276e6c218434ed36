"""The operator's whole decision, pure: a deployment and a cluster snapshot in, objects, status and Events out."""

from datetime import UTC, datetime
from pathlib import Path

import yaml

from slmpack.core.decide import ClusterSnapshot, ProfilingJob, decide, with_status
from slmpack.core.validation import GPUNode

NOW = datetime(2026, 1, 1, tzinfo=UTC)
DATA = Path(__file__).resolve().parents[1] / "data"
H100 = GPUNode("gpu-a", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.replicas": "1",
                         "nvidia.com/gpu.sharing-strategy": "mps", "nvidia.com/gpu.memory": "81559",
                         "nvidia.com/gpu.count": "1"}, {"nvidia.com/gpu": 1})


def deployment(**spec) -> dict:
    return {"apiVersion": "slmpack.dev/v1alpha1", "kind": "SLMDeployment",
            "metadata": {"name": "chat", "namespace": "team", "uid": "d-1", "generation": 3},
            "spec": {"model": {"name": "HuggingFaceTB/SmolLM2-360M-Instruct", "dtype": "bfloat16",
                               "maxModelLen": 4096},
                     "profiling": {"workload": {"inputTokens": 512, "outputTokens": 256}}, **spec}}


def kinds(objects) -> list[str]:
    return [o["kind"] for o in objects]


def condition(decision, type_):
    return next(c for c in decision.status.conditions if c.type == type_)


def test_a_refused_spec_creates_nothing_and_says_which_field_to_fix():
    decision = decide(deployment(profiling={"minBatchSize": 64, "maxBatchSize": 8}), ClusterSnapshot((H100,)), NOW)
    assert decision.apply == decision.create == []
    refused = condition(decision, "InvalidSpec")
    assert refused.status == "True" and refused.message.startswith("spec.profiling.minBatchSize")
    assert refused.observed_generation == 3
    assert decision.status.phase.value == "Failed"
    assert [e.reason for e in decision.events] == ["InvalidSpec"] and decision.events[0].warning
    assert decision.retry_after_seconds is None


def test_no_matching_node_is_retried_later():
    decision = decide(deployment(gpu={"product": "NVIDIA-A100"}), ClusterSnapshot((H100,)), NOW)
    assert decision.create == [] and decision.retry_after_seconds == 30
    assert "no node offers" in condition(decision, "InvalidSpec").message


def test_without_a_profile_it_creates_one_then_its_job_once_the_profile_exists():
    first = decide(deployment(), ClusterSnapshot((H100,)), NOW)
    assert kinds(first.create) == ["SLMProfile"] and first.apply == []
    assert "ProfileCreated" in [e.reason for e in first.events]
    profile = {**first.create[0], "metadata": {**first.create[0]["metadata"], "uid": "p-1"}}
    second = decide(with_status(deployment(), first.status), ClusterSnapshot((H100,), (profile,)), NOW)
    assert kinds(second.create) == ["ServiceAccount", "RoleBinding", "Job"]
    assert second.create[2]["metadata"]["ownerReferences"][0]["uid"] == "p-1"
    assert second.status.phase.value == "Profiling"
    # Once the Job exists, nothing more is created, and an unchanged condition posts no Event again.
    job = ProfilingJob(name=second.create[2]["metadata"]["name"])
    third = decide(with_status(deployment(), second.status), ClusterSnapshot((H100,), (profile,), (job,)), NOW)
    assert third.create == [] and third.events == []


def test_a_failed_profiling_job_is_reported_with_its_reason_and_the_fix():
    created = decide(deployment(), ClusterSnapshot((H100,)), NOW).create[0]
    profile = {**created, "metadata": {**created["metadata"], "uid": "p-1"}, "status": {"phase": "Profiling"}}
    job = ProfilingJob(name=f"profile-{created['metadata']['name']}", failed=True,
                       failure_message="Job has reached the specified backoff limit")
    decision = decide(deployment(), ClusterSnapshot((H100,), (profile,), (job,)), NOW)
    failed = condition(decision, "ProfileReady")
    assert failed.reason == "ProfilingFailed" and "backoff limit" in failed.message
    assert f"Delete SLMProfile {created['metadata']['name']}" in failed.message
    assert decision.create == [] and decision.status.phase.value == "Failed"


def test_a_ready_profile_places_the_pack():
    profile = yaml.safe_load((DATA / "profiles" / "smollm2-360m-h100.yaml").read_text())
    profile["metadata"].update(namespace="team", uid="p-1")
    decision = decide(deployment(profiling={"profileRef": "smollm2-360m-h100"}), ClusterSnapshot((H100,), (profile,)),
                      NOW)
    assert kinds(decision.apply) == ["Service", "StatefulSet"] and decision.create == []
    assert condition(decision, "Placed").status == "True"
    assert decision.status.endpoint == "http://chat.team.svc:8000/v1"
    assert decision.profiling_seconds is None


def test_the_same_snapshot_gives_the_same_decision():
    snapshot = ClusterSnapshot((H100,))
    assert decide(deployment(), snapshot, NOW) == decide(deployment(), snapshot, NOW)
