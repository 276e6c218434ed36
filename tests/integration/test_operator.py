"""The operator in-process (kopf's KopfRunner) against the real local cluster."""

import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from e2e.cluster.nvidia_device_plugin import GpuNode
from kopf.testing import KopfRunner
from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.config import kube_config

from slmpack.core.manifests import ENGINE_GRACE_SECONDS

pytestmark = [pytest.mark.cluster, pytest.mark.node]

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION = "slmpack.dev", "v1alpha1"
def operator(namespace):
    """kopf's arguments for the operator, watching the test's namespace only: tests on a shared
    cluster must not act on each other's deployments."""
    return ["run", "--standalone", "--namespace", namespace, "-m", "slmpack.controller.handlers"]
# The emulated device plugin's resource.
GPU_RESOURCE = "nvidia.com/gpu"
MISSING_IMAGE = "registry.invalid/slmpack/absent:0"  # never pulls: pods stay waiting, at no cost
PROFILER_ROLE = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                 "metadata": {"name": "slmpack-profiler"},
                 "rules": [{"apiGroups": [GROUP], "resources": ["slmprofiles/status"], "verbs": ["get", "patch"]}]}


@pytest.fixture(scope="module")
def cluster(node_kubeconfig, api_client, emulated_plugin):
    os.environ["KUBECONFIG"] = str(node_kubeconfig)
    # kopf logs in through the client library, which read KUBECONFIG when it was imported.
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(node_kubeconfig)
    extensions = client.ApiextensionsV1Api(api_client)
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        try:
            extensions.create_custom_resource_definition(crd)
        except ApiException as error:
            if error.status != 409:
                raise
            # On a shared cluster another checkout may have installed its CRD: keep it where it has
            # every field this checkout's tests use, replace it otherwise.
            installed = api_client.sanitize_for_serialization(
                extensions.read_custom_resource_definition(crd["metadata"]["name"]))
            if not has_fields(schema_of(installed), schema_of(crd)):
                crd["metadata"]["resourceVersion"] = installed["metadata"]["resourceVersion"]
                extensions.replace_custom_resource_definition(crd["metadata"]["name"], crd)
    rbac = client.RbacAuthorizationV1Api(api_client)
    try:
        rbac.create_cluster_role(PROFILER_ROLE)
        created_role = True
    except ApiException as error:
        if error.status != 409:
            raise
        created_role = False  # the chart's, on a cluster where slmpack is installed
    emulated_plugin.start(GpuNode(sharing="mps", replicas=4))  # returns once the node shows 4 nvidia.com/gpu
    wait(lambda: all(c.status.conditions and any(x.type == "Established" and x.status == "True"
                                                 for x in c.status.conditions)
                     for c in client.ApiextensionsV1Api(api_client).list_custom_resource_definition(
                         label_selector="app.kubernetes.io/part-of=slmpack").items), 60, "the CRDs to be served")
    yield api_client
    if created_role:
        rbac.delete_cluster_role(PROFILER_ROLE["metadata"]["name"])


def schema_of(crd: dict) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def has_fields(installed: dict, wanted: dict) -> bool:
    """Whether the installed schema declares every field of the wanted one, and every value of its enums."""
    mine, theirs = wanted.get("properties") or {}, installed.get("properties") or {}
    if not set(wanted.get("enum") or ()) <= set(installed.get("enum") or wanted.get("enum") or ()):
        return False
    if "items" in wanted:
        return has_fields(installed.get("items") or {}, wanted["items"])
    return all(name in theirs and has_fields(theirs[name], sub) for name, sub in mine.items())


def deployment(name, **spec):
    """An SLMDeployment whose engines never start unless `engine` names an image: running engines cost the
    node's cores, and hold its GPU slots for their grace period after the test."""
    body = {"model": {"name": "/models/SmolLM2-135M-Instruct"}, "engine": {"device": "cpu", "image": MISSING_IMAGE},
            "gpu": {"resourceName": GPU_RESOURCE}, "profiling": {"maxBatchSize": 16, "maxReplicas": 2}}
    body.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SLMDeployment", "metadata": {"name": name}, "spec": body}


def wait(predicate, seconds=30, what="condition"):
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except ApiException as error:
            if error.status != 404:
                raise
            last = None
        if last:
            return last
        time.sleep(0.3)
    what = what() if callable(what) else what  # what the wait was for, read as it times out
    raise AssertionError(f"timed out after {seconds}s waiting for {what} (last: {last})")


class Cluster:
    def __init__(self, api, namespace):
        self.ns = namespace
        self.custom = client.CustomObjectsApi(api)
        self.apps, self.batch, self.core = client.AppsV1Api(api), client.BatchV1Api(api), client.CoreV1Api(api)

    def create(self, body):
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, "slmdeployments", body)

    def patch(self, name, spec):
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, "slmdeployments", name,
                                                          {"spec": spec})

    def get(self, name):
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, "slmdeployments", name)

    def status(self, name):
        return self.get(name).get("status") or {}

    def profiles(self):
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, "slmprofiles")["items"]

    def jobs(self):
        return self.batch.list_namespaced_job(self.ns).items

    def statefulset(self, name):
        return self.apps.read_namespaced_stateful_set(name, self.ns)

    def write_profile(self, name, knee=16, replication=((1, 300.0), (2, 390.0))):
        """What the profiler writes when it finishes (simulated here; the profiler has its own tests)."""
        status = {"phase": "Ready", "profilingPhase": "Done", "message": "measured",
                  "knee": {"batchSize": knee, "rule": "bca(eps=20%, L=5)", "throughputTokensPerS": 300.0},
                  # Three runs per count, tight enough that a 30 % gain is significant.
                  "replication": [{"replicas": k, "batchSizePerReplica": knee, "aggregateThroughputTokensPerS": t,
                                   "runsTokensPerS": [t * 0.99, t, t * 1.01], "p99ItlMs": 40.0}
                                  for k, t in replication],
                  "recommendedReplicas": max(replication, key=lambda r: r[1])[0],
                  "sweep": {"mode": "adaptive", "probes": 4, "durationS": 120.0}}
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.ns, "slmprofiles", name,
                                                          {"status": status})


@pytest.fixture
def k(cluster, namespace):
    return Cluster(cluster, namespace)


def engine_args(sts):
    return sts.spec.template.spec.containers[0].args


def test_auto_profiles_once_then_packs_replicas_from_the_profile(k):
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment("chat"))
        profile = wait(lambda: k.profiles(), what="an SLMProfile")[0]["metadata"]["name"]
        job = wait(lambda: k.jobs(), what="the profiling Job")[0]
        assert job.metadata.owner_references[0].name == profile
        assert job.spec.template.spec.service_account_name == "slmpack-profiler"
        assert wait(lambda: k.status("chat").get("phase") == "Profiling", what="phase Profiling")
        k.write_profile(profile)
        sts = wait(lambda: k.statefulset("chat"), what="the StatefulSet")
        assert sts.spec.replicas == 2 and sts.spec.pod_management_policy == "Parallel"  # CPU
        assert engine_args(sts)[engine_args(sts).index("--max-num-seqs") + 1] == "16"
        assert k.core.read_namespaced_service("chat", k.ns).spec.ports[0].port == 8000
        status = wait(lambda: k.status("chat").get("plan") and k.status("chat"), what="a plan in status")
        assert status["plan"]["replicas"] == 2 and status["plan"]["kneeBatchSize"] == 16
        assert status["profile"] == profile
        assert status["observedGeneration"] == 1
        assert {c["type"]: c["status"] for c in status["conditions"]}["ProfileReady"] == "True"
        assert len(k.jobs()) == 1
    assert runner.exception is None, runner.output


def test_fixed_replicas_skip_profiling(k):
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment("fixed", replicas=3))
        sts = wait(lambda: k.statefulset("fixed"), what="the StatefulSet")
        assert sts.spec.replicas == 3
        assert k.profiles() == [] and k.jobs() == []
        reasons = {c["type"]: c["reason"] for c in wait(lambda: k.status("fixed").get("conditions"))}
        assert reasons["ProfileReady"] == "ProfilingSkipped"
    assert runner.exception is None, runner.output


def test_two_deployments_share_one_profile_and_a_spec_change_replans(k):
    with KopfRunner(operator(k.ns)) as runner:
        # Its profiling Job never runs, so only the test writes the profile.
        k.create(deployment("a", engine={"device": "cpu", "image": MISSING_IMAGE}))
        profile = wait(lambda: k.profiles(), what="an SLMProfile")[0]["metadata"]["name"]
        k.write_profile(profile)
        wait(lambda: k.statefulset("a"), what="StatefulSet a")
        k.create(deployment("b", port=9000, engine={"device": "cpu", "image": MISSING_IMAGE}))
        sts = wait(lambda: k.statefulset("b"), what="StatefulSet b")
        # The reconcile that applied the StatefulSet adds the user and writes the status after it.
        wait(lambda: k.status("b").get("profile") == profile, what="b's status naming the profile")
        wait(lambda: {o["name"] for o in k.profiles()[0]["metadata"].get("ownerReferences", [])} == {"a", "b"},
             what="a and b as the profile's users")
        assert len(k.profiles()) == 1 and len(k.jobs()) == 1
        assert sts.spec.replicas == 2

        k.patch("b", {"replicas": 1})
        wait(lambda: k.statefulset("b").spec.replicas == 1, what="b re-planned to 1 replica")
        k.patch("b", {"replicas": "auto", "profiling": {"workload": {"inputTokens": 64}}})
        wait(lambda: len(k.profiles()) == 2, what="a second profile for the new workload")
        wait(lambda: len(k.jobs()) == 2, what="a second profiling Job")
        assert wait(lambda: k.status("b").get("phase") == "Profiling", what="b profiling again")
    assert runner.exception is None, runner.output


def test_an_operator_killed_mid_profiling_resumes_without_a_second_job(k):
    with KopfRunner(operator(k.ns)):
        k.create(deployment("resume"))
        wait(lambda: k.jobs(), what="the profiling Job")
    with KopfRunner(operator(k.ns)) as runner:
        time.sleep(6)  # several timer rounds
        assert len(k.jobs()) == 1 and len(k.profiles()) == 1
        k.write_profile(k.profiles()[0]["metadata"]["name"])
        wait(lambda: k.statefulset("resume"), what="the StatefulSet after the restart")
    assert runner.exception is None, runner.output


def test_deletion_leaves_nothing_behind(k):
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment("gone"))
        profile = wait(lambda: k.profiles(), what="an SLMProfile")[0]["metadata"]["name"]
        k.write_profile(profile)
        wait(lambda: k.statefulset("gone"), what="the StatefulSet")
        assert not k.get("gone")["metadata"].get("finalizers"), "deletion must not wait for the operator"
        k.custom.delete_namespaced_custom_object(GROUP, VERSION, k.ns, "slmdeployments", "gone")
        wait(lambda: not k.apps.list_namespaced_stateful_set(k.ns).items, 60, "the StatefulSet to be collected")
        wait(lambda: not [s for s in k.core.list_namespaced_service(k.ns).items], 60, "the Service to be collected")
        wait(lambda: not k.profiles(), 60, "the profile of its only user to be collected")
        wait(lambda: not k.jobs(), 60, "the profiling Job to be collected")
    assert runner.exception is None, runner.output


def test_a_crash_looping_replica_marks_the_deployment_degraded(k, busybox_image):
    with KopfRunner(operator(k.ns)) as runner:
        # busybox has no python3: the engine command cannot start, so the replica crash-loops.
        k.create(deployment("broken", replicas=1, engine={"device": "cpu", "image": busybox_image}))
        # Its GPU slot may have to come free first: engine pods of earlier tests keep theirs for their grace period.
        status = wait(lambda: k.status("broken").get("phase") == "Degraded" and k.status("broken"),
                      ENGINE_GRACE_SECONDS + 60, lambda: f"phase Degraded ({k.status('broken')['conditions']})")
        available = next(c for c in status["conditions"] if c["type"] == "Available")
        assert available["reason"] == "ReplicaFailing" and "broken-0" in available["message"]
    assert runner.exception is None, runner.output


def test_a_replica_no_node_can_hold_is_reported_with_the_schedulers_reason(k):
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment("huge", replicas=1, resources={"limits": {"memory": "64Ti"}}))
        available = wait(lambda: next((c for c in k.status("huge").get("conditions") or []
                                       if c["type"] == "Available" and c["reason"] == "ReplicaUnschedulable"), None),
                         60, "the unschedulable replica to be reported")
        assert "replica huge-0 waits for a node: 0/1 nodes are available: 1 Insufficient memory" in \
            available["message"], available
        assert k.status("huge")["phase"] == "Deploying"
    assert runner.exception is None, runner.output


BAD_AT_APPLY = [
    ({"sharing": "mig"}, "spec.sharing"),
    ({"gpu": {"nodeSelector": {"zone": "not a label value"}}}, "spec.gpu.nodeSelector"),
    ({"resources": {"limits": {"memory": "lots"}}}, "spec.resources.limits"),
    ({"engine": {"env": [{"name": "1 X"}]}}, "spec.engine.env"),
    ({"profiling": {"batchSizes": [8, 8]}}, "spec.profiling.batchSizes"),
    ({"profiling": {"jobActiveDeadlineSeconds": 5}}, "spec.profiling.jobActiveDeadlineSeconds"),
    ({"replicas": 0}, "spec.replicas"),
    ({"replicas": "many"}, "spec.replicas"),
    ({"profiling": {"efficiencyThresholdPercent": 0}}, "spec.profiling.efficiencyThresholdPercent"),
    ({"port": 80}, "spec.port"),
    ({"model": {"name": ""}}, "spec.model.name"),
]


@pytest.mark.parametrize("spec, field", BAD_AT_APPLY, ids=[f for _, f in BAD_AT_APPLY])
def test_bad_specs_are_rejected_at_apply(k, spec, field):
    with pytest.raises(ApiException) as error:
        k.create(deployment("bad", **spec))
    assert error.value.status == 422 and field in error.value.body


# What CEL rules refuse at apply from Kubernetes 1.25 (this 1.20 apiserver ignores them, so the operator must),
# and what only the operator can judge: a node directory the cluster admin does not allow (none here).
BAD_AT_RECONCILE = [
    ({"model": {"name": "/models/m", "volume": {"hostPath": "/etc"}}}, "spec.model.volume.hostPath (/etc) is not"),
    ({"profiling": {"minBatchSize": 64, "maxBatchSize": 8}}, "spec.profiling.minBatchSize"),
    ({"gpu": {"nodeSelector": {"bad key!": "x"}}}, "spec.gpu.nodeSelector"),
    ({"model": {"name": "/data/m", "volume": {"hostPath": "/srv/m"}}}, "spec.model.name must be a path under"),
    ({"gpu": {"product": "NVIDIA-A100-SXM4-40GB"}}, "spec.gpu: no node offers"),
    ({"replicas": 9}, "spec.replicas (9) exceeds the 4 sharing slots"),
    ({"model": {"name": "m", "maxModelLen": 128}}, "spec.profiling.workload needs 256 tokens"),
]


def test_bad_specs_are_marked_invalid_with_an_event_and_create_nothing(k):
    with KopfRunner(operator(k.ns)) as runner:
        for i, (spec, _) in enumerate(BAD_AT_RECONCILE):
            k.create(deployment(f"bad-{i}", **spec))
        for i, (_, message) in enumerate(BAD_AT_RECONCILE):
            status = wait(lambda i=i: k.status(f"bad-{i}").get("phase") == "Failed" and k.status(f"bad-{i}"),
                          what=f"bad-{i} marked Failed")
            invalid = next(c for c in status["conditions"] if c["type"] == "InvalidSpec")
            assert invalid["status"] == "True" and message in invalid["message"], invalid
        events = wait(lambda: [e for e in k.core.list_namespaced_event(k.ns).items if e.reason == "InvalidSpec"],
                      what="InvalidSpec events")
        assert len({e.involved_object.name for e in events}) == len(BAD_AT_RECONCILE)
        assert k.apps.list_namespaced_stateful_set(k.ns).items == [] and k.jobs() == [] and k.profiles() == []
    assert runner.exception is None, runner.output


def test_an_allowed_model_directory_over_the_engine_cache_stops_the_operator_at_start(k, monkeypatch):
    # Engines write the cache, symlinks included: a model volume there could lead anywhere on the node.
    monkeypatch.setenv("SLMPACK_MODEL_HOST_PATH_PREFIXES", "/var/lib/slmpack")
    monkeypatch.setenv("SLMPACK_ENGINE_CACHE_HOST_PATH", "/var/lib/slmpack/engine-cache")
    runner = KopfRunner(operator(k.ns), reraise=False)
    with runner:
        wait(runner.future.done, 60, "the operator to stop")
    assert runner.exit_code != 0
    assert "overlaps the engine cache" in str(runner.exception.__cause__), runner.output


def test_a_name_at_the_limit_gets_its_statefulset_service_and_pods(k):
    name = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253 characters, the longest legal name
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment(name, replicas=1, engine={"device": "cpu", "image": "registry.invalid/absent:0"}))
        status = wait(lambda: k.status(name).get("endpoint") and k.status(name), 60, "the endpoint in status")
        child = status["endpoint"].split("//")[1].split(".")[0]
        assert len(child) <= 52 and k.statefulset(child).spec.service_name == child
        pod = wait(lambda: k.core.list_namespaced_pod(
            k.ns, label_selector="app.kubernetes.io/name=slmpack-engine").items, 60, "the replica pod")[0]
        assert pod.metadata.name == f"{child}-0"
        assert len(pod.metadata.labels["controller-revision-hash"]) <= 63
        wait(lambda: k.status(name).get("readyReplicas") == 0, 30, "its replica followed in status")
    assert runner.exception is None, runner.output


def test_the_generated_crds_are_what_kubectl_explain_serves(cluster, node_kubeconfig):
    kubectl = Path.home() / ".cache/slmpack/k8s-1.20.2/bin/kubectl"
    explained = subprocess.run([kubectl, "--kubeconfig", node_kubeconfig, "explain", "slmdeployment.spec.sharing"],
                               capture_output=True, text=True, check=True).stdout
    assert "How co-located replicas share one GPU" in explained
    assert yaml.safe_load((ROOT / "crds/slmdeployments.slmpack.dev.yaml").read_text())["spec"]["names"]["shortNames"]


def ready_profile(k, name, knee):
    """A measured SLMProfile for spec.profiling.profileRef (as the profiler writes it)."""
    k.custom.create_namespaced_custom_object(GROUP, VERSION, k.ns, "slmprofiles", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SLMProfile", "metadata": {"name": name},
        "spec": {"conditions": {"model": "/models/SmolLM2-135M-Instruct", "device": "cpu", "maxModelLen": 512}}})
    k.write_profile(name, knee=knee, replication=((1, 100.0), (2, 150.0)))


class Traffic(threading.Thread):
    """One completion at a time through the Service's ClusterIP, counting what fails."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url, self.ok, self.failures, self.stop = url, 0, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                reply = httpx.post(self.url, timeout=60, json={
                    "model": "roll", "prompt": "The capital of France is", "max_tokens": 4})
                reply.raise_for_status()
                self.ok += 1
            except httpx.HTTPError as error:
                self.failures.append(f"{time.strftime('%X')} {error!r}")
            time.sleep(0.1)


@pytest.mark.engine
def test_a_plan_change_rolls_the_replicas_while_the_service_keeps_answering(k):
    ready_profile(k, "knee-8", knee=8)
    ready_profile(k, "knee-4", knee=4)
    spec = {"model": {"name": "/models/SmolLM2-135M-Instruct", "maxModelLen": 512},
            "engine": {"device": "cpu", "image": "slmpack/engine-cpu:0.1.0", "cpuKvCacheSpaceGib": 1,
                       "extraArgs": ["--enforce-eager"]},  # four starts: seconds each, not minutes
            "gpu": {"resourceName": GPU_RESOURCE}, "profiling": {"profileRef": "knee-8"},
            "resources": {"requests": {"cpu": "100m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}}
    with KopfRunner(operator(k.ns)) as runner:
        k.create({**deployment("roll"), "spec": spec})
        wait(lambda: k.status("roll").get("readyReplicas") == 2, 600, "two replicas ready")
        service = k.core.read_namespaced_service("roll", k.ns).spec.cluster_ip
        traffic = Traffic(f"http://{service}:8000/v1/completions")
        traffic.start()
        wait(lambda: traffic.ok >= 3, 60, "traffic through the Service")
        k.patch("roll", {"profiling": {"profileRef": "knee-4"}})  # the plan changes: --max-num-seqs 8 -> 4

        def rolled():
            sts = k.statefulset("roll")
            args = engine_args(sts)
            # Until the controller has seen the new template, its status still describes the old one.
            return (args[args.index("--max-num-seqs") + 1] == "4"
                    and sts.status.observed_generation == sts.metadata.generation
                    and sts.status.update_revision == sts.status.current_revision
                    and sts.status.updated_replicas == 2 and sts.status.ready_replicas == 2)

        wait(rolled, 600, "both replicas rolled to the new plan and ready")
        time.sleep(3)
        traffic.stop.set()
        traffic.join(70)
        assert traffic.failures == [], f"{len(traffic.failures)} failed of {traffic.ok + len(traffic.failures)}"
        assert traffic.ok > 20
    assert runner.exception is None, runner.output
