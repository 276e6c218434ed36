"""DRA placement: claims the NVIDIA DRA driver accepts, selectors evaluated as the scheduler does.

Selectors run through cel-python against ResourceSlices in the driver's exact format
(tests/data/dra); objects are validated against the official OpenAPI schemas of each
resource.k8s.io version (kubernetes-validate).
"""

import dataclasses
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from slmpack.api.models import Plan, SLMDeploymentSpec
from slmpack.cli import main
from slmpack.controller.render import profile_as_stored
from slmpack.core.conditions import ReplicaState
from slmpack.core.decide import ClusterSnapshot, decide, with_status
from slmpack.core.dra import (
    InvalidSelector,
    Quantity,
    build_profiling_claim_template,
    build_resource_claim,
    check_selector,
    device_selectors,
    devices_from_slices,
    matching_devices,
    newest_served,
    product_selector,
    selects,
)
from slmpack.core.manifests import Owner, build_statefulset

ROOT = Path(__file__).resolve().parents[2]
SLICES = ROOT / "tests" / "data" / "dra"
PROFILE_FILE = ROOT / "tests" / "data" / "profiles" / "smollm2-360m-h100-dra.yaml"
EXAMPLE = ROOT / "examples" / "slmdeployment-dra.yaml"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
ALL_VERSIONS = ("resource.k8s.io/v1", "resource.k8s.io/v1beta2", "resource.k8s.io/v1beta1")
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


@pytest.mark.parametrize(("text", "bytes_"), [("81559Mi", 81559 * 2**20), ("40Gi", 40 * 2**30), ("1.5k", 1500),
                                             ("12e3", 12000), (".5", 0.5), ("100m", 0.1)])
def test_quantities_compare_by_amount_as_the_cel_quantity_library_does(text, bytes_):
    assert Quantity(text).amount == Decimal(str(bytes_))


@pytest.mark.parametrize("text", ["1.2.3", "12 Mi", "Mi", "1Zi"])
def test_a_malformed_quantity_is_refused_by_name(text):
    with pytest.raises(ValueError, match="is not a Kubernetes quantity"):
        Quantity(text)


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


def test_a_selector_on_one_gpus_identity_picks_it_among_identical_ones():
    one = "device.attributes['gpu.nvidia.com'].uuid == 'GPU-6b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e'"
    assert [f"{d.node}/{d.name}" for d in matching_devices([one], DEVICES)] == ["a100-node/gpu-1"]
    bus = "device.attributes['resource.kubernetes.io'].pciBusID == '0000:07:00.0'"
    # The L4's slice publishes no pciBusID: unguarded, the scheduler's allocation aborts there.
    with pytest.raises(InvalidSelector, match="l4-node/gpu-0 .* would abort the claim's allocation"):
        matching_devices([bus], DEVICES)
    guarded = f"'resource.kubernetes.io' in device.attributes && 'pciBusID' in " \
              f"device.attributes['resource.kubernetes.io'] && {bus}"
    assert [f"{d.node}/{d.name}" for d in matching_devices([guarded], DEVICES)] == ["a100-node/gpu-0"]


def test_the_plan_needs_a_gpu_with_memory_for_all_its_replicas():
    # Any product: the 40 GiB A100s and the 22 GiB L4 cannot hold 3 x 24467 MiB.
    claim = build_resource_claim(OWNER, spec(), PLAN, "resource.k8s.io/v1")
    assert chosen(claim) == ["h100-node/gpu-0"]


def test_a_product_with_quotes_still_makes_a_selector_that_compiles():
    # The schema admits label spellings only; the selector stays safe for anything else all the same.
    expression = product_selector("it's (odd)")
    check_selector(expression)
    assert matching_devices([expression], DEVICES) == []


def test_a_gpu_without_a_memory_capacity_is_skipped_not_an_aborted_allocation():
    # The driver leaves `memory` out where NVML says NOT_SUPPORTED; reading it unguarded is a CEL runtime error,
    # which aborts the claim's whole allocation in the scheduler instead of skipping the device.
    gpu = next(d for d in DEVICES if d.node == "h100-node" and d.name == "gpu-0")
    bare = dataclasses.replace(gpu, name="gpu-9", capacity={})
    with pytest.raises(InvalidSelector, match="gpu-9 .* the scheduler would abort the claim's allocation"):
        selects("device.capacity['gpu.nvidia.com'].memory.compareTo(quantity('40Gi')) >= 0", bare)
    expressions = device_selectors(spec(gpu={"product": "NVIDIA-H100-80GB-HBM3"}), min_memory_mib=40000)
    assert matching_devices(expressions, [gpu, bare]) == [gpu]
    assert not selects(product_selector("NVIDIA-H100-80GB-HBM3"), dataclasses.replace(
        gpu, attributes={"gpu.nvidia.com": {"type": "gpu"}}))


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


def test_pack_pods_name_the_claim_and_ask_for_no_device_plugin_resource_or_gfd_label():
    deployment = spec(gpu={"product": "NVIDIA-H100-80GB-HBM3"})
    claim = build_resource_claim(OWNER, deployment, PLAN, "resource.k8s.io/v1")
    pod = build_statefulset(OWNER, deployment, PLAN, None, claim["metadata"]["name"])["spec"]["template"]["spec"]
    assert pod["resourceClaims"] == [{"name": "gpu", "resourceClaimName": claim["metadata"]["name"]}]
    (engine,) = pod["containers"]
    assert engine["resources"]["claims"] == [{"name": "gpu"}]
    assert "nvidia.com/gpu" not in engine["resources"]["limits"]
    assert "affinity" not in pod and "kubernetes.io/hostname" not in pod["nodeSelector"]


# ---------------------------------------------------------------- the operator's decision on DRA clusters


def stored_deployment(**overrides) -> dict:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"].update(namespace="team", uid="d-1", generation=1)
    body["spec"].update(overrides)
    return body


def stored_profile() -> dict:
    """The measured profile as the API holds it, with the key label deployments find it by."""
    profile = profile_as_stored(yaml.safe_load(PROFILE_FILE.read_text()), "team")
    profile["metadata"]["uid"] = "p-1"
    return profile


def cluster(versions=ALL_VERSIONS, slice_files=("h100-node.yaml",), **more) -> ClusterSnapshot:
    slices_ = tuple(yaml.safe_load((SLICES / f).read_text()) for f in slice_files)
    return ClusterSnapshot(resource_api_versions=tuple(versions), resource_slices=slices_, **more)


def condition(decision, type_):
    return next(c for c in decision.status.conditions if c.type == type_)


@pytest.mark.parametrize(("versions", "slice_files", "reason", "says"), [
    ((), ("h100-node.yaml",), "DRANotServed", "serves no resource.k8s.io version"),
    (("resource.k8s.io/v1alpha3",), (), "DRANotServed", "Kubernetes 1.32 or later"),
    (ALL_VERSIONS, (), "NoDRADriver", "no ResourceSlice of driver gpu.nvidia.com"),
])
def test_a_cluster_without_dra_or_without_the_driver_is_named_in_the_placed_condition(versions, slice_files,
                                                                                      reason, says):
    decision = decide(stored_deployment(), cluster(versions, slice_files), NOW)
    placed = condition(decision, "Placed")
    assert (placed.status, placed.reason) == ("False", reason) and says in placed.message
    assert condition(decision, "InvalidSpec").status == "False"
    assert decision.status.phase.value == "Pending" and decision.create == decision.apply == []
    assert decision.retry_after_seconds == 30 and decision.events[-1].warning


def test_a_product_no_driver_publishes_is_refused_with_what_is_published():
    decision = decide(stored_deployment(gpu={"product": "NVIDIA-H200"}),
                      cluster(slice_files=("h100-node.yaml", "a100-node.yaml")), NOW)
    refused = condition(decision, "InvalidSpec")
    assert refused.status == "True" and refused.message.startswith("spec.gpu.product")
    assert "NVIDIA A100-SXM4-40GB, NVIDIA H100 80GB HBM3" in refused.message


def test_profiling_on_dra_gets_a_gpu_through_its_own_claim_template():
    first = decide(stored_deployment(), cluster(versions=["resource.k8s.io/v1beta2"]), NOW)
    (profile,) = first.create
    assert profile["spec"]["conditions"]["gpuMemoryMib"] == 81559  # from the ResourceSlice's capacity
    profile["metadata"]["uid"] = "p-1"
    second = decide(with_status(stored_deployment(), first.status),
                    cluster(versions=["resource.k8s.io/v1beta2"], profiles=(profile,)), NOW)
    template, job = second.create[-2:]
    assert template["kind"] == "ResourceClaimTemplate" and template["apiVersion"] == "resource.k8s.io/v1beta2"
    kubernetes_validate.validate(template, "1.33", strict=True)
    pod = job["spec"]["template"]["spec"]
    assert pod["resourceClaims"] == [{"name": "gpu", "resourceClaimTemplateName": template["metadata"]["name"]}]
    (container,) = pod["containers"]
    assert container["resources"]["claims"] == [{"name": "gpu"}]
    assert not any(k.startswith("nvidia.com/") for k in container["resources"]["limits"])
    assert gpu_config(template)["sharing"]["strategy"] == "MPS"
    assert template["metadata"]["ownerReferences"][0]["uid"] == "p-1"
    # The claim's daemon sets no limits while profiling: the profiler gives each replica the plan's caps.
    args = container["args"]
    assert (args[args.index("--sharing") + 1], args[args.index("--placement") + 1]) == ("mps", "dra")


def test_replicas_on_dra_come_from_the_measurement_and_the_memory_model():
    decision = decide(stored_deployment(), cluster(profiles=(stored_profile(),)), NOW)
    # The measurement's best within the SLO is 4; no device-plugin slot label caps it.
    assert decision.status.plan.replicas == 4
    (claim_,) = decision.create
    assert gpu_config(claim_)["sharing"]["mpsConfig"] == {"defaultActiveThreadPercentage": 25,
                                                          "defaultPinnedDeviceMemoryLimit": "18350Mi"}
    assert "ResourceClaim " + claim_["metadata"]["name"] in condition(decision, "Placed").message


# ---------------------------------------------------------------- plan changes over recorded API states


def as_stored(claim_: dict, reserved_for: list[str]) -> dict:
    """A claim as the API returns it once the scheduler allocated it and reserved it for pods."""
    return {**claim_, "metadata": {**claim_["metadata"], "uid": "c-" + claim_["metadata"]["name"][-8:],
                                   "resourceVersion": "7"},
            "status": {"allocation": {"devices": {"results": [
                {"request": "gpu", "driver": "gpu.nvidia.com", "pool": "h100-node", "device": "gpu-0"}]}},
                "reservedFor": [{"resource": "pods", "name": p, "uid": "u-" + p} for p in reserved_for]}}


def pods(*claims: str) -> tuple[ReplicaState, ...]:
    return tuple(ReplicaState(name=f"smollm2-dra-{i}", ready=True, claims=(c,)) for i, c in enumerate(claims))


def test_a_new_plan_gets_a_new_claim_the_pods_roll_over_and_the_old_claim_goes_when_unused():
    profile = (stored_profile(),)
    body = stored_deployment()
    # 1. The first plan: 4 replicas on claim A.
    first = decide(body, cluster(profiles=profile), NOW)
    (a,) = first.create
    sts = next(o for o in first.apply if o["kind"] == "StatefulSet")
    assert sts["spec"]["template"]["spec"]["resourceClaims"][0]["resourceClaimName"] == a["metadata"]["name"]
    body = with_status(body, first.status)
    running = pods(*[a["metadata"]["name"]] * 4)
    stored_a = as_stored(a, [p.name for p in running])
    steady = decide(body, cluster(profiles=profile, pods=running, resource_claims=(stored_a,)), NOW)
    assert steady.create == [a] and steady.delete == [] and steady.retry_after_seconds is None

    # 2. The spec fixes 2 replicas: a new plan, so a new claim B; A stays while its pods run.
    body = {**body, "metadata": {**body["metadata"], "generation": 2}, "spec": {**body["spec"], "replicas": 2}}
    second = decide(body, cluster(profiles=profile, pods=running, resource_claims=(stored_a,)), NOW)
    (b,) = second.create
    assert b["metadata"]["name"] != a["metadata"]["name"]
    assert gpu_config(b)["sharing"]["mpsConfig"]["defaultActiveThreadPercentage"] == 50
    sts = next(o for o in second.apply if o["kind"] == "StatefulSet")
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["template"]["spec"]["resourceClaims"][0]["resourceClaimName"] == b["metadata"]["name"]
    assert second.delete == []
    body = with_status(body, second.status)

    # 3. Mid-rollout: the StatefulSet replaced pod 1; pod 0 still holds A.
    rolling = pods(a["metadata"]["name"], b["metadata"]["name"])
    stored_b = as_stored(b, ["smollm2-dra-1"])
    claims_ = (as_stored(a, ["smollm2-dra-0"]), stored_b)
    mid = decide(body, cluster(profiles=profile, pods=rolling, resource_claims=claims_), NOW)
    assert mid.delete == [] and mid.retry_after_seconds == 30  # looks again while A is held

    # 4. Pod 0 is gone but the scheduler has not yet released A: still kept.
    moved = pods(b["metadata"]["name"], b["metadata"]["name"])
    claims_ = (as_stored(a, ["smollm2-dra-0"]), as_stored(b, [p.name for p in moved]))
    releasing = decide(body, cluster(profiles=profile, pods=moved, resource_claims=claims_), NOW)
    assert releasing.delete == [] and releasing.retry_after_seconds == 30

    # 5. No pod names A and nothing reserves it: A is deleted as read, B never.
    released = as_stored(a, [])
    last = decide(body, cluster(profiles=profile, pods=moved,
                                resource_claims=(released, as_stored(b, [p.name for p in moved]))), NOW)
    assert last.delete == [released] and last.retry_after_seconds is None
    assert ("ResourceClaimReleased", False) in [(e.reason, e.warning) for e in last.events]
    assert condition(last, "Available").status == "True"


# ---------------------------------------------------------------- slmpack render


def render(capsys, *args) -> tuple[int, list[dict], str]:
    code = main(["render", *map(str, args)])
    out, err = capsys.readouterr()
    return code, [d for d in yaml.safe_load_all(out) if d], err


def slice_args(*names: str) -> list:
    return [a for n in names for a in ("--resource-slice", SLICES / n)]


@pytest.mark.parametrize(("api_versions", "release"), [
    ("resource.k8s.io/v1beta1", "1.32"),
    ("resource.k8s.io/v1beta1,resource.k8s.io/v1beta2", "1.33"),
    ("resource.k8s.io/v1,resource.k8s.io/v1beta2,resource.k8s.io/v1beta1", "1.34"),
])
def test_render_writes_the_example_for_the_versions_the_cluster_serves(capsys, api_versions, release):
    code, docs, _ = render(capsys, "-f", EXAMPLE, *slice_args("h100-node.yaml", "a100-node.yaml"),
                           "--api-versions", api_versions, "--profile", PROFILE_FILE)
    assert code == 0
    assert [d["kind"] for d in docs] == ["ResourceClaim", "Service", "PodDisruptionBudget", "ServiceAccount",
                                         "RoleBinding", "Service", "ConfigMap", "Deployment", "PodDisruptionBudget",
                                         "StatefulSet", "SLMDeployment"]
    assert docs[0]["apiVersion"] == newest_served(api_versions.split(","))
    for obj in docs[:-1]:
        kubernetes_validate.validate(obj, release, strict=True)
    assert chosen(docs[0]) == ["h100-node/gpu-0"]
    assert docs[-1]["status"]["plan"]["replicas"] == docs[-2]["spec"]["replicas"] == 4


def test_render_without_a_profile_prints_the_profiling_claim_template_and_job(capsys):
    code, docs, _ = render(capsys, "-f", EXAMPLE, *slice_args("h100-node.yaml"))
    assert code == 0
    assert [d["kind"] for d in docs] == ["SLMProfile", "ServiceAccount", "RoleBinding", "ResourceClaimTemplate",
                                         "Job", "SLMDeployment"]
    for obj in docs[1:-1]:
        kubernetes_validate.validate(obj, "1.34", strict=True)  # the slice file's version, v1


def test_render_reads_slices_as_kubectl_lists_them(capsys, tmp_path):
    listed = tmp_path / "slices.yaml"
    listed.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": slices()}))
    code, docs, _ = render(capsys, "-f", EXAMPLE, "--resource-slice", listed, "--profile", PROFILE_FILE)
    assert code == 0
    # The files hold v1 and v1beta1 slices: the newest of those versions is written.
    assert docs[0]["kind"] == "ResourceClaim" and docs[0]["apiVersion"] == "resource.k8s.io/v1"
    assert chosen(docs[0]) == ["h100-node/gpu-0"]


def test_render_says_when_the_cluster_serves_no_dra_version(capsys):
    code, docs, err = render(capsys, "-f", EXAMPLE, *slice_args("h100-node.yaml"), "--api-versions", "")
    assert code == 3 and docs == []  # the spec is valid; the cluster described cannot take it
    assert "serves no resource.k8s.io version" in err
