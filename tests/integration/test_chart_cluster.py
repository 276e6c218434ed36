"""The chart on the real local cluster: two releases side by side; an upgrade from the previous
chart version under a live SLMDeployment; and the release's own Prometheus (Debian's, discovering
pods by annotation) evaluating joules per token and every dashboard query from a live engine.

The previous version is the chart as main last shipped it before 0.2.0, taken from git history.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
import uuid
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from e2e.cluster.nvidia_device_plugin import GpuNode
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.fixtures.cluster import IMAGES, local_image

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.engine, pytest.mark.prometheus]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "slmpack"
HELM = Path.home() / ".cache/slmpack/helm-3.17/helm"
KUBECTL = Path.home() / ".cache/slmpack/k8s-1.20.2/bin/kubectl"
PREVIOUS_CHART_COMMIT = "a84985a70aec18210b159191f7b823db183f9b6b"  # chart 0.1.0
GROUP, VERSION = "slmpack.dev", "v1alpha1"
NAME = "chat"
# Built by `make images` (a prerequisite of `make test`), imported into the node here.
CHART_IMAGES = ["slmpack/operator:0.1.0", "slmpack/exporter:0.1.0"]
# The operator chart 0.1.0 shipped, built from that commit (the current build reuses its tag).
PREVIOUS_OPERATOR_TAG = "0.1.0-previous"
SERVING_IMAGES = ["slmpack/engine-cpu:0.1.0", "slmpack/prometheus:0.1.0"]


def run(kubeconfig: Path, *args: str, timeout: int = 600) -> str:
    done = subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert done.returncode == 0, f"{' '.join(map(str, args))}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


def wait(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (ApiException, httpx.HTTPError) as error:
            last = error
        if last and not isinstance(last, Exception):
            return last
        time.sleep(1)
    raise AssertionError(f"timed out after {seconds}s waiting for {what} (last: {last})")


def release_values(app_namespace: str) -> list[str]:
    """A CPU test bed release that watches only the app namespace, so releases do not overlap."""
    return ["--set", "devMode.cpu=true", "--set", "exporter.runtimeClassName=", "--set", "rbac.scope=namespaces",
            "--set", f"rbac.watchNamespaces={{{app_namespace}}}",
            "--set", f"devMode.fakeDeployment={app_namespace}/{NAME}"]


@pytest.fixture(scope="module")
def images(node_kubeconfig):
    for tag in CHART_IMAGES:
        local_image(tag)


@pytest.fixture
def app_namespace(api_client):
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": name, "labels": {"slmpack.dev/test": "true"}}})
    wait(lambda: core.read_namespaced_service_account("default", name).secrets, 60, "the default token")
    yield name
    core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture
def releases(node_kubeconfig, images):
    """Installed releases, uninstalled afterwards (with their cluster-scoped objects)."""
    installed: list[tuple[str, str]] = []
    yield installed
    for release, namespace in installed:
        subprocess.run([HELM, "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "3m"],
                       capture_output=True, env={**os.environ, "KUBECONFIG": str(node_kubeconfig)})


def cluster_scoped(kubeconfig: Path, release: str) -> set[tuple[str, str]]:
    out = run(kubeconfig, KUBECTL, "get", "clusterroles,clusterrolebindings", "-o", "json",
              "-l", f"app.kubernetes.io/instance={release}")
    return {(i["kind"], i["metadata"]["name"]) for i in json.loads(out)["items"]}


def test_two_releases_install_side_by_side_and_uninstall_cleanly(node_kubeconfig, namespace, app_namespace,
                                                                  api_client, releases):
    core = client.CoreV1Api(api_client)
    second_system = f"{namespace}-b"
    core.create_namespace({"metadata": {"name": second_system, "labels": {"slmpack.dev/test": "true"}}})
    try:
        names = [f"r{uuid.uuid4().hex[:6]}", f"r{uuid.uuid4().hex[:6]}"]
        for release, system in zip(names, (namespace, second_system), strict=True):
            run(node_kubeconfig, HELM, "install", release, CHART, "--namespace", system, "--wait", "--timeout", "5m",
                *release_values(app_namespace))
            releases.append((release, system))
        first, second = (cluster_scoped(node_kubeconfig, r) for r in names)
        assert first and len(first) == len(second) and not first & second
        for release, system in releases:
            run(node_kubeconfig, HELM, "uninstall", release, "--namespace", system, "--wait")
            assert cluster_scoped(node_kubeconfig, release) == set()
        releases.clear()
    finally:
        core.delete_namespace(second_system, propagation_policy="Background")


def ready(pod: client.V1Pod) -> bool:
    statuses = pod.status.container_statuses or []
    return bool(statuses) and all(s.ready for s in statuses)


def previous_tree(tmp_path: Path) -> Path:
    """The project's files as chart 0.1.0 shipped them."""
    archive = subprocess.run(["git", "archive", "--format=tar", PREVIOUS_CHART_COMMIT], cwd=ROOT,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path


@pytest.fixture(scope="module")
def previous(node_kubeconfig, tmp_path_factory) -> Path:
    """Chart 0.1.0's tree, with its operator image built (once; cached as a tar keyed by its inputs) and on
    the node: today's operator under 0.1.0's RBAC would be refused what it now watches."""
    tree = previous_tree(tmp_path_factory.mktemp("previous"))
    subprocess.run([IMAGES, "build", f"slmpack/operator:{PREVIOUS_OPERATOR_TAG}", tree / "images/slmpack.Dockerfile",
                    tree], check=True, capture_output=True, timeout=1800, env={**os.environ, "TARGET": "operator"})
    local_image(f"slmpack/operator:{PREVIOUS_OPERATOR_TAG}")
    return tree


def slmdeployment() -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SLMDeployment", "metadata": {"name": NAME}, "spec": {
        "model": {"name": "/models/SmolLM2-135M-Instruct", "maxModelLen": 512},
        "engine": {"device": "cpu", "image": "slmpack/engine-cpu:0.1.0", "cpuKvCacheSpaceGib": 1,
                   "extraArgs": ["--enforce-eager"]},  # starts in seconds, not minutes of compiling
        "sharing": "mps", "replicas": 1,
        "resources": {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "6Gi"}}}}


def available(custom, namespace):
    body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "slmdeployments", NAME)
    return any(c["type"] == "Available" and c["status"] == "True" for c in (body.get("status") or {}).get(
        "conditions", []))


def complete(core, namespace) -> str:
    ip = core.read_namespaced_service(NAME, namespace).spec.cluster_ip
    body = {"model": NAME, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    answer = httpx.post(f"http://{ip}:8000/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    assert answer.strip()
    return answer


def answers(core, namespace) -> str:
    """A completion through the Service once it sends to the ready replica, directly or through the
    deployment's ready routers (the Service selects them once one is ready). A pod turns Ready before the
    endpoints controller lists it and kube-proxy writes its rules; until then the ClusterIP refuses."""
    seen = {}

    def listed():
        selector = core.read_namespaced_service(NAME, namespace).spec.selector or {}
        pods = core.list_namespaced_pod(namespace, label_selector=",".join(f"{k}={v}" for k, v in selector.items()))
        wanted = {p.status.pod_ip for p in pods.items if p.status.pod_ip}
        subsets = core.read_namespaced_endpoints(NAME, namespace).subsets or []
        addresses = {a.ip for s in subsets for a in s.addresses or []}
        found = [(p.metadata.name, p.status.pod_ip, ready(p)) for p in pods.items]
        seen["last"] = (f"the Service selects {selector}: pods {found}; endpoints ready {sorted(addresses)}, not ready "
                        f"{sorted(a.ip for s in subsets for a in s.not_ready_addresses or [])}")
        return bool(wanted & addresses)

    try:
        # The Service moves to the routers once one is ready; on a loaded node that takes the operator, the
        # agent and two readiness probes in turn.
        wait(listed, 180, "the Service's endpoints to list the ready replica")
    except AssertionError as error:
        raise AssertionError(f"{error}; {seen.get('last')}") from None
    return wait(lambda: complete(core, namespace), 60, "the Service to answer")


def query(url: str, expr: str) -> list[dict]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def serve(api_client, app_namespace: str, emulated_plugin) -> None:
    """A live SLMDeployment of one CPU replica (no profiling), once Available and answering. The node
    shares its GPU by MPS, as the spec asks, whatever an earlier test left the emulated plugin doing."""
    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    emulated_plugin.start(GpuNode(sharing="mps", replicas=4))
    for tag in SERVING_IMAGES:
        local_image(tag)
    custom.create_namespaced_custom_object(GROUP, VERSION, app_namespace, "slmdeployments", slmdeployment())
    wait(lambda: available(custom, app_namespace), 900, "the SLMDeployment to become Available")
    assert answers(core, app_namespace)


def test_upgrade_from_the_previous_chart_keeps_a_live_slmdeployment_serving(
        node_kubeconfig, namespace, app_namespace, api_client, releases, previous, emulated_plugin):
    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    try:
        labels = rbac.read_cluster_role("slmpack-profiler").metadata.labels or {}
        holder = labels.get("app.kubernetes.io/instance", "another installation")
        pytest.skip(f"{holder} holds ClusterRole slmpack-profiler: chart 0.1.0 named it alike for every "
                    "release (the collision 0.2.0 fixes), so it cannot install beside it")
    except ApiException as error:
        if error.status != 404:
            raise
    release = f"r{uuid.uuid4().hex[:6]}"

    # Chart 0.1.0, its CRDs and its operator, with a live, serving SLMDeployment.
    run(node_kubeconfig, KUBECTL, "apply", "--server-side", "--force-conflicts", "-f",
        previous / "charts/slmpack/crds")
    run(node_kubeconfig, HELM, "install", release, previous / "charts/slmpack", "--namespace", namespace, "--wait",
        "--timeout", "5m", *release_values(app_namespace), "--set", f"operator.image.tag={PREVIOUS_OPERATOR_TAG}")
    releases.append((release, namespace))
    serve(api_client, app_namespace, emulated_plugin)

    # The documented upgrade: CRDs first (helm never upgrades crds/), then the chart. Kubernetes 1.20 knows
    # no CEL rules (x-kubernetes-validations, 1.25+), so the README's form for it: client-side, unvalidated.
    run(node_kubeconfig, KUBECTL, "apply", "--validate=false", "-f", CHART / "crds")
    run(node_kubeconfig, HELM, "upgrade", release, CHART, "--namespace", namespace, "--wait", "--timeout", "5m",
        *release_values(app_namespace))

    # The new operator takes the deployment over: 0.2.0's replicas differ from 0.1.0's (unbound CPU threads,
    # a drain hook), so the replica is replaced once, and the deployment serves again on its own.
    wait(lambda: engine_on_the_new_template(api_client, app_namespace),
         600, "the replica on 0.2.0's template")
    wait(lambda: available(custom, app_namespace), 600, "the SLMDeployment to be Available again")
    assert answers(core, app_namespace)
    # The new operator, with the new RBAC, reconciles it: a deleted Service comes back.
    # Not deserialized: the 1.20 apiserver answers a Service's deletion with a Status, not the Service.
    core.delete_namespaced_service(NAME, app_namespace, _preload_content=False)
    core.patch_namespaced_pod(f"{NAME}-0", app_namespace, {"metadata": {"annotations": {"test/poke": "1"}}})
    wait(lambda: core.read_namespaced_service(NAME, app_namespace), 120, "the operator to re-create the Service")
    assert answers(core, app_namespace)


def engine_on_the_new_template(api_client, namespace: str) -> bool:
    """The StatefulSet rolled to what the current operator builds, and its replica ready on it."""
    sts = client.AppsV1Api(api_client).read_namespaced_stateful_set(NAME, namespace)
    env = {e.name for e in sts.spec.template.spec.containers[0].env or []}
    pod = client.CoreV1Api(api_client).read_namespaced_pod(f"{NAME}-0", namespace)
    return ("VLLM_CPU_OMP_THREADS_BIND" in env and sts.status.update_revision == sts.status.current_revision
            and pod.metadata.labels.get("controller-revision-hash") == sts.status.update_revision and ready(pod))


def engine_from_the_operators_builders(api_client, namespace: str) -> None:
    """The engine StatefulSet and Service exactly as the operator builds them (labels, prometheus.io
    annotations), applied directly: this test is about discovery, not reconciling. On the CPU test
    bed the engine needs no GPU slot, so the pod asks for none."""
    from slmpack.core.manifests import Owner, build_service, build_statefulset
    from slmpack.core.planner import plan
    from slmpack.core.validation import parse_spec

    spec = parse_spec(slmdeployment()["spec"])
    owner = Owner(kind="SLMDeployment", name=NAME, uid="unowned", namespace=namespace)
    statefulset, service = build_statefulset(owner, spec, plan(spec, None), None), build_service(owner, spec)
    for obj in (statefulset, service):
        del obj["metadata"]["ownerReferences"]
    del statefulset["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][spec.gpu.resource_name]
    client.AppsV1Api(api_client).create_namespaced_stateful_set(namespace, statefulset)
    client.CoreV1Api(api_client).create_namespaced_service(namespace, service)


def test_the_releases_prometheus_discovers_the_pods_and_evaluates_joules_per_token(
        node_kubeconfig, namespace, app_namespace, api_client, releases):
    core = client.CoreV1Api(api_client)
    for tag in SERVING_IMAGES:  # before the install, which waits for Prometheus to be ready
        local_image(tag)
    release = f"r{uuid.uuid4().hex[:6]}"
    run(node_kubeconfig, HELM, "install", release, CHART, "--namespace", namespace, "--wait", "--timeout", "5m",
        *release_values(app_namespace), "--set", "monitoring.prometheus.enabled=true",
        "--set", "monitoring.prometheus.scrapeInterval=2s")
    releases.append((release, namespace))
    engine_from_the_operators_builders(api_client, app_namespace)
    wait(lambda: ready(core.read_namespaced_pod(f"{NAME}-0", app_namespace)), 900, "the engine to be ready")

    # The release's Prometheus discovered the exporter and the engine by annotation.
    prometheus = wait(lambda: next((p.status.pod_ip for p in core.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/component=prometheus").items
        if p.status.pod_ip and ready(p)), None),
        180, "the release's Prometheus to be ready")
    url = f"http://{prometheus}:9090"

    def scraped():
        targets = httpx.get(f"{url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        up = {(t["labels"]["job"], t["labels"].get("component") or f'{t["labels"]["namespace"]}/{t["labels"]["pod"]}')
              for t in targets if t["health"] == "up"}
        return up if {("slmpack-engines", f"{app_namespace}/{NAME}-0"), ("slmpack", "exporter")} <= up else None

    wait(scraped, 120, "the exporter and the engine to be scraped")

    # Traffic across scrapes; then the J/token rule evaluates from the discovered series.
    for _ in range(4):
        complete(core, app_namespace)
        time.sleep(2.5)
    selector = f'{{namespace="{app_namespace}", slmdeployment="{NAME}"}}'
    joules = wait(lambda: query(url, f"slmpack:energy_per_token:joules{selector}"), 180, "J/token")
    assert float(joules[0]["value"][1]) > 0

    # Grafana cannot run here (no registry ships it); every dashboard query is checked instead. This release
    # runs no router, so the routing panels must only evaluate; test_router checks their series against a
    # real HAProxy's exporter.
    dashboard = json.loads((ROOT / "deploy/grafana/slmpack-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if "haproxy_" in target["expr"]:
                query(url, target["expr"])
            else:
                assert wait(lambda e=target["expr"]: query(url, e), 120,
                            f"panel {panel['title']!r}: {target['expr']}")
