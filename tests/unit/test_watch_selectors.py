"""The operator's watches are filtered by the apiserver, and every object it follows passes the filter."""

import kopf

from slmpack.api.models import NetworkPolicySpec, Plan, SLMDeploymentSpec
from slmpack.controller.handlers import WATCH_LABEL_SELECTORS, watch_selectively
from slmpack.core.manifests import (
    Owner,
    build_disruption_budget,
    build_network_policy,
    build_profiling_job,
    build_service,
    build_statefulset,
    profile_conditions,
)
from slmpack.core.router import DEFAULT_IMAGES, build_router

OWNER = Owner(kind="SLMDeployment", name="chat", uid="u-1", namespace="team")
PROFILE = Owner(kind="SLMProfile", name="smollm2-abc", uid="u-2", namespace="team")
SPEC = SLMDeploymentSpec.model_validate({"model": {"name": "m"}, "engine": {"device": "cpu"}})
PLAN = Plan(replicas=2, max_num_seqs=8)


def matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality and existence requirements, joined by commas: the forms the operator uses."""
    for requirement in selector.split(","):
        key, _, value = requirement.partition("=")
        if key not in labels or (value and labels[key] != value):
            return False
    return True


def selector_of(settings: kopf.OperatorSettings, group: str, version: str, plural: str) -> str:
    resource = kopf.Resource(group, version, plural, namespaced=True)
    return ",".join(settings.watching.label_selectors.collect(resource))


def test_the_watches_of_pods_and_children_carry_a_label_selector_and_list_in_pages():
    settings = kopf.OperatorSettings()
    watch_selectively(settings)
    assert selector_of(settings, "", "v1", "pods") == "app.kubernetes.io/managed-by=slmpack"
    assert selector_of(settings, "apps", "v1", "statefulsets") == "slmpack.dev/deployment"
    assert selector_of(settings, "", "v1", "services") == "slmpack.dev/deployment"
    assert selector_of(settings, "batch", "v1", "jobs") == "slmpack.dev/profile"
    for version in ("v1", "v1beta1"):  # whichever the apiserver prefers
        assert selector_of(settings, "policy", version, "poddisruptionbudgets") == "slmpack.dev/deployment"
    assert selector_of(settings, "", "v1", "configmaps") == ""  # nothing else is narrowed by accident
    assert settings.watching.chunk_size == 500


def test_every_pod_and_child_the_operator_makes_passes_its_watch_selector():
    statefulset = build_statefulset(OWNER, SPEC, PLAN, None)
    job = build_profiling_job(PROFILE, profile_conditions(SPEC, None), SPEC, None)
    router = build_router(OWNER, SPEC, PLAN, DEFAULT_IMAGES)
    followed = {
        ("", "v1", "pods"): [statefulset["spec"]["template"]["metadata"]["labels"],
                             job["spec"]["template"]["metadata"]["labels"]],
        ("apps", "v1", "statefulsets"): [statefulset["metadata"]["labels"]],
        ("", "v1", "services"): [build_service(OWNER, SPEC)["metadata"]["labels"]],
        ("batch", "v1", "jobs"): [job["metadata"]["labels"]],
        ("networking.k8s.io", "v1", "networkpolicies"): [
            build_network_policy(OWNER, SPEC.model_copy(update={"network_policy": NetworkPolicySpec()}), None)[
                "metadata"]["labels"]],
        ("policy", "poddisruptionbudgets"): [build_disruption_budget(OWNER)["metadata"]["labels"]],
        ("apps", "v1", "deployments"): [router["metadata"]["labels"]],
    }
    followed["", "v1", "pods"].append(router["spec"]["template"]["metadata"]["labels"])
    assert followed.keys() == WATCH_LABEL_SELECTORS.keys()
    for resource, labels in followed.items():
        for each in labels:
            assert matches(WATCH_LABEL_SELECTORS[resource], each), (resource, each)


def test_an_unrelated_pod_does_not_pass():
    assert not matches(WATCH_LABEL_SELECTORS["", "v1", "pods"], {"app": "web"})
    assert not matches(WATCH_LABEL_SELECTORS["", "v1", "pods"], {"app.kubernetes.io/managed-by": "Helm"})
