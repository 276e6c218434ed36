"""The Helm chart: lint, render, least-privilege RBAC, strict values, files in sync."""

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
    # The one thing the operator deletes: a DRA pack's old ResourceClaim, once no pod uses it.
    deletes = [r for rules in roles.values() for r in rules if "delete" in r["verbs"]]
    assert [(r["apiGroups"], r["resources"]) for r in deletes] == [(["resource.k8s.io"], ["resourceclaims"])]
    assert roles["slmpack-profiler"] == [{"apiGroups": ["slmpack.dev"], "resources": ["slmprofiles/status"],
                                         "verbs": ["get", "patch"]}]
    binds = [r for rules in roles.values() for r in rules if "bind" in r["verbs"]]
    assert binds == [{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"],
                      "resourceNames": ["slmpack-profiler"]}]
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


@pytest.mark.parametrize("shipped, copy", [
    ("deploy/prometheus/slmpack-rules.yaml", "charts/slmpack/files/slmpack-rules.yaml"),
    ("deploy/grafana/slmpack-dashboard.json", "charts/slmpack/files/slmpack-dashboard.json"),
])
def test_chart_files_equal_the_shipped_files(shipped, copy):
    assert (ROOT / copy).read_text() == (ROOT / shipped).read_text(), f"run `make chart-files` ({copy} drifted)"
