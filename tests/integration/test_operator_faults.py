"""Crash and fault survival: the operator as a real process (killed with SIGKILL), the real apiserver
and kubelet.

Each operator watches only its test's namespace, so tests on a shared cluster do not act on each
other's deployments.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kubernetes import client

from slmpack.api.models import SLMDeploymentSpec
from slmpack.core.manifests import MANAGED_BY, PROFILE_KEY_LABEL, PROFILE_LABEL, profile_conditions, profile_name
from slmpack.core.manifests import profiling_job_name as job_name_of
from tests.fixtures.cluster import local_image
from tests.integration.test_operator import GROUP, MISSING_IMAGE, VERSION, Cluster, cluster, deployment, wait  # noqa: F401

pytestmark = [pytest.mark.cluster, pytest.mark.node]

ROOT = Path(__file__).resolve().parents[2]
ENGINE_CPU = "slmpack/engine-cpu:0.1.0"
H100_MEMORY_MIB = 81559  # what the emulated device plugin's GFD labels give an H100


class Operator:
    """`kopf run` of the slmpack handlers as a subprocess of the test, stopped by PID."""

    def __init__(self, namespace: str, log_dir: Path, lease: str | None = None):
        self.namespace, self.lease, self.log_dir = namespace, lease, log_dir
        self.process: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> "Operator":
        self.runs += 1
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT}", "PYTHONUNBUFFERED": "1"}
        if self.lease:
            env["SLMPACK_LEADER_ELECTION_LEASE"] = self.lease
        self.log = self.log_dir / f"operator-{id(self)}-{self.runs}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", self.namespace,
             "-m", "slmpack.controller.handlers"],
            env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, no handover, as when a node dies."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def k(cluster, namespace):  # noqa: F811
    return Cluster(cluster, namespace)


@pytest.fixture
def operators(k, tmp_path):
    started = []

    def make(lease=None):
        operator = Operator(k.ns, tmp_path, lease)
        started.append(operator)
        return operator

    yield make
    for operator in started:
        operator.stop()


def conditions(status):
    return {c["type"]: c for c in status.get("conditions", [])}


def profiling_failed(k, name, seconds):
    """The deployment's ProfileReady condition once it says ProfilingFailed."""
    return wait(lambda: (c := conditions(k.status(name)).get("ProfileReady")) and c["reason"] == "ProfilingFailed"
                and c, seconds, f"{name}: ProfileReady=False, ProfilingFailed")


def sts_exists(k, name):
    try:
        return k.statefulset(name)
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise


def test_killed_mid_profiling_mid_apply_and_mid_status_write_it_converges(k, operators):
    operator = operators().start()
    k.create(deployment("chaos", engine={"device": "cpu", "image": MISSING_IMAGE}))
    # Mid-profiling: the profile exists, the Job may or may not.
    wait(lambda: k.profiles(), 60, "an SLMProfile")
    operator.kill()
    operator.start()
    wait(lambda: k.jobs(), 60, "the profiling Job after the restart")
    # Mid-step again: the Job was just created, the status may not say so yet.
    operator.kill()
    operator.start()
    status = wait(lambda: k.status("chaos").get("phase") == "Profiling" and k.status("chaos"), 60, "Profiling")
    assert len(k.profiles()) == 1 and len(k.jobs()) == 1, "no duplicate profile or Job"
    profile = k.profiles()[0]["metadata"]["name"]
    assert status["profile"] == profile

    # Mid-apply: kill as soon as the StatefulSet appears; the Service and the status come after it.
    k.write_profile(profile)
    wait(lambda: sts_exists(k, "chaos"), 60, "the StatefulSet")
    operator.kill()
    operator.start()
    wait(lambda: k.core.read_namespaced_service("chaos", k.ns), 60, "the Service after the restart")
    status = wait(lambda: k.status("chaos").get("plan") and k.status("chaos"), 60, "the plan in status")
    assert conditions(status)["Placed"]["status"] == "True" and status["observedGeneration"] == 1

    # Mid-status-write: kill right after a spec change, before or while its status is written.
    k.patch("chaos", {"replicas": 1})
    time.sleep(0.2)
    operator.kill()
    operator.start()
    status = wait(lambda: k.status("chaos").get("observedGeneration") == 2 and k.status("chaos"), 60,
                  "the status of generation 2")
    assert status["plan"]["replicas"] == 1 and k.statefulset("chaos").spec.replicas == 1
    assert conditions(status)["ProfileReady"]["reason"] == "ProfilingSkipped", status
    assert len(k.profiles()) == 1 and len(k.jobs()) == 1
    assert operator.process.poll() is None, operator.output()


def test_a_burst_with_the_operator_killed_every_second_converges_to_one_profile_and_one_job(k, operators):
    operator = operators().start()
    names = [f"burst-{i}" for i in range(4)]
    for name in names:
        k.create(deployment(name, engine={"device": "cpu", "image": MISSING_IMAGE}))
    for _ in range(4):
        time.sleep(1.0)
        operator.kill()
        operator.start()
    wait(lambda: all(k.status(n).get("phase") == "Profiling" for n in names), 90, "every deployment Profiling")
    assert len(k.profiles()) == 1 and len(k.jobs()) == 1
    profile = k.profiles()[0]
    assert {k.status(n)["profile"] for n in names} == {profile["metadata"]["name"]}
    owners = wait(lambda: len(k.profiles()[0]["metadata"].get("ownerReferences", [])) == 4 and
                  k.profiles()[0]["metadata"]["ownerReferences"], 60, "all four as the profile's users")
    assert sorted(o["name"] for o in owners) == names


def test_a_statefulset_service_or_replica_deleted_by_hand_comes_back(k, operators):
    operators().start()
    k.create(deployment("keep", replicas=1, engine={"device": "cpu", "image": MISSING_IMAGE}))
    sts = wait(lambda: sts_exists(k, "keep"), 60, "the StatefulSet")
    pod = wait(lambda: k.core.read_namespaced_pod("keep-0", k.ns), 60, "the replica")

    # (_preload_content=False: the client library misreads the Status that a delete returns.)
    k.apps.delete_namespaced_stateful_set("keep", k.ns, _preload_content=False)
    wait(lambda: (s := sts_exists(k, "keep")) and s.metadata.uid != sts.metadata.uid, 60,
         "a new StatefulSet")
    service = k.core.read_namespaced_service("keep", k.ns)
    k.core.delete_namespaced_service("keep", k.ns, _preload_content=False)
    wait(lambda: k.core.read_namespaced_service("keep", k.ns).metadata.uid != service.metadata.uid, 60,
         "a new Service")
    pod = wait(lambda: k.core.read_namespaced_pod("keep-0", k.ns), 60, "the replica")
    k.core.delete_namespaced_pod("keep-0", k.ns, grace_period_seconds=0, _preload_content=False)
    wait(lambda: k.core.read_namespaced_pod("keep-0", k.ns).metadata.uid != pod.metadata.uid, 60,
         "a new replica")


def test_a_hung_profiling_job_is_stopped_by_its_deadline(k, operators):
    operators().start()
    # The image never pulls, so the Job hangs until its deadline.
    k.create(deployment("hung", engine={"device": "cpu", "image": MISSING_IMAGE},
                        profiling={"maxBatchSize": 16, "maxReplicas": 2, "jobActiveDeadlineSeconds": 60}))
    job = wait(lambda: k.jobs(), 60, "the profiling Job")[0]
    assert job.spec.active_deadline_seconds == 60
    ready = profiling_failed(k, "hung", 150)
    assert "deadline" in ready["message"], ready
    assert k.status("hung")["phase"] == "Failed"


def test_an_oom_killed_profiler_is_retried_a_bounded_number_of_times_then_fails_with_the_reason(k, operators):
    # A namespace LimitRange gives the profiler 32 MiB, which the Python interpreter alone exceeds.
    k.core.create_namespaced_limit_range(k.ns, {"metadata": {"name": "tiny"}, "spec": {"limits": [
        {"type": "Container", "default": {"memory": "32Mi"}, "defaultRequest": {"memory": "32Mi"}}]}})
    operators().start()
    k.create(deployment("oom", engine={"device": "cpu", "image": ENGINE_CPU},
                        profiling={"maxBatchSize": 16, "maxReplicas": 2, "jobBackoffLimit": 1}))
    ready = profiling_failed(k, "oom", 240)
    assert "OOMKilled" in ready["message"], ready
    job = k.jobs()[0]
    assert job.spec.backoff_limit == 1 and (job.status.failed or 0) == 2, "one try and one retry"


def test_a_crashing_engine_fails_the_profile_with_its_error_after_bounded_retries(k, operators):
    # vLLM refuses an unknown argument and exits at once, each time the profiler starts it.
    local_image(ENGINE_CPU)
    operators().start()
    k.create(deployment("crash", engine={"device": "cpu", "image": ENGINE_CPU, "extraArgs": ["--no-such-flag"]},
                        profiling={"maxBatchSize": 16, "maxReplicas": 2, "jobBackoffLimit": 1}))
    ready = profiling_failed(k, "crash", 300)
    assert "--no-such-flag" in ready["message"] and "exited with code" in ready["message"], ready
    assert k.status("crash")["phase"] == "Failed"
    (job,) = k.jobs()
    assert job.spec.backoff_limit == 1
    pods = k.core.list_namespaced_pod(k.ns, label_selector=f"job-name={job.metadata.name}").items
    assert 1 <= len(pods) <= 2, "one try and at most one retry"


def test_a_job_complete_without_a_ready_profile_fails_clearly(k, operators):
    spec = deployment("silent", engine={"device": "cpu", "image": ENGINE_CPU})["spec"]
    conditions_ = profile_conditions(SLMDeploymentSpec.model_validate(spec), H100_MEMORY_MIB)
    profile = profile_name(conditions_)
    # The profiling Job as if its profiler exited 0 without writing: it completes, the profile stays Pending.
    k.custom.create_namespaced_custom_object(GROUP, VERSION, k.ns, "slmprofiles", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SLMProfile",
        "metadata": {"name": profile, "labels": {PROFILE_KEY_LABEL: conditions_.key(), **MANAGED_BY}},
        "spec": {"conditions": conditions_.to_wire()}})
    labels = {PROFILE_LABEL: profile, **MANAGED_BY}
    k.batch.create_namespaced_job(k.ns, {"metadata": {"name": job_name_of(profile), "labels": labels}, "spec": {
        "backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": {
            "restartPolicy": "Never", "containers": [{"name": "profiler", "image": ENGINE_CPU,
                                                       "imagePullPolicy": "IfNotPresent", "command": ["true"]}]}}}})
    operators().start()
    k.create({**deployment("silent"), "spec": spec})
    wait(lambda: k.status("silent").get("profile") == profile, 60, "the deployment to use the profile")
    ready = profiling_failed(k, "silent", 150)
    assert "result never arrived" in ready["message"], ready
    assert len(k.jobs()) == 1


def test_two_operators_elect_one_leader_and_the_other_takes_over_when_it_dies(k, operators):
    lease = f"{k.ns}/slmpack-operator-{uuid.uuid4().hex[:6]}"
    first, second = operators(lease).start(), operators(lease).start()
    for name in ("a", "b", "c"):
        k.create(deployment(name, engine={"device": "cpu", "image": MISSING_IMAGE}))
    wait(lambda: all(k.status(n).get("phase") == "Profiling" for n in "abc"), 60, "every deployment Profiling")
    holder = k_lease(k, lease).spec.holder_identity
    leaders = [o for o in (first, second) if "leads" in o.output()]
    assert len(leaders) == 1, [o.output()[-2000:] for o in (first, second)]
    follower = second if leaders[0] is first else first
    assert "ProfileCreated" not in follower.output() and "ProfilingStarted" not in follower.output()
    assert len(k.profiles()) == 1 and len(k.jobs()) == 1
    def events(reason):
        return [e for e in k.core.list_namespaced_event(k.ns).items if e.reason == reason]

    wait(lambda: events("ProfilingStarted"), 30, "the ProfilingStarted Event")
    time.sleep(2)
    assert len(events("ProfileCreated")) == 1 and len(events("ProfilingStarted")) == 1, "one of each, by one operator"

    leaders[0].kill()
    k.write_profile(k.profiles()[0]["metadata"]["name"])
    # The survivor takes the Lease once it has gone unrenewed for its duration (15 s), then acts.
    wait(lambda: all(sts_exists(k, n) for n in "abc"), 60, "the StatefulSets from the new leader")
    assert k_lease(k, lease).spec.holder_identity != holder
    assert "leads" in follower.output()


def k_lease(k, lease):
    namespace, name = lease.split("/")
    return client.CoordinationV1Api(k.core.api_client).read_namespaced_lease(name, namespace)
