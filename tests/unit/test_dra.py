"""DRA placement: claims the NVIDIA DRA driver accepts, selectors evaluated as the scheduler does.

Selectors run through cel-python against ResourceSlices in the driver's exact format
(tests/data/dra); objects are validated against the official OpenAPI schemas of each
resource.k8s.io version (kubernetes-validate).
"""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from slmpack.api.models import Plan, SLMDeploymentSpec
from slmpack.core.dra import (
    InvalidSelector,
    build_profiling_claim_template,
    build_resource_claim,
    check_selector,
    claims_to_delete,
    devices_from_slices,
    matching_devices,
    newest_served,
    selects,
)
from slmpack.core.manifests import Owner

SLICES = Path(__file__).parent.parent / "data" / "dra"
OWNER = Owner(kind="SLMDeployment", name="chat", uid="u-1", namespace="team")
PROFILE = Owner(kind="SLMProfile", name="smollm2-abc", uid="p-1", namespace="team")
PLAN = Plan(knee_batch_size=64, replicas=3, max_num_seqs=64, gpu_memory_utilization=0.3,
            memory_per_replica_mib=24467, mps_active_thread_percentage=34, mps_pinned_memory_limit_mib=24467)
# Which version each Kubernetes release added: its schemas are the oldest that must accept the object.
RELEASES = {"resource.k8s.io/v1beta1": ["1.32", "1.33"], "resource.k8s.io/v1beta2": ["1.33", "1.34"],
            "resource.k8s.io/v1": ["1.34", "1.37"]}


def spec(**overrides) -> SLMDeploymentSpec:
    return SLMDeploymentSpec.model_validate({"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                                             "placement": "dra", **overrides})


def slices() -> list[dict]:
    return [yaml.safe_load(path.read_text()) for path in sorted(SLICES.glob("*.yaml"))]


DEVICES = devices_from_slices(slices())


def expressions(claim_spec: dict) -> list[str]:
    """Every CEL expression a claim spec carries, whatever its API version's shape."""
    found = []
    for request in claim_spec["devices"]["requests"]:
        body = request.get("exactly", request)
        found += [s["cel"]["expression"] for s in body.get("selectors", [])]
    return found


def chosen(claim: dict) -> list[str]:
    """node/device of every published device the claim's selectors accept (besides the DeviceClass)."""
    return [f"{d.node}/{d.name}" for d in matching_devices(expressions(claim["spec"]), DEVICES)]


# ---------------------------------------------------------------- the fixtures are what the API accepts


@pytest.mark.parametrize("path", sorted(SLICES.glob("*.yaml")), ids=lambda p: p.name)
def test_fixtures_are_valid_resource_slices(path):
    slice_ = yaml.safe_load(path.read_text())
    for release in RELEASES[slice_["apiVersion"]]:
        kubernetes_validate.validate(slice_, release, strict=True)


def test_devices_are_read_as_the_scheduler_shows_them():
    gpu = next(d for d in DEVICES if d.node == "h100-node" and d.name == "gpu-0")
    assert gpu.attributes["gpu.nvidia.com"]["productName"] == "NVIDIA H100 80GB HBM3"
    assert gpu.attributes["resource.kubernetes.io"]["pciBusID"] == "0000:1b:00.0"
    assert gpu.memory_mib == 81559
    l4 = next(d for d in DEVICES if d.node == "l4-node")  # v1beta1: attributes under `basic`
    assert (l4.attribute("productName"), l4.memory_mib) == ("NVIDIA L4", 23034)
    assert selects("device.capacity['gpu.nvidia.com'].memory.compareTo(quantity('80Gi')) < 0", gpu)
    assert selects("device.attributes['gpu.nvidia.com'].driverVersion.isGreaterThan(semver('550.0.0'))", gpu)
    assert not selects("device.attributes['gpu.nvidia.com'].cudaComputeCapability.isLessThan(semver('8.0.0'))", gpu)


# ---------------------------------------------------------------- selectors


def test_the_gpu_named_as_gpu_feature_discovery_labels_it_matches_the_drivers_product_name():
    claim = build_resource_claim(OWNER, spec(gpu={"product": "NVIDIA-H100-80GB-HBM3"}), PLAN, "resource.k8s.io/v1")
    assert chosen(claim) == ["h100-node/gpu-0"]
    dashed = build_resource_claim(OWNER, spec(gpu={"product": "NVIDIA-A100-SXM4-40GB"}), PLAN.model_copy(
        update={"memory_per_replica_mib": 12000}), "resource.k8s.io/v1")
    assert chosen(dashed) == ["a100-node/gpu-0", "a100-node/gpu-1"]


def test_a_different_product_does_not_match():
    claim = build_resource_claim(OWNER, spec(gpu={"product": "NVIDIA-L4"}), PLAN.model_copy(
        update={"memory_per_replica_mib": 6000}), "resource.k8s.io/v1")
    assert chosen(claim) == ["l4-node/gpu-0"]
    absent = build_resource_claim(OWNER, spec(gpu={"product": "NVIDIA-H200"}), PLAN, "resource.k8s.io/v1")
    assert chosen(absent) == []


def test_a_mig_device_is_not_taken_for_a_full_gpu():
    claim = build_resource_claim(OWNER, spec(gpu={"product": "NVIDIA-H100-80GB-HBM3"}), Plan(
        replicas=1, max_num_seqs=8), "resource.k8s.io/v1")
    migs = [d for d in DEVICES if d.attribute("type") == "mig"]
    assert len(migs) == 2 and all(d.attribute("productName") == "NVIDIA H100 80GB HBM3" for d in migs)
    # The claim's own selectors reject them, not only the DeviceClass.
    assert not any(all(selects(e, d) for e in expressions(claim["spec"])) for d in migs)
    assert chosen(claim) == ["h100-node/gpu-0"]


def test_the_plan_needs_a_gpu_with_memory_for_all_its_replicas():
    # Any product: the 40 GiB A100s and the 22 GiB L4 cannot hold 3 x 24467 MiB.
    claim = build_resource_claim(OWNER, spec(), PLAN, "resource.k8s.io/v1")
    assert chosen(claim) == ["h100-node/gpu-0"]


def test_a_product_with_quotes_still_makes_a_selector_that_compiles():
    claim = build_resource_claim(OWNER, spec(gpu={"product": "it's (odd)"}), PLAN, "resource.k8s.io/v1")
    for expression in expressions(claim["spec"]):
        check_selector(expression)
    assert chosen(claim) == []


@pytest.mark.parametrize(("expression", "says"), [
    ("device.attributes['gpu.nvidia.com'].productName == ", "does not compile"),
    ("device.attributes['gpu.nvidia.com'].productName == 'NVIDIA H100 80GB HBM3", "does not compile"),
    ("device.capacity['gpu.nvidia.com'].memory > 40", "fails on a GPU"),
    ("device.attributes['gpu.nvidia.com'].productName.toLower() == 'h100'", "fails on a GPU"),
    ("device.attributes['gpu.nvidia.com'].productName", "not a bool"),
])
def test_a_selector_that_does_not_compile_is_caught_before_it_reaches_a_cluster(expression, says):
    with pytest.raises(InvalidSelector, match=says):
        check_selector(expression)


# ---------------------------------------------------------------- API versions and wire format


@pytest.mark.parametrize(("served", "chosen_version"), [
    (["resource.k8s.io/v1", "resource.k8s.io/v1beta2", "resource.k8s.io/v1beta1"], "resource.k8s.io/v1"),
    (["resource.k8s.io/v1beta1", "resource.k8s.io/v1beta2"], "resource.k8s.io/v1beta2"),
    (["resource.k8s.io/v1beta1", "resource.k8s.io/v1alpha3"], "resource.k8s.io/v1beta1"),
    (["resource.k8s.io/v1alpha3", "apps/v1"], None),
    ([], None),
])
def test_the_newest_served_version_is_written(served, chosen_version):
    assert newest_served(served) == chosen_version


@pytest.mark.parametrize("api_version", list(RELEASES))
@pytest.mark.parametrize("sharing", ["mps", "time-slicing"])
def test_claims_and_templates_match_the_official_schema_of_each_version(api_version, sharing):
    deployment = spec(gpu={"product": "NVIDIA-H100-80GB-HBM3"}, sharing=sharing)
    claim = build_resource_claim(OWNER, deployment, PLAN, api_version)
    template = build_profiling_claim_template(PROFILE, deployment, api_version, {"app": "profiler"})
    for release in RELEASES[api_version]:
        kubernetes_validate.validate(claim, release, strict=True)
        kubernetes_validate.validate(template, release, strict=True)
    assert claim["apiVersion"] == template["apiVersion"] == api_version
    assert chosen(claim) == ["h100-node/gpu-0"]


def test_the_schema_check_rejects_a_request_in_another_versions_shape():
    claim = build_resource_claim(OWNER, spec(), PLAN, "resource.k8s.io/v1beta1")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**claim, "apiVersion": "resource.k8s.io/v1"}, "1.34", strict=True)


# ---------------------------------------------------------------- sharing config


def gpu_config(obj: dict) -> dict:
    spec_ = obj["spec"]["spec"] if obj["kind"] == "ResourceClaimTemplate" else obj["spec"]
    (config,) = spec_["devices"]["config"]
    assert config["requests"] == ["gpu"] and config["opaque"]["driver"] == "gpu.nvidia.com"
    return config["opaque"]["parameters"]


def test_mps_limits_come_from_the_plan():
    claim = build_resource_claim(OWNER, spec(), PLAN, "resource.k8s.io/v1")
    assert gpu_config(claim) == {"apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig", "sharing": {
        "strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 34,
                                         "defaultPinnedDeviceMemoryLimit": "24467Mi"}}}


def test_time_slicing_uses_the_drivers_default_interval():
    claim = build_resource_claim(OWNER, spec(sharing="time-slicing"), PLAN, "resource.k8s.io/v1")
    assert gpu_config(claim)["sharing"] == {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Default"}}


def test_the_profiling_template_shares_the_gpu_by_the_packs_strategy_on_a_whole_gpu():
    template = build_profiling_claim_template(PROFILE, spec(gpu={"product": "NVIDIA-H100-80GB-HBM3"}),
                                              "resource.k8s.io/v1", {"app": "profiler"})
    assert gpu_config(template)["sharing"] == {"strategy": "MPS", "mpsConfig": {}}
    assert template["metadata"]["ownerReferences"][0]["uid"] == "p-1"
    assert matching_devices(expressions(template["spec"]["spec"]), DEVICES)[0].name == "gpu-0"
    (request,) = template["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"]["count"] == 1


# ---------------------------------------------------------------- claim names and old claims


def test_a_claim_is_named_by_its_config_not_by_the_api_version():
    names = {build_resource_claim(OWNER, spec(), PLAN, v)["metadata"]["name"] for v in RELEASES}
    assert len(names) == 1 and next(iter(names)).startswith("chat-gpu-")
    two = PLAN.model_copy(update={"replicas": 2, "mps_active_thread_percentage": 50})
    other = build_resource_claim(OWNER, spec(), two, "resource.k8s.io/v1")["metadata"]["name"]
    assert other.startswith("chat-gpu-") and other not in names
    long = Owner(kind="SLMDeployment", name="a" * 63, uid="u", namespace="team")
    assert len(build_resource_claim(long, spec(), PLAN, "resource.k8s.io/v1")["metadata"]["name"]) <= 63


def claim(name: str, reserved: bool = False) -> dict:
    return {"metadata": {"name": name}, "status": {"reservedFor": [{"resource": "pods", "name": "p"}]} if reserved
            else {}}


def pod(name: str, claim_name: str, phase: str = "Running") -> dict:
    return {"metadata": {"name": name}, "spec": {"resourceClaims": [{"name": "gpu", "resourceClaimName": claim_name}]},
            "status": {"phase": phase}}


def test_an_old_claim_goes_only_when_no_pod_uses_it():
    claims = [claim("chat-gpu-new"), claim("chat-gpu-old")]
    assert claims_to_delete(claims, [pod("chat-0", "chat-gpu-new"), pod("chat-1", "chat-gpu-old")],
                            "chat-gpu-new") == []
    assert claims_to_delete([claim("chat-gpu-new"), claim("chat-gpu-old", reserved=True)],
                            [pod("chat-0", "chat-gpu-new")], "chat-gpu-new") == []
    assert claims_to_delete(claims, [pod("chat-0", "chat-gpu-new"), pod("chat-1", "chat-gpu-old", "Failed")],
                            "chat-gpu-new") == ["chat-gpu-old"]
    assert claims_to_delete(claims, [], "chat-gpu-new") == ["chat-gpu-old"]
