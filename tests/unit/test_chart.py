"""The Helm chart: lint, render, least-privilege RBAC, strict values, files in sync."""

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "slmpack"
HELM = Path.home() / ".cache/slmpack/helm-3.17/helm"


@pytest.fixture(scope="module")
def helm() -> Path:
    if not HELM.exists():
        subprocess.run(["make", "-s", "helm"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    return HELM


def render(helm, *sets, values: Path | None = None) -> list[dict]:
    args = [str(helm), "template", "demo", str(CHART), "--namespace", "slmpack-system"]
    if values is not None:
        args += ["--values", str(values)]
    for s in sets:
        args += ["--set", s]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_lint_passes(helm):
    done = subprocess.run([str(helm), "lint", str(CHART)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_defaults_render_only_what_kubernetes_1_20_serves(helm):
    kinds = {(d["apiVersion"], d["kind"]) for d in render(helm)}
    assert kinds == {("v1", "ServiceAccount"), ("v1", "Service"), ("apps/v1", "Deployment"),
                     ("apps/v1", "DaemonSet"), ("rbac.authorization.k8s.io/v1", "ClusterRole"),
                     ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
                     # the leader election's Lease, in the operator's namespace
                     ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding")}


def test_operator_runs_one_replica_non_root_read_only_under_seccomp(helm):
    operator = next(d for d in render(helm) if d["kind"] == "Deployment")
    pod = operator["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert operator["spec"]["replicas"] == 1 and operator["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"] and container["readinessProbe"] and container["resources"]["limits"]
    assert container["image"] == "slmpack/operator:0.1.0"


def test_a_starved_operator_is_given_time_rather_than_killed(helm):
    # Seen on the test bed: two CPU engines under load left the operator (50m of CPU asked) so little that
    # it answered /healthz in more than a second and took over a minute to start; the old liveness probe
    # killed it every time, and it never reconciled again while the load lasted.
    operator = next(d for d in render(helm) if d["kind"] == "Deployment")
    container = operator["spec"]["template"]["spec"]["containers"][0]
    start, live = container["startupProbe"], container["livenessProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 300
    assert live["timeoutSeconds"] >= 5 and live["periodSeconds"] * live["failureThreshold"] >= 120
    assert container["readinessProbe"]["timeoutSeconds"] >= 5


def test_rbac_is_least_privilege(helm):
    roles = {d["metadata"]["name"]: d["rules"] for d in render(helm) if d["kind"] in ("ClusterRole", "Role")}
    for name, rules in roles.items():
        for rule in rules:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], name
            assert not {"deletecollection", "escalate", "impersonate"} & set(rule["verbs"]), name
    # What the operator deletes: a pack's StatefulSet once the pack is no longer wanted, a DRA pack's old
    # ResourceClaim once no pod uses it, the engines' NetworkPolicy once spec.networkPolicy is unset, and the
    # router Deployment once spec.routing leaves router mode.
    deletes = [r for rules in roles.values() for r in rules if "delete" in r["verbs"]]
    assert sorted((r["apiGroups"], r["resources"]) for r in deletes) == [
        (["apps"], ["deployments"]), (["apps"], ["statefulsets"]), (["networking.k8s.io"], ["networkpolicies"]),
        (["resource.k8s.io"], ["resourceclaims"])]
    assert roles["demo-slmpack-profiler"] == [{"apiGroups": ["slmpack.dev"], "resources": ["slmprofiles/status"],
                                               "verbs": ["get", "patch"]}]
    binds = [r for rules in roles.values() for r in rules if "bind" in r["verbs"]]
    assert binds == [{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"],
                      "resourceNames": ["demo-slmpack-profiler", "demo-slmpack-router"]}]
    # A router's agent reads the Endpoints of its namespace, where the operator binds it, and nothing else.
    assert roles["demo-slmpack-router"] == [{"apiGroups": [""], "resources": ["endpoints"],
                                             "verbs": ["get", "list", "watch"]}]
    secrets = [r for rules in roles.values() for r in rules if "secrets" in r["resources"]]
    assert secrets == []
    # No one writes pods: the exporter runs as root on nodes that run tenants' images.
    pod_writes = [r for rules in roles.values() for r in rules if "pods" in r["resources"]
                  and set(r["verbs"]) - {"get", "list", "watch"}]
    assert pod_writes == []


def test_the_exporter_lists_pods_and_writes_configmaps_of_its_namespace_only(helm):
    docs = render(helm)
    exporter = "demo-slmpack-exporter"
    cluster_role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == exporter)
    assert cluster_role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == exporter]
    assert role["metadata"]["namespace"] == "slmpack-system"
    assert granted(role["rules"]) == exporter_calls()["configmaps"]
    assert granted(cluster_role["rules"]) == exporter_calls()["pods"]
    binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == exporter)
    assert binding["roleRef"]["name"] == exporter and binding["subjects"][0]["name"] == exporter
    # It publishes in the namespace where the operator reads.
    daemon = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    operator = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--gpu-assignments-namespace=slmpack-system" in daemon["args"]
    assert {"name": "SLMPACK_GPU_ASSIGNMENTS_NAMESPACE", "value": "slmpack-system"} in operator["env"]


def exporter_calls() -> dict[str, set[tuple[str, str, str]]]:
    """The exporter's API calls, from its code: `...api.<verb>_<scope>_<resource>(...)`, by resource."""
    calls: dict[str, set] = {}
    for path in (OPERATOR / "exporter").glob("*.py"):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "api"
                    or isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "api"):
                match = re.fullmatch(r"(list|read|create|patch|replace|delete)_(?:namespaced_)?(\w+?)"
                                     r"(?:_for_all_namespaces)?", node.func.attr)
                assert match, f"{path.name} calls api.{node.func.attr}, which this test cannot read"
                resource = match[2].replace("_", "") + "s"
                calls.setdefault(resource, set()).add(("", resource, CLIENT_VERBS[match[1]]))
    return calls


def test_namespace_scope_makes_roles_in_each_watched_namespace(helm):
    docs = render(helm, "rbac.scope=namespaces", "rbac.watchNamespaces={team-a,team-b}")
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "demo-slmpack-operator"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    operator = next(d for d in docs if d["kind"] == "Deployment")
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_cpu_dev_mode_serves_a_fake_gpu_without_the_nvidia_runtime(helm):
    exporter = next(d for d in render(helm, "devMode.cpu=true") if d["kind"] == "DaemonSet")
    pod = exporter["spec"]["template"]["spec"]
    assert "runtimeClassName" not in pod and "nodeSelector" not in pod and "hostPID" not in pod
    assert "--fake-devices=1:2" in pod["containers"][0]["args"]
    gpu = next(d for d in render(helm) if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert gpu["hostPID"] is True and "runtimeClassName" not in gpu


def exporter_pod(helm, *sets) -> dict:
    return next(d for d in render(helm, *sets) if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]


def test_the_exporter_runs_on_nodes_gpu_feature_discovery_labels_without_the_gpu_operator(helm):
    pod = exporter_pod(helm)
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    # nvidia.com/gpu.count is GFD's, with a plain device plugin too; gpu.present is the GPU Operator's alone.
    assert terms == [{"matchExpressions": [{"key": "nvidia.com/gpu.count", "operator": "Exists"}]}]
    assert "nodeSelector" not in pod and "runtimeClassName" not in pod
    chosen = exporter_pod(helm, "exporter.gpuNodeLabel=", "exporter.nodeSelector.gpu=yes",
                          "exporter.runtimeClassName=nvidia")
    assert "affinity" not in chosen and chosen["nodeSelector"] == {"gpu": "yes"}
    assert chosen["runtimeClassName"] == "nvidia"
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}]}}}
    assert exporter_pod(helm, "exporter.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution."
                              "nodeSelectorTerms[0].matchExpressions[0].key=pool",
                        "exporter.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution."
                        "nodeSelectorTerms[0].matchExpressions[0].operator=In",
                        "exporter.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution."
                        "nodeSelectorTerms[0].matchExpressions[0].values={gpu}")["affinity"] == own


@pytest.mark.parametrize("dev", [False, True], ids=["gpu", "cpu-dev"])
def test_the_exporter_hands_the_node_engine_cache_to_the_engines_uid(helm, dev):
    (exporter,) = [d for d in render(helm, f"devMode.cpu={str(dev).lower()}",
                                     "exporter.engineCacheHostPath=/var/lib/slmpack/engine-cache")
                   if d["kind"] == "DaemonSet"]
    pod = exporter["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    # Root's, the engines' group, setgid: the namespaces' directories the kubelet creates below inherit the group.
    assert init["command"][-1] == "chmod 2770 /cache && chown 0:10001 /cache"
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert {"name": "engine-cache", "hostPath": {"path": "/var/lib/slmpack/engine-cache",
                                                 "type": "DirectoryOrCreate"}} in pod["volumes"]
    assert ("pod-resources" in {v["name"] for v in pod["volumes"]}) is not dev
    plain = next(d for d in render(helm) if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert "initContainers" not in plain


def operator_env(docs: list[dict]) -> dict[str, str]:
    operator = next(d for d in docs if d["kind"] == "Deployment")
    return {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_the_operator_gets_the_default_engine_uid(helm):
    assert operator_env(render(helm))["SLMPACK_ENGINE_UID"] == "10001"


# From a values file too: Helm reads its numbers as floats, and a float of a million or more prints as 2e+06.
@pytest.mark.parametrize("uid", ["1000", "2000000"])
@pytest.mark.parametrize("given_by", ["set", "values file"])
def test_the_engine_uid_reaches_the_operator_and_the_engine_cache_group(helm, tmp_path, uid, given_by):
    cache = "exporter.engineCacheHostPath=/var/lib/slmpack/engine-cache"
    if given_by == "set":
        docs = render(helm, f"engine.uid={uid}", cache)
    else:
        (tmp_path / "values.yaml").write_text(f"engine: {{uid: {uid}}}\n")
        docs = render(helm, cache, values=tmp_path / "values.yaml")
    assert operator_env(docs)["SLMPACK_ENGINE_UID"] == uid
    (init,) = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][-1] == f"chmod 2770 /cache && chown 0:{uid} /cache"


def install_notes(helm, tmp_path: Path, *sets) -> str:
    """NOTES.txt as `helm install` prints it. `helm template` skips it and a client-only install still asks a
    cluster, so a copy of the chart renders it through `tpl` as an ordinary template."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "NOTES.txt").rename(chart / "notes.txt")
    (chart / "templates" / "notes.yaml").write_text('notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    args = [str(helm), "template", "demo", str(chart), "--namespace", "slmpack-system",
            "--show-only", "templates/notes.yaml"]
    for s in sets:
        args += ["--set", s]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["notes"]


def test_the_notes_warn_only_when_the_engine_uid_is_not_the_default(helm, tmp_path):
    assert "engine.uid" not in install_notes(helm, tmp_path / "default")
    notes = install_notes(helm, tmp_path / "set", "engine.uid=20000")
    assert "run as UID and GID 20000 (engine.uid)" in notes
    assert "An MPS server serves one UID at a time" in notes and "DRA claim" in notes
    assert "kubectl delete pods -A -l app.kubernetes.io/name=slmpack-engine" in notes
    assert "find" not in notes  # no node cache to empty
    cached = install_notes(helm, tmp_path / "cached", "engine.uid=20000",
                           "exporter.engineCacheHostPath=/var/lib/slmpack/engine-cache")
    assert "find /var/lib/slmpack/engine-cache -mindepth 1 -delete" in cached


def test_the_operator_allows_only_the_host_paths_the_admin_lists(helm):
    default = operator_env(render(helm))
    assert default["SLMPACK_MODEL_HOST_PATH_PREFIXES"] == "" and default["SLMPACK_ENGINE_CACHE_HOST_PATH"] == ""
    listed = operator_env(render(helm, "hostPaths.modelPrefixes={/data/models,/srv/weights}",
                                 "exporter.engineCacheHostPath=/var/lib/slmpack/engine-cache"))
    assert listed["SLMPACK_MODEL_HOST_PATH_PREFIXES"] == "/data/models:/srv/weights"
    assert listed["SLMPACK_ENGINE_CACHE_HOST_PATH"] == "/var/lib/slmpack/engine-cache"


@pytest.mark.parametrize("value, message", [
    ("hostPaths.modelPrefixes={data/models}", "Does not match pattern '^(/[^/:]+)+$'"),
    ("operator.logLevel=LOUD", "operator.logLevel must be one of"),
    ("operatr.logLevel=INFO", "Additional property operatr is not allowed"),
    ("devMode.fakeDevices=two", "devMode.fakeDevices: Does not match pattern"),
    ("exporter.gpuNodeLabel=not a label", "exporter.gpuNodeLabel: Does not match pattern"),
    ("engine.uid=0", "engine.uid: Must be greater than or equal to 1"),
    ("engine.uid=10001.5", "engine.uid: Invalid type. Expected: integer"),
    ("engine.uid=2147483648", "engine.uid: Must be less than or equal to"),
])
def test_a_wrong_value_fails_at_install_with_a_clear_message(helm, value, message):
    done = subprocess.run([str(helm), "template", "demo", str(CHART), "--set", value], capture_output=True, text=True)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_switches_add_monitoring_objects_from_the_shipped_files(helm):
    docs = render(helm, "monitoring.prometheusRule.enabled=true", "monitoring.grafanaDashboard.enabled=true",
                  "monitoring.podMonitor.enabled=true", "monitoring.serviceMonitor.enabled=true")
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    shipped = yaml.safe_load((ROOT / "deploy/prometheus/slmpack-rules.yaml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]
    assert any(d["kind"] == "ConfigMap" and "slmpack-dashboard.json" in d["data"] for d in docs)
    assert {d["kind"] for d in docs} >= {"PodMonitor", "ServiceMonitor"}


def test_the_dashboard_shows_the_router_queue_the_autoscaler_reads_under_the_monitors_label(helm):
    from slmpack.adapters.engine_metrics import ROUTER_QUEUE
    from slmpack.core.router import ROUTER_LABEL

    dashboard = json.loads((ROOT / "deploy/grafana/slmpack-dashboard.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert any(ROUTER_QUEUE in q and "slmdeployment" in q for q in queries), queries
    # The router pods' own label becomes `slmdeployment`, as the embedded Prometheus relabels it.
    docs = render(helm, "monitoring.podMonitor.enabled=true")
    routers = next(d for d in docs if d["kind"] == "PodMonitor"
                   and d["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "slmpack-router"})
    source = "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in ROUTER_LABEL)
    assert {"sourceLabels": [source], "targetLabel": "slmdeployment"} in \
        routers["spec"]["podMetricsEndpoints"][0]["relabelings"]


MONITORING_SCHEMAS = Path.home() / ".cache/slmpack/prometheus-operator-models"


def validate_monitors(objects: list[dict]) -> subprocess.CompletedProcess:
    if not (MONITORING_SCHEMAS / "6.0.0").exists():
        subprocess.run(["make", "-s", "monitoring-schemas"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    return subprocess.run(["node", str(ROOT / "deploy/prometheus/validate-monitors.mjs"), str(MONITORING_SCHEMAS)],
                          input=json.dumps(objects), capture_output=True, text=True, timeout=120)


def test_monitors_and_rules_match_the_prometheus_operator_schemas(helm):
    docs = render(helm, "monitoring.prometheusRule.enabled=true", "monitoring.podMonitor.enabled=true",
                  "monitoring.serviceMonitor.enabled=true")
    monitors = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {d["kind"] for d in monitors} == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    done = validate_monitors(monitors)
    assert done.returncode == 0, done.stdout + done.stderr
    # The check has teeth: an interval Prometheus cannot parse is refused by name.
    bad = next(d for d in monitors if d["kind"] == "ServiceMonitor")
    bad["spec"]["endpoints"][0]["interval"] = "fast"
    done = validate_monitors([bad])
    assert done.returncode == 1 and "spec/endpoints/0/interval" in done.stdout


@pytest.mark.parametrize("shipped, copy", [
    ("deploy/prometheus/slmpack-rules.yaml", "charts/slmpack/files/slmpack-rules.yaml"),
    ("deploy/prometheus/pod_sd.py", "charts/slmpack/files/pod_sd.py"),
    ("deploy/grafana/slmpack-dashboard.json", "charts/slmpack/files/slmpack-dashboard.json"),
])
def test_chart_files_equal_the_shipped_files(shipped, copy):
    assert (ROOT / copy).read_text() == (ROOT / shipped).read_text(), f"run `make chart-files` ({copy} drifted)"


def test_two_releases_name_every_cluster_scoped_object_apart(helm):
    def cluster_scoped(release):
        done = subprocess.run([str(helm), "template", release, str(CHART), "--namespace", f"{release}-system"],
                              capture_output=True, text=True, check=True)
        docs = [d for d in yaml.safe_load_all(done.stdout) if d]
        return {(d["kind"], d["metadata"]["name"]) for d in docs if "namespace" not in d["metadata"]}, docs

    first, _ = cluster_scoped("team-a")
    second, docs = cluster_scoped("team-b")
    assert first and not first & second
    # The operator binds the profiler role of its own release.
    operator = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    role = next(e["value"] for e in operator["env"] if e["name"] == "SLMPACK_PROFILER_CLUSTER_ROLE")
    assert ("ClusterRole", role) in second


def test_values_name_dockerfiles_and_stages_that_exist():
    named = re.findall(r"(images/[\w.-]+\.Dockerfile), stage (\w+)", (CHART / "values.yaml").read_text())
    assert len(named) == 2
    for dockerfile, stage in named:
        assert (ROOT / dockerfile).exists(), dockerfile
        assert re.search(rf"^FROM .* AS {stage}$", (ROOT / dockerfile).read_text(), re.M), (dockerfile, stage)


# ---------------------------------------------------------------- RBAC against the operator's calls
#
# The operator's API calls are read from its code: the Kube adapter methods the controller uses
# (each one's client method gives the verb and resource), the objects it applies or creates (the
# kinds returned by the manifest builders that the pure decision calls), the owners those objects
# point at, and the resources kopf lists and watches for the indices and event handlers. The chart
# must grant exactly those.

OPERATOR = ROOT / "operator" / "slmpack"
CONTROLLER = [OPERATOR / "controller" / name for name in ("handlers.py", "leader.py", "gpu_assignments.py")]
CLIENT_VERBS = {"list": "list", "read": "get", "get": "get", "create": "create", "patch": "patch", "replace": "update",
                "delete": "delete"}
CLIENT_GROUPS = {"core": "", "batch": "batch", "apps": "apps", "coordination": "coordination.k8s.io",
                 "networking": "networking.k8s.io"}
DRA_GROUP = "resource.k8s.io"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _methods(cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}


def _crd_plurals() -> set[str]:
    return {yaml.safe_load(p.read_text())["spec"]["names"]["plural"] for p in (ROOT / "crds").glob("*.yaml")}


def _kube_method_calls(method: ast.FunctionDef, plurals: set[str]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) of one Kube adapter method's client calls."""
    found = set()
    for node in ast.walk(method):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr == "stream":  # watch.Watch().stream(self.core.list_..., ...) watches
            listed = node.args[0]
            assert isinstance(listed, ast.Attribute) and listed.attr.startswith("list_namespaced_"), \
                f"Kube.{method.name} watches something this test cannot read"
            found.add((CLIENT_GROUPS[listed.value.attr], listed.attr.removeprefix("list_namespaced_").replace(
                "_", "") + "s", "watch"))
            continue
        found |= _client_use(method, node.func, node.args, plurals)
    # A client method handed on uncalled (delete_as_read(self.apps.delete_namespaced_deployment, ...)) is used too.
    for node in ast.walk(method):
        if isinstance(node, ast.Call):
            for argument in node.args:
                if isinstance(argument, ast.Attribute):
                    found |= _client_use(method, argument, [], plurals)
    return found


def _client_use(method: ast.FunctionDef, function: ast.Attribute, args: list, plurals: set[str]) -> set:
    """(group, resource, verb) of `self.<client>.<verb>_...`, called with `args` or handed on; empty otherwise."""
    found = set()
    target = function.value
    if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
            and target.attr in {*CLIENT_GROUPS, "custom"}):
        return found
    match = re.fullmatch(r"(list|read|get|create|patch|replace|delete)_(?:namespaced_|cluster_)?(\w+?)(_status)?",
                         function.attr)
    assert match, f"Kube.{method.name} calls {target.attr}.{function.attr}, which this test cannot read"
    verb, resource, status = CLIENT_VERBS[match[1]], match[2], "/status" if match[3] else ""
    if target.attr == "custom":
        plural = next(a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                      and a.value.endswith("s"))
        found.add(("slmpack.dev" if plural in plurals else DRA_GROUP, plural + status, verb))
    else:
        # delete_namespaced_stateful_set acts on statefulsets
        plural = re.sub(r"y$", "ie", resource.replace("_", "")) + "s"  # network_policy: networkpolicies
        found.add((CLIENT_GROUPS[target.attr], plural + status, verb))
    return found


def _built_kinds() -> dict[str, set[tuple[str, str]]]:
    """(group, kind) of the top-level objects each manifest builder returns."""
    import slmpack.core.manifests as manifests

    kinds, builders = {}, {}
    for module in ("manifests", "dra", "router"):
        tree = _tree(OPERATOR / "core" / f"{module}.py")
        constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                     and isinstance(n.value, ast.Constant) for t in n.targets if isinstance(t, ast.Name)}
        for function in tree.body:
            if not (isinstance(function, ast.FunctionDef) and function.name.startswith("build_")):
                continue
            kinds[function.name] = set()
            # An apiVersion given as a parameter is written in its default's group (policy/v1 or v1beta1 alike): a
            # string default, or a module constant of manifests.
            args = function.args
            given = args.args[len(args.args) - len(args.defaults):]
            defaults = {a.arg: d.value for a, d in zip(given, args.defaults, strict=True)
                        if isinstance(d, ast.Constant)}
            defaults |= {a.arg: getattr(manifests, d.id) for a, d in zip(given, args.defaults, strict=True)
                         if isinstance(d, ast.Name) and isinstance(getattr(manifests, d.id, None), str)}
            for node in ast.walk(function):
                if isinstance(node, ast.Dict):
                    keys = {k.value: v for k, v in zip(node.keys, node.values, strict=True)
                            if isinstance(k, ast.Constant)}
                    if {"apiVersion", "kind", "metadata"} <= keys.keys():
                        version = keys["apiVersion"]
                        if isinstance(version, ast.Constant):
                            group = version.value.rpartition("/")[0]
                        elif hasattr(manifests, version.id):
                            group = getattr(manifests, version.id).rpartition("/")[0]
                        elif version.id in constants or version.id in defaults:
                            group = {**constants, **defaults}[version.id].rpartition("/")[0]
                        else:  # DRA objects are written in the newest version the cluster serves
                            group = DRA_GROUP
                        kinds[function.name].add((group, keys["kind"].value))
        builders |= {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name in kinds}
    # A builder that hands its object to another builder (of any of the modules) builds that one's kinds.
    for name, function in builders.items():
        kinds[name] |= {kind for node in ast.walk(function) if isinstance(node, ast.Call)
                        and isinstance(node.func, ast.Name) and node.func.id in builders
                        and node.func.id != name for kind in kinds[node.func.id]}
    return kinds


def _decision_writes(function: ast.FunctionDef):
    """("create" | "apply", expression) for each `...create.append(x)`, `...create += x` (and apply)."""
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("append",
                                                                                                     "extend") \
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr in ("create", "apply"):
            yield node.func.value.attr, node.args[0]
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Attribute) \
                and node.target.attr in ("create", "apply"):
            yield node.target.attr, node.value


def _resolve_builders(function: ast.FunctionDef, expr: ast.AST, seen=frozenset(), methods=None) -> set[str]:
    """The build_* functions whose results flow into `expr` inside `function`, through the values of `self.m()`
    for the `methods` (name -> FunctionDef) it calls."""
    methods = methods or {}
    names = {n.func.id for n in ast.walk(expr) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id.startswith("build_")}
    for call in (n for n in ast.walk(expr) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and isinstance(n.func.value, ast.Name) and n.func.value.id == "self" and n.func.attr in methods):
        method = methods[call.func.attr]
        for returned in (n.value for n in ast.walk(method) if isinstance(n, ast.Return) and n.value is not None):
            names |= _resolve_builders(method, returned, frozenset(), {})
    for variable in {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)} - seen:
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == variable for t in node.targets):
                names |= _resolve_builders(function, node.value, seen | {variable}, methods)
    return names


def operator_calls() -> set[tuple[str, str, str]]:
    plurals = _crd_plurals()
    kube_methods = _methods(next(c for c in _tree(OPERATOR / "adapters/kube.py").body
                                 if isinstance(c, ast.ClassDef) and c.name == "Kube"))
    controller = [_tree(path) for path in CONTROLLER]
    decision = [_tree(OPERATOR / "core" / name) for name in ("decide.py", "dra.py")]
    built = _built_kinds()
    methods = {f.name: f for tree in decision for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    used = {node.attr for tree in controller for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in kube_methods
            and (isinstance(node.value, ast.Attribute) and node.value.attr == "kube"
                 or isinstance(node.value, ast.Name) and node.value.id == "kube")}
    assert {"apply", "create_if_absent"} <= used, "the controller's writes are not where this test looks"
    calls: set[tuple[str, str, str]] = set()
    for method in used - {"apply", "create_if_absent"}:
        calls |= _kube_method_calls(kube_methods[method], plurals)
    # What the decision creates, and what it applies (apply may create): the builders whose results
    # flow into its `create` and `apply` lists.
    for tree in decision:
        for function in (f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)):
            for target, expr in _decision_writes(function):
                # Applying reads an object whose fields another writer set, to see whose it is (Kube.apply).
                verbs = {"create"} if target == "create" else {"create", "patch", "get"}
                for builder in _resolve_builders(function, expr, methods=methods):
                    for group, kind in built[builder]:
                        plural = re.sub(r"y$", "ie", kind.lower()) + "s"  # NetworkPolicy: networkpolicies
                        calls |= {(group, plural, verb) for verb in verbs}
    if ("rbac.authorization.k8s.io", "rolebindings", "create") in calls:
        # to a ClusterRole the operator does not itself hold
        calls.add(("rbac.authorization.k8s.io", "clusterroles", "bind"))
    # Children point at their owner with blockOwnerDeletion, which needs update on its finalizers.
    for tree in decision:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Owner":
                kind = next(k.value.value for k in node.keywords if k.arg == "kind")
                calls.add(("slmpack.dev", kind.lower() + "s/finalizers", "update"))
    # kopf lists and watches every resource with an index or an event handler.
    for tree in controller:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and len(node.args) >= 3 \
                    and node.func.attr in ("index", "event"):
                group, _, plural = (a.value if isinstance(a, ast.Constant) else "slmpack.dev" for a in node.args[:3])
                calls |= {(group, plural, "list"), (group, plural, "watch")}
    return calls


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_operator_rbac_grants_exactly_the_calls_the_operator_makes(helm):
    docs = render(helm)
    operator_sa = "demo-slmpack-operator"
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in docs if b["kind"] in ("ClusterRoleBinding",
                                                                                         "RoleBinding")
             and any(s["name"] == operator_sa for s in b["subjects"])}
    rules = [r for d in docs if (d["kind"], d["metadata"]["name"]) in bound for r in d["rules"]]
    calls = operator_calls()
    assert ("apps", "statefulsets", "patch") in calls and ("", "pods", "watch") in calls  # the reading works
    assert granted(rules) - calls == set(), "the chart grants verbs the operator never uses"
    assert calls - granted(rules) == set(), "the operator makes calls the chart does not allow"


def test_namespace_scope_grants_the_same_namespaced_rules(helm):
    docs = render(helm, "rbac.scope=namespaces", "rbac.watchNamespaces={team-a}")
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == "team-a")
    cluster = next(d for d in render(helm) if d["kind"] == "ClusterRole" and d["metadata"]["name"] ==
                   "demo-slmpack-operator")
    assert granted(role["rules"]) == granted(cluster["rules"])


# ---------------------------------------------------------------- the release's own Prometheus

def _pod_sd():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pod_sd", ROOT / "deploy/prometheus/pod_sd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENGINE_POD = {
    "metadata": {"name": "chat-0", "namespace": "ai", "uid": "u1",
                 "labels": {"app.kubernetes.io/name": "slmpack-engine", "slmpack.dev/deployment": "chat"},
                 "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8000"},
                 "ownerReferences": [{"kind": "StatefulSet", "name": "chat", "controller": True}]},
    "spec": {"nodeName": "node-1", "containers": [{"name": "engine", "ports": [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"}]}, {"name": "sidecar"}]},
    "status": {"podIP": "10.1.0.7", "hostIP": "10.0.0.1", "phase": "Running",
               "conditions": [{"type": "Ready", "status": "True"}]},
}


def test_pod_discovery_labels_targets_as_kubernetes_sd_does():
    groups = _pod_sd().pod_target_groups(ENGINE_POD)
    assert [g["targets"] for g in groups] == [["10.1.0.7:8000"], ["10.1.0.7"]]
    labels = groups[0]["labels"]
    assert labels["__meta_kubernetes_namespace"] == "ai" and labels["__meta_kubernetes_pod_name"] == "chat-0"
    assert labels["__meta_kubernetes_pod_label_slmpack_dev_deployment"] == "chat"
    assert labels["__meta_kubernetes_pod_labelpresent_app_kubernetes_io_name"] == "true"
    assert labels["__meta_kubernetes_pod_annotation_prometheus_io_port"] == "8000"
    assert labels["__meta_kubernetes_pod_container_port_name"] == "http"
    assert labels["__meta_kubernetes_pod_ready"] == "true" and labels["__meta_kubernetes_pod_controller_kind"] == \
        "StatefulSet"
    assert groups[1]["labels"]["__meta_kubernetes_pod_container_name"] == "sidecar"


def test_pod_discovery_skips_a_pod_without_an_ip():
    starting = {**ENGINE_POD, "status": {"phase": "Pending"}}
    assert _pod_sd().target_groups([starting, ENGINE_POD]) == _pod_sd().pod_target_groups(ENGINE_POD)


def test_release_prometheus_discovers_by_annotations_with_list_only_rbac(helm):
    docs = render(helm, "monitoring.prometheus.enabled=true")
    role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "demo-slmpack-prometheus")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and "prometheus" in d["metadata"]["name"])
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    assert {job["job_name"] for job in config["scrape_configs"]} == {"slmpack", "slmpack-engines", "slmpack-routers"}
    assert all("static_configs" not in job for job in config["scrape_configs"])
    shipped = yaml.safe_load((ROOT / "deploy/prometheus/slmpack-rules.yaml").read_text())
    assert yaml.safe_load(config_map["data"]["slmpack-rules.yaml"]) == shipped
    pod = next(d for d in docs if d["kind"] == "Deployment" and "prometheus" in d["metadata"]["name"])
    assert pod["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
