"""The Helm chart: lint, render, least-privilege RBAC, strict values, files in sync."""

import ast
import json
import re
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


def render(helm, *sets) -> list[dict]:
    args = [str(helm), "template", "demo", str(CHART), "--namespace", "slmpack-system"]
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
                     ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding")}


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


def test_rbac_is_least_privilege(helm):
    roles = {d["metadata"]["name"]: d["rules"] for d in render(helm) if d["kind"] in ("ClusterRole", "Role")}
    for name, rules in roles.items():
        for rule in rules:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], name
            assert not {"deletecollection", "escalate", "impersonate"} & set(rule["verbs"]), name
    # What the operator deletes: a pack's StatefulSet once the pack is no longer wanted, and a DRA pack's old
    # ResourceClaim once no pod uses it.
    deletes = [r for rules in roles.values() for r in rules if "delete" in r["verbs"]]
    assert sorted((r["apiGroups"], r["resources"]) for r in deletes) == [
        (["apps"], ["statefulsets"]), (["resource.k8s.io"], ["resourceclaims"])]
    assert roles["demo-slmpack-profiler"] == [{"apiGroups": ["slmpack.dev"], "resources": ["slmprofiles/status"],
                                               "verbs": ["get", "patch"]}]
    binds = [r for rules in roles.values() for r in rules if "bind" in r["verbs"]]
    assert binds == [{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"],
                      "resourceNames": ["demo-slmpack-profiler"]}]
    secrets = [r for rules in roles.values() for r in rules if "secrets" in r["resources"]]
    assert secrets == []


def test_namespace_scope_makes_roles_in_each_watched_namespace(helm):
    docs = render(helm, "rbac.scope=namespaces", "rbac.watchNamespaces={team-a,team-b}")
    roles = [d for d in docs if d["kind"] == "Role"]
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
    assert gpu["hostPID"] is True and gpu["runtimeClassName"] == "nvidia"


@pytest.mark.parametrize("dev", [False, True], ids=["gpu", "cpu-dev"])
def test_the_exporter_hands_the_node_engine_cache_to_the_engines_uid(helm, dev):
    (exporter,) = [d for d in render(helm, f"devMode.cpu={str(dev).lower()}",
                                     "exporter.engineCacheHostPath=/var/lib/slmpack/engine-cache")
                   if d["kind"] == "DaemonSet"]
    pod = exporter["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][-1] == "chmod 0750 /cache && chown 10001:10001 /cache"
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert {"name": "engine-cache", "hostPath": {"path": "/var/lib/slmpack/engine-cache",
                                                 "type": "DirectoryOrCreate"}} in pod["volumes"]
    assert ("pod-resources" in {v["name"] for v in pod["volumes"]}) is not dev
    plain = next(d for d in render(helm) if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert "initContainers" not in plain


@pytest.mark.parametrize("value, message", [
    ("operator.logLevel=LOUD", "operator.logLevel must be one of"),
    ("operatr.logLevel=INFO", "Additional property operatr is not allowed"),
    ("devMode.fakeDevices=two", "devMode.fakeDevices: Does not match pattern"),
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
CONTROLLER = [OPERATOR / "controller" / name for name in ("handlers.py", "leader.py")]
CLIENT_VERBS = {"list": "list", "read": "get", "get": "get", "create": "create", "patch": "patch", "replace": "update",
                "delete": "delete"}
CLIENT_GROUPS = {"core": "", "batch": "batch", "apps": "apps", "coordination": "coordination.k8s.io"}
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
        target = node.func.value
        if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
                and target.attr in {*CLIENT_GROUPS, "custom"}):
            continue
        match = re.fullmatch(r"(list|read|get|create|patch|replace|delete)_(?:namespaced_|cluster_)?(\w+?)(_status)?",
                             node.func.attr)
        assert match, f"Kube.{method.name} calls {target.attr}.{node.func.attr}, which this test cannot read"
        verb, resource, status = CLIENT_VERBS[match[1]], match[2], "/status" if match[3] else ""
        if target.attr == "custom":
            plural = next(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                          and a.value.endswith("s"))
            found.add(("slmpack.dev" if plural in plurals else DRA_GROUP, plural + status, verb))
        else:
            # delete_namespaced_stateful_set acts on statefulsets
            found.add((CLIENT_GROUPS[target.attr], resource.replace("_", "") + "s" + status, verb))
    return found


def _built_kinds() -> dict[str, set[tuple[str, str]]]:
    """(group, kind) of the top-level objects each manifest builder returns."""
    import slmpack.core.manifests as manifests

    kinds = {}
    for module in ("manifests", "dra"):
        for function in _tree(OPERATOR / "core" / f"{module}.py").body:
            if not (isinstance(function, ast.FunctionDef) and function.name.startswith("build_")):
                continue
            kinds[function.name] = set()
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
                        else:  # DRA objects are written in the newest version the cluster serves
                            group = DRA_GROUP
                        kinds[function.name].add((group, keys["kind"].value))
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


def _resolve_builders(function: ast.FunctionDef, expr: ast.AST, seen=frozenset()) -> set[str]:
    """The build_* functions whose results flow into `expr` inside `function`."""
    names = {n.func.id for n in ast.walk(expr) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id.startswith("build_")}
    for variable in {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)} - seen:
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == variable for t in node.targets):
                names |= _resolve_builders(function, node.value, seen | {variable})
    return names


def operator_calls() -> set[tuple[str, str, str]]:
    plurals = _crd_plurals()
    kube_methods = _methods(next(c for c in _tree(OPERATOR / "adapters/kube.py").body
                                 if isinstance(c, ast.ClassDef) and c.name == "Kube"))
    controller = [_tree(path) for path in CONTROLLER]
    decision = [_tree(OPERATOR / "core" / name) for name in ("decide.py", "dra.py")]
    built = _built_kinds()
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
                verbs = {"create"} if target == "create" else {"create", "patch"}
                for builder in _resolve_builders(function, expr):
                    for group, kind in built[builder]:
                        calls |= {(group, kind.lower() + "s", verb) for verb in verbs}
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
    # Two replicas, so the leader election's Lease rules are rendered too.
    docs = render(helm, "operator.replicas=2")
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
    role = next(d for d in docs if d["kind"] == "Role")
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
    assert {job["job_name"] for job in config["scrape_configs"]} == {"slmpack", "slmpack-engines"}
    assert all("static_configs" not in job for job in config["scrape_configs"])
    shipped = yaml.safe_load((ROOT / "deploy/prometheus/slmpack-rules.yaml").read_text())
    assert yaml.safe_load(config_map["data"]["slmpack-rules.yaml"]) == shipped
    pod = next(d for d in docs if d["kind"] == "Deployment" and "prometheus" in d["metadata"]["name"])
    assert pod["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
