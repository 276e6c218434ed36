"""Profiling faults, as the decision sees them: a Job that ends without a result, or fails its retries."""

from datetime import UTC, datetime, timedelta

from slmpack.controller.handlers import profiling_job
from slmpack.core.decide import ClusterSnapshot, decide
from slmpack.core.validation import GPUNode

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
H100 = GPUNode(name="gpu-1", labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                                     "nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.replicas": "4",
                                     "nvidia.com/gpu.sharing-strategy": "mps", "nvidia.com/gpu.count": "1"},
               allocatable={"nvidia.com/gpu": 4})
DEPLOYMENT = {"apiVersion": "slmpack.dev/v1alpha1", "kind": "SLMDeployment",
              "metadata": {"name": "chat", "namespace": "team", "uid": "d-1", "generation": 1},
              "spec": {"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                       "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}}}


def profile_and_job_name():
    created = decide(DEPLOYMENT, ClusterSnapshot((H100,)), NOW).create[0]
    profile = {**created, "metadata": {**created["metadata"], "uid": "p-1"}, "status": {"phase": "Profiling"}}
    return profile, f"profile-{created['metadata']['name']}"


def job(name, conditions, **status):
    return {"metadata": {"name": name}, "status": {"conditions": conditions, **status}}


def profile_ready(decision):
    return next(c for c in decision.status.conditions if c.type == "ProfileReady")


def test_a_job_complete_without_a_result_fails_clearly_after_a_grace_period():
    profile, name = profile_and_job_name()
    done = profiling_job(job(name, [{"type": "Complete", "status": "True"}],
                             completionTime=(NOW - timedelta(seconds=5)).isoformat().replace("+00:00", "Z")))
    assert done.completed_at == NOW - timedelta(seconds=5)
    waiting = decide(DEPLOYMENT, ClusterSnapshot((H100,), (profile,), (done,)), NOW)
    assert profile_ready(waiting).reason == "Profiling", "the result may still be on its way"
    assert waiting.retry_after_seconds is not None and waiting.retry_after_seconds <= 26

    later = decide(DEPLOYMENT, ClusterSnapshot((H100,), (profile,), (done,)), NOW + timedelta(seconds=60))
    failed = profile_ready(later)
    assert failed.reason == "ProfilingFailed" and "result never arrived" in failed.message
    assert f"delete SLMProfile {profile['metadata']['name']}" in failed.message
    assert later.status.phase.value == "Failed" and later.create == []


def test_an_oom_killed_profiler_is_reported_with_its_reason_after_its_retries():
    profile, name = profile_and_job_name()
    failed_job = profiling_job(
        job(name, [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit"}]),
        pod_endings=("OOMKilled (exit code 137)", "OOMKilled (exit code 137)", "OOMKilled (exit code 137)"))
    decision = decide(DEPLOYMENT, ClusterSnapshot((H100,), (profile,), (failed_job,)), NOW)
    message = profile_ready(decision).message
    assert profile_ready(decision).reason == "ProfilingFailed"
    assert "backoff limit" in message and "OOMKilled (exit code 137)" in message


def test_a_hung_job_stopped_by_its_deadline_says_so():
    profile, name = profile_and_job_name()
    deadline = profiling_job(job(name, [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                         "message": "Job was active longer than specified deadline"}]))
    decision = decide(DEPLOYMENT, ClusterSnapshot((H100,), (profile,), (deadline,)), NOW)
    assert "longer than specified deadline" in profile_ready(decision).message


def test_the_profiling_job_carries_the_specs_deadline_and_retries():
    spec = {**DEPLOYMENT["spec"], "profiling": {"jobActiveDeadlineSeconds": 600, "jobBackoffLimit": 1}}
    first = decide({**DEPLOYMENT, "spec": spec}, ClusterSnapshot((H100,)), NOW)
    profile = {**first.create[0], "metadata": {**first.create[0]["metadata"], "uid": "p-1"}}
    second = decide({**DEPLOYMENT, "spec": spec}, ClusterSnapshot((H100,), (profile,)), NOW)
    job_spec = next(o for o in second.create if o["kind"] == "Job")["spec"]
    assert job_spec["activeDeadlineSeconds"] == 600 and job_spec["backoffLimit"] == 1


def test_a_profile_status_the_operator_cannot_read_is_a_condition_not_an_endless_retry():
    profile, _ = profile_and_job_name()
    for wrong, shown in [({"phase": "Ready", "knee": {"batchSize": 8, "fromTheFuture": 1}},
                          "status.knee.fromTheFuture: Extra inputs are not permitted"),
                         ({"phase": "Ready", "knee": {"batchSize": "eight"}}, "status.knee.batchSize: ")]:
        decision = decide(DEPLOYMENT, ClusterSnapshot((H100,), ({**profile, "status": wrong},)), NOW)
        unreadable = profile_ready(decision)
        assert (unreadable.status, unreadable.reason) == ("False", "ProfileUnreadable")
        assert shown in unreadable.message and f"delete SLMProfile {profile['metadata']['name']}" in unreadable.message
        assert decision.status.phase.value == "Failed" and decision.apply == []
        assert any(e.reason == "ProfileUnreadable" and e.warning for e in decision.events)
