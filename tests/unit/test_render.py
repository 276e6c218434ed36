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
    assert [d["kind"] for d in docs] == ["Service", "StatefulSet", "SLMDeployment"]
    assert docs[-1]["status"]["plan"]["replicas"] == docs[1]["spec"]["replicas"]


def test_a_refused_spec_exits_non_zero_with_the_condition_message(tmp_path, capsys):
    spec = yaml.safe_load((ROOT / "examples" / "slmdeployment.yaml").read_text())
    spec["spec"]["replicas"] = 6
    path = tmp_path / "six.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, docs, err = render(capsys, "-f", path, "--node", NODES / "h100-mps-r4-g1.yaml")
    assert code == 1 and docs == []
    assert err.startswith("spec.replicas (6) exceeds the 4 sharing slots")


@pytest.mark.parametrize("missing", ["no-such.yaml"])
def test_a_missing_file_is_an_error(tmp_path, missing):
    with pytest.raises(FileNotFoundError):
        main(["render", "-f", str(tmp_path / missing)])


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
