"""Every child of every legal SLMDeployment name is a valid Kubernetes object."""

import re

import pytest

from slmpack.api.models import Plan, SLMDeploymentSpec
from slmpack.core.dra import build_resource_claim
from slmpack.core.manifests import (
    Owner,
    build_profiling_job,
    build_service,
    build_statefulset,
    dns_name,
    profile_conditions,
    profile_name,
    profiling_job_name,
    service_endpoint,
    workload_name,
)

# Kubernetes' own rules (apimachinery/pkg/util/validation/validation.go).
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
# controller-revision-hash is `<StatefulSet name>-<hash>`, the hash up to 10 characters
# (pkg/controller/history/controller_history.go: SafeEncodeString of a uint32).
REVISION_HASH = "x" * 10

# Legal SLMDeployment names (DNS-1123 subdomains, up to 253 characters) at the edges.
NAMES = [
    "a",
    "chat",
    "7b-chat",
    "a" * 52,
    "a" * 53,
    "a" * 63,
    "a" * 64,
    "my.model.v2",
    ("segment-" * 40)[:253].rstrip("-"),
    ".".join(["a" * 63] * 3) + "." + "b" * 61,
    "9" * 253,
]
NAMESPACES = ["t", "n" * 63]
PLAN = Plan(knee_batch_size=8, replicas=256, max_num_seqs=8)


def spec(**overrides) -> SLMDeploymentSpec:
    return SLMDeploymentSpec.model_validate({"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"}, **overrides})


def label(value: str) -> bool:
    return len(value) <= 63 and bool(LABEL_VALUE.fullmatch(value))


def labels_valid(obj: dict) -> None:
    for key, value in obj["metadata"].get("labels", {}).items():
        assert label(value), (key, value)


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("name", NAMES, ids=lambda n: f"{n[:12]}..{len(n)}")
def test_every_child_of_a_legal_name_is_valid(name, namespace):
    assert DNS_1123_SUBDOMAIN.fullmatch(name) and len(name) <= 253
    owner = Owner(kind="SLMDeployment", name=name, uid="u", namespace=namespace)
    sts = build_statefulset(owner, spec(), PLAN, node=None)
    service = build_service(owner, spec())
    claim = build_resource_claim(owner, spec(placement="dra"), PLAN, "resource.k8s.io/v1")

    sts_name = sts["metadata"]["name"]
    assert DNS_1035_LABEL.fullmatch(sts_name) and len(sts_name) <= 52
    assert label(f"{sts_name}-{REVISION_HASH}"), "controller-revision-hash must be a label value"
    last_pod = f"{sts_name}-{PLAN.replicas - 1}"
    assert DNS_1123_LABEL.fullmatch(last_pod) and label(last_pod), "a pod's hostname and pod-name label"
    assert sts["spec"]["serviceName"] == service["metadata"]["name"] == sts_name
    assert DNS_1035_LABEL.fullmatch(service["metadata"]["name"]), "a Service name starts with a letter"
    assert DNS_1123_SUBDOMAIN.fullmatch(claim["metadata"]["name"])
    for obj in (sts, service, claim, sts["spec"]["template"]):
        labels_valid(obj)
    for value in sts["spec"]["selector"]["matchLabels"].values():
        assert label(value)
    assert service_endpoint(owner, spec()) == f"http://{sts_name}.{namespace}.svc:8000/v1"


@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "/models/" + "Very.Long_Model-" * 20, "/"])
def test_profile_and_job_names_are_labels_for_any_model(model):
    profiled = spec(model={"name": model})
    conditions = profile_conditions(profiled, 81559)
    name = profile_name(conditions)
    assert DNS_1123_LABEL.fullmatch(name) and len(name) <= 63
    job = build_profiling_job(Owner(kind="SLMProfile", name=name, uid="p", namespace="n" * 63), conditions,
                              profiled, None)
    assert DNS_1123_LABEL.fullmatch(job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 63
    assert label(job["metadata"]["name"]), "the Job's pods carry job-name: <name>"
    labels_valid(job)
    labels_valid(job["spec"]["template"])


def test_names_that_fit_are_kept_as_they_are():
    assert workload_name("chat") == "chat"
    assert workload_name("a" * 52) == "a" * 52
    assert profiling_job_name("smollm2-135m-instruct-0123456789ab") == "profile-smollm2-135m-instruct-0123456789ab"


def test_names_that_are_cut_stay_distinct_and_stable():
    near = ["a" * 60 + "x", "a" * 60 + "y", "my.model", "my-model", "7b", "x-7b"]
    children = [workload_name(n) for n in near]
    assert len(set(children)) == len(near), children
    assert children == [workload_name(n) for n in near], "the same name always gives the same child"
    assert workload_name("my-model") == "my-model" and workload_name("my.model").startswith("my-model-")
    assert dns_name("profile", "b" * 63) != dns_name("profile", "b" * 62 + "c")
