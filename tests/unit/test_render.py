"""`slmpack render`: the operator's decisions on Node files, through the same pure core."""

from pathlib import Path

import pytest
import yaml

from slmpack.cli import main

ROOT = Path(__file__).resolve().parents[2]
NODES = ROOT / "tests" / "data" / "nodes"
PROFILE = ROOT / "tests" / "data" / "profiles" / "smollm2-360m-h100.yaml"


def render(capsys, *args) -> tuple[int, list[dict], str]:
    code = main(["render", *map(str, args)])
    out, err = capsys.readouterr()
    return code, [d for d in yaml.safe_load_all(out) if d], err


def test_without_a_profile_it_prints_the_profile_its_job_and_the_status(capsys):
    code, docs, _ = render(capsys, "-f", ROOT / "examples" / "slmdeployment-cpu.yaml",
                           "--node", NODES / "h100-none-r1-g1.yaml")
    assert code == 0
    assert [d["kind"] for d in docs] == ["SLMProfile", "ServiceAccount", "RoleBinding", "Job", "SLMDeployment"]
    assert docs[-1]["status"]["phase"] == "Profiling"


def test_with_a_ready_profile_it_prints_the_pack(capsys):
    code, docs, _ = render(capsys, "-f", ROOT / "examples" / "slmdeployment.yaml",
                           "--node", NODES / "h100-mps-r4-g1.yaml", "--profile", PROFILE)
    assert code == 0
    assert [d["kind"] for d in docs] == ["Service", "PodDisruptionBudget", "ServiceAccount", "RoleBinding", "Service",
                                         "ConfigMap", "Deployment", "PodDisruptionBudget", "StatefulSet",
                                         "SLMDeployment"]
    statefulset = next(d for d in docs if d["kind"] == "StatefulSet")
    assert docs[-1]["status"]["plan"]["replicas"] == statefulset["spec"]["replicas"]
    # The router shows with its HAProxy configuration, capped at the plan's --max-num-seqs.
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["haproxy.cfg"]
    assert "balance leastconn" in config and "timeout queue 30s" in config


def test_a_refused_spec_exits_non_zero_with_the_condition_message(tmp_path, capsys):
    spec = yaml.safe_load((ROOT / "examples" / "slmdeployment.yaml").read_text())
    spec["spec"]["replicas"] = 6
    path = tmp_path / "six.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, docs, err = render(capsys, "-f", path, "--node", NODES / "h100-mps-r4-g1.yaml")
    assert code == 1 and docs == []
    assert err.startswith("spec.replicas (6) exceeds the 4 sharing slots")


NODE_WITHOUT_NAME = "apiVersion: v1\nkind: Node\nstatus: {allocatable: {nvidia.com/gpu: '1'}}\n"


@pytest.mark.parametrize(("role", "text", "says"), [
    ("-f", None, "cannot be read: No such file or directory"),
    ("-f", "kind: SLMDeployment\nspec: {replicas: [1\n", "not YAML: expected ',' or ']'"),
    ("-f", "- kind: SLMDeployment\n", "document 1 holds a list, not a Kubernetes object"),
    ("-f", "just words\n", "document 1 holds a string, not a Kubernetes object"),
    ("-f", "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n", "no SLMDeployment in it"),
    ("-f", "apiVersion: slmpack.dev/v1alpha1\nkind: SLMDeployment\nspec: {}\n",
     "the SLMDeployment has no metadata.name"),
    ("--node", NODE_WITHOUT_NAME, "the Node has no metadata.name: give it one"),
    ("--node", "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nstatus: {allocatable: {cpu: lots}}\n",
     "Node n: status.allocatable.cpu is 'lots', not a quantity"),
    ("--node", "apiVersion: v1\nkind: List\nitems: [a, b]\n", "document 1 holds a string"),
    ("--profile", PROFILE.read_text().replace("knee: {batchSize: 128", "knee: {batchSize: eight"),
     "SLMProfile smollm2-360m-h100: status.knee.batchSize: Input should be a valid integer"),
])
def test_bad_input_exits_2_with_one_line_naming_the_file_and_the_fault(tmp_path, capsys, role, text, says):
    path = tmp_path / "input.yaml"
    if text is not None:
        path.write_text(text)
    given = {"-f": ROOT / "examples" / "slmdeployment.yaml", "--node": NODES / "h100-mps-r4-g1.yaml",
             "--profile": PROFILE}
    given[role] = path
    code, docs, err = render(capsys, *[a for r, p in given.items() for a in (r, p)])
    assert code == 2 and docs == []
    assert err.startswith(f"slmpack render: {path}: ") and says in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["render", "--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for code in ("0  rendered", "1  the operator would refuse the spec", "2  bad usage or input",
                 "3  the spec is valid, but the cluster described cannot take it"):
        assert code in out


def test_the_output_is_plain_yaml_that_kubectl_would_read(capsys):
    main(["render", "-f", str(ROOT / "examples" / "slmdeployment.yaml"), "--node", str(NODES / "h100-mps-r4-g1.yaml"),
          "--profile", str(PROFILE)])
    out = capsys.readouterr().out
    assert "&id" not in out and "*id" not in out  # no YAML anchors
    deployment = list(yaml.safe_load_all(out))[-1]
    assert list(deployment["metadata"]) == ["name", "namespace"]
    assert deployment["status"]["replicaGPUs"] == []


@pytest.mark.parametrize("example, node", [
    ("slmdeployment.yaml", "h100-mps-r4-g1.yaml"),
    ("slmdeployment-cpu.yaml", "h100-mps-r4-g1.yaml"),
    ("slmdeployment-time-slicing.yaml", "h100-time-slicing-r4-g1.yaml"),
])
def test_every_example_renders_on_a_node_it_fits(example, node, capsys):
    code, docs, err = render(capsys, "-f", ROOT / "examples" / example, "--node", NODES / node)
    assert code == 0, err
    assert docs[-1]["status"]["conditions"][0] == {**docs[-1]["status"]["conditions"][0], "type": "InvalidSpec",
                                                   "status": "False"}


def test_a_single_gpu_node_selector_keeps_the_pack_off_multi_gpu_nodes(capsys):
    code, _, err = render(capsys, "-f", ROOT / "examples" / "slmdeployment-time-slicing.yaml",
                          "--node", NODES / "h100-time-slicing-r4-g8.yaml")
    assert code == 1 and "nvidia.com/gpu.count=1" in err


def run_as(obj: dict) -> tuple[int, int, int]:
    context = obj["spec"]["template"]["spec"]["securityContext"]
    return context["runAsUser"], context["runAsGroup"], context["fsGroup"]


def test_engines_and_profilers_run_as_the_engine_uid_the_chart_sets(capsys):
    """One UID for every MPS client of a GPU: the replicas, the profiling Job and the pack pod alike."""
    uid = ("--engine-uid", "20000")
    _, measured, _ = render(capsys, "-f", ROOT / "examples" / "slmdeployment.yaml",
                            "--node", NODES / "h100-mps-r4-g1.yaml", "--profile", PROFILE, *uid)
    _, profiling, _ = render(capsys, "-f", ROOT / "examples" / "slmdeployment.yaml",
                             "--node", NODES / "h100-mps-r4-g1.yaml", *uid)
    _, packed, _ = render(capsys, "-f", ROOT / "examples" / "slmdeployment-pack-pod.yaml",
                          "--node", NODES / "h100-plugin-none-r1-g8.yaml",
                          "--profile", ROOT / "tests" / "data" / "profiles" / "smollm2-360m-h100-pack-pod.yaml", *uid)
    engines = [d for d in measured + profiling + packed if d["kind"] in ("StatefulSet", "Job")]
    assert sorted(d["kind"] for d in engines) == ["Job", "StatefulSet", "StatefulSet"]
    assert {run_as(d) for d in engines} == {(20000, 20000, 20000)}
    assert packed[[d["kind"] for d in packed].index("StatefulSet")]["spec"]["template"]["spec"]["containers"][0][
        "command"] == ["slmpack", "supervise"]
    # The routers use no GPU: they keep their image's own user.
    assert {run_as(d) for d in measured if d["kind"] == "Deployment"} == {(10001, 10001, 10001)}


def test_by_default_the_engines_run_as_the_images_user(capsys):
    _, docs, _ = render(capsys, "-f", ROOT / "examples" / "slmdeployment.yaml",
                        "--node", NODES / "h100-mps-r4-g1.yaml", "--profile", PROFILE)
    assert run_as(next(d for d in docs if d["kind"] == "StatefulSet")) == (10001, 10001, 10001)


@pytest.mark.parametrize("uid", ["0", "-5", "ten", "2147483648"])
def test_an_engine_uid_that_is_root_or_no_uid_exits_2(capsys, uid):
    code, docs, err = render(capsys, "-f", ROOT / "examples" / "slmdeployment.yaml",
                             "--node", NODES / "h100-mps-r4-g1.yaml", "--engine-uid", uid)
    assert code == 2 and docs == [] and err.startswith("slmpack render: engine UID"), err
