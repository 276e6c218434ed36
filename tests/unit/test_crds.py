"""The CRDs are generated from the pydantic models; the checked-in copies must not drift."""

from pathlib import Path

import pytest
import yaml

from slmpack.api.crds import all_crds, filename, render

ROOT = Path(__file__).resolve().parents[2]
GENERATED = {filename(c): render([c]) for c in all_crds()}


@pytest.mark.parametrize("folder", ["crds", "charts/slmpack/crds"])
def test_checked_in_crds_equal_the_generator_output(folder):
    directory = ROOT / folder
    if folder.startswith("charts") and not directory.exists():
        pytest.skip("the chart has no crds/ folder yet")
    on_disk = {p.name: p.read_text() for p in directory.glob("*.yaml")}
    assert on_disk == GENERATED, f"{folder} drifted from the models: run `make crds`"


def walk(node, path="$"):
    yield path, node
    for key in ("properties",):
        for name, sub in node.get(key, {}).items():
            yield from walk(sub, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")


@pytest.mark.parametrize("crd", all_crds(), ids=lambda c: c["spec"]["names"]["kind"])
def test_every_field_is_described_and_structural(crd):
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema["properties"]["spec"], "spec"):
        if path.endswith("[]") and node.get("type") != "object":
            continue  # a list of scalars is described by its field
        assert node.get("description"), f"{path} has no description for `kubectl explain`"
    for path, node in walk(schema):
        assert "$ref" not in node and "title" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"


def test_deployment_crd_names_columns_and_the_status_and_scale_subresources():
    deployment = yaml.safe_load(GENERATED["slmdeployments.slmpack.dev.yaml"])
    names = deployment["spec"]["names"]
    version = deployment["spec"]["versions"][0]
    assert names["shortNames"] == ["slmd"]
    # `kubectl scale slmd/NAME --replicas=P`, HPA and KEDA set the packs and find the pods by status.selector.
    assert version["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.packs", "statusReplicasPath": ".status.currentPacks",
        "labelSelectorPath": ".status.selector"}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Model", "GPU", "Ready", "Planned", "Packs", "Knee", "Tok/s", "Phase", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["sharing"]["enum"] == ["mps", "time-slicing"]
    assert spec["properties"]["placement"]["enum"] == ["device-plugin", "dra", "pack-pod"]
    assert spec["properties"]["replicas"]["x-kubernetes-int-or-string"] is True
    assert spec["properties"]["profiling"]["properties"]["efficiencyThresholdPercent"]["default"] == 20
