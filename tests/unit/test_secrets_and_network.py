"""Secrets stay in Secrets, the engines enforce the API key, and the engines' NetworkPolicy admits whom it says.

The test bed's network plugin does not enforce NetworkPolicy, so the policy is checked here against the
official OpenAPI schemas (kubernetes-validate) and its selectors against the pods they must and must not
select: the engines, the profiler, the operator as the chart runs it.
"""

import json

import kubernetes_validate
import pytest

from slmpack.api.models import Plan, SLMDeploymentSpec
from slmpack.controller.handlers import operator_peer
from slmpack.core.decide import ClusterSnapshot, decide
from slmpack.core.manifests import (
    Owner,
    build_disruption_budget,
    build_network_policy,
    build_profiling_job,
    build_statefulset,
    profile_conditions,
)
from tests.unit.test_chart import helm, render  # noqa: F401  (the helm fixture)
from tests.unit.test_decide import NOW, condition, deployment, node

OWNER = Owner(kind="SLMDeployment", name="chat", uid="d-1", namespace="team")
PROFILE = Owner(kind="SLMProfile", name="smollm2-abc", uid="p-1", namespace="team")
PLAN = Plan(replicas=2, max_num_seqs=8)
RELEASES = ["1.25", "1.37"]
SECRET_TOKEN = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
API_KEY = {"name": "chat-api", "key": "key"}
OPERATOR_PEER = operator_peer("slmpack-system", "app.kubernetes.io/name=slmpack,app.kubernetes.io/instance=demo,"
                                                "app.kubernetes.io/component=operator")


def cpu_spec(**overrides) -> SLMDeploymentSpec:
    return SLMDeploymentSpec.model_validate({"model": {"name": "m"}, "engine": {"device": "cpu"}, **overrides})


def env_of(pod_owner) -> list[dict]:
    return pod_owner["spec"]["template"]["spec"]["containers"][0]["env"]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


# ---------------------------------------------------------------- secrets


def test_env_takes_a_secret_reference_that_reaches_the_engines_and_the_profiler_as_a_reference():
    spec = cpu_spec(engine={"device": "cpu", "env": [SECRET_TOKEN, {"name": "LOG", "value": "debug"}]})
    for pod_owner in (build_statefulset(OWNER, spec, PLAN, None),
                      build_profiling_job(PROFILE, profile_conditions(spec, None), spec, None)):
        env = env_of(pod_owner)
        assert SECRET_TOKEN in env and {"name": "LOG", "value": "debug"} in env
        for release in RELEASES:
            kubernetes_validate.validate(pod_owner, release, strict=True)


def test_the_api_key_reaches_the_replicas_from_its_secret_alone_and_the_profiler_gets_none():
    spec = cpu_spec(apiKeySecretRef=API_KEY)
    replicas = env_of(build_statefulset(OWNER, spec, PLAN, None))
    assert {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": API_KEY}} in replicas
    # The profiler's load generator talks to its own engines inside the pod, without a key.
    job = build_profiling_job(PROFILE, profile_conditions(spec, None), spec, None)
    assert "VLLM_API_KEY" not in json.dumps(job)
    # The key is not what keys the profile: deployments with and without one share the measurement.
    assert profile_conditions(spec, None).key() == profile_conditions(cpu_spec(), None).key()


def test_the_health_probes_stay_on_the_unauthenticated_path():
    engine = build_statefulset(OWNER, cpu_spec(apiKeySecretRef=API_KEY), PLAN, None)["spec"]["template"]["spec"][
        "containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert engine[probe]["httpGet"]["path"] == "/health"  # vLLM guards /v1 only


@pytest.mark.parametrize(("engine", "message"), [
    ({"extraArgs": ["--api-key", "s3cret"]}, "an --api-key there is stored in the SLMProfile"),
    ({"extraArgs": ["--api-key=s3cret"]}, "name it in spec.apiKeySecretRef"),
    ({"extraArgs": ["--hf-token", "s3cret"]}, "an --hf-token there is stored in the SLMProfile"),
    ({"extraArgs": ["--hf-token=s3cret"]}, "set HF_TOKEN from it in spec.engine.env (valueFrom)"),
    ({"env": [{"name": "T", "value": "x", "valueFrom": {"secretKeyRef": {"name": "a", "key": "b"}}}]},
     "spec.engine.env T: an env entry takes value or valueFrom, not both"),
    ({"env": [{"name": "T", "valueFrom": {}}]}, "spec.engine.env T: valueFrom needs exactly one of"),
])
def test_a_secret_in_the_wrong_place_is_refused_with_the_fix(engine, message):
    decision = decide(deployment(engine=engine, replicas=2), ClusterSnapshot((node("gpu-a", 1),)),
                      NOW)
    refused = condition(decision, "InvalidSpec")
    assert refused.status == "True" and message in refused.message
    assert "s3cret" not in refused.message and not decision.apply and not decision.create


def test_the_hf_token_flag_alone_reads_no_secret_from_the_spec_and_passes():
    decision = decide(deployment(engine={"extraArgs": ["--hf-token", "--enforce-eager"]}, replicas=2),
                      ClusterSnapshot((node("gpu-a", 1),)), NOW)
    assert condition(decision, "InvalidSpec").status == "False"


def test_an_api_key_set_twice_is_refused():
    decision = decide(deployment(apiKeySecretRef=API_KEY, replicas=2,
                                 engine={"env": [{"name": "VLLM_API_KEY", "value": "x"}]}),
                      ClusterSnapshot((node("gpu-a", 1),)), NOW)
    assert "spec.engine.env sets VLLM_API_KEY, which spec.apiKeySecretRef sets" in condition(
        decision, "InvalidSpec").message


# ---------------------------------------------------------------- the engines' NetworkPolicy


def test_the_policy_is_valid_and_selects_the_engines_not_the_profiler():
    spec = cpu_spec(networkPolicy={"allowFrom": [{"podSelector": {"matchLabels": {"app": "router"}}}]})
    policy = build_network_policy(OWNER, spec, OPERATOR_PEER)
    for release in RELEASES:
        kubernetes_validate.validate(policy, release, strict=True)
    engines = build_statefulset(OWNER, spec, PLAN, None, pack=1)["spec"]["template"]["metadata"]["labels"]
    profiler = build_profiling_job(PROFILE, profile_conditions(spec, None), spec, None)["spec"]["template"][
        "metadata"]["labels"]
    other = build_statefulset(Owner("SLMDeployment", "other", "d-2", "team"), spec, PLAN, None)["spec"]["template"][
        "metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"], engines)
    assert not selects(policy["spec"]["podSelector"], profiler)
    assert not selects(policy["spec"]["podSelector"], other)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    # A peer without a namespaceSelector is the policy's own namespace: the router there, and only it.
    assert rule["from"][0] == {"podSelector": {"matchLabels": {"app": "router"}}}


def test_the_operator_peer_selects_the_operators_pods_as_the_chart_runs_them(helm):  # noqa: F811
    docs = render(helm)
    deployment_ = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment_["spec"]["template"]["spec"]["containers"][0]["env"]}
    peer = operator_peer(env["SLMPACK_OPERATOR_NAMESPACE"], env["SLMPACK_OPERATOR_POD_LABELS"])
    assert selects(peer["podSelector"], deployment_["spec"]["template"]["metadata"]["labels"])
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "slmpack-system"}}
    exporter = next(d for d in docs if d["kind"] == "DaemonSet")
    assert not selects(peer["podSelector"], exporter["spec"]["template"]["metadata"]["labels"])


def test_with_no_peer_the_policy_admits_nothing_rather_than_everyone():
    # An ingress rule whose `from` is empty admits every source, so no rule is written at all.
    policy = build_network_policy(OWNER, cpu_spec(networkPolicy={}), None)
    assert policy["spec"]["ingress"] == []
    only_operator = build_network_policy(OWNER, cpu_spec(networkPolicy={}), OPERATOR_PEER)
    assert only_operator["spec"]["ingress"][0]["from"] == [OPERATOR_PEER]


def test_the_policy_is_applied_while_set_and_deleted_once_unset_but_only_the_deployments_own():
    nodes = (node("gpu-a", 1),)
    with_policy = decide(deployment(replicas=2, networkPolicy={"allowFrom": [{}]}),
                         ClusterSnapshot(nodes, operator_peer=OPERATOR_PEER), NOW)
    policy, routers = [o for o in with_policy.apply if o["kind"] == "NetworkPolicy"]
    assert (policy["metadata"]["name"], routers["metadata"]["name"]) == ("chat-engines", "chat-router")
    # The operator reads the routers' queue on HAProxy's metrics port, and nothing else.
    assert routers["spec"]["ingress"][1] == {"from": [OPERATOR_PEER], "ports": [{"protocol": "TCP", "port": 8404}]}
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "d-1"
    ours = {**policy, "metadata": {**policy["metadata"], "uid": "np-1"}}
    copied = {**policy, "metadata": {**policy["metadata"], "name": "copy", "uid": "np-2", "ownerReferences": []}}
    without = decide(deployment(replicas=2), ClusterSnapshot(nodes, network_policies=(ours, copied)), NOW)
    assert [o["metadata"]["uid"] for o in without.delete] == ["np-1"]
    assert "NetworkPolicy" not in [o["kind"] for o in without.apply]


# ---------------------------------------------------------------- the engines' disruption budget


def test_a_drain_takes_one_engine_replica_at_a_time_over_all_packs():
    budget = build_disruption_budget(OWNER)
    for release in RELEASES:
        kubernetes_validate.validate(budget, release, strict=True)
    assert budget["metadata"]["name"] == "chat-engines" and budget["spec"]["maxUnavailable"] == 1
    for pack in (0, 3):
        labels = build_statefulset(OWNER, cpu_spec(), PLAN, None, pack=pack)["spec"]["template"]["metadata"]["labels"]
        assert selects(budget["spec"]["selector"], labels)
    assert build_disruption_budget(OWNER, "policy/v1beta1")["apiVersion"] == "policy/v1beta1"


def test_the_secured_example_renders_objects_the_apiserver_schemas_accept(capsys):
    from tests.unit.test_render import NODES, PROFILE, ROOT
    from tests.unit.test_render import render as render_cli
    code, docs, _ = render_cli(capsys, "-f", ROOT / "examples" / "slmdeployment-secured.yaml",
                               "--node", NODES / "h100-mps-r4-g1.yaml", "--profile", PROFILE)
    assert code == 0
    assert [d["kind"] for d in docs] == ["Service", "PodDisruptionBudget", "NetworkPolicy", "NetworkPolicy",
                                         "ServiceAccount", "RoleBinding", "Service", "ConfigMap", "Deployment",
                                         "PodDisruptionBudget", "StatefulSet", "SLMDeployment"]
    # The routers send the clients' requests, so the engines' policy admits them; and the routers' own policy
    # admits only the listed clients, so the engines' policy is no way around.
    policy, router_policy = (d for d in docs if d["kind"] == "NetworkPolicy")
    routers = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["metadata"]["labels"]
    engines = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert any(selects(peer["podSelector"], routers) for peer in policy["spec"]["ingress"][0]["from"])
    assert selects(router_policy["spec"]["podSelector"], routers)
    assert not selects(router_policy["spec"]["podSelector"], engines)
    assert not selects(policy["spec"]["podSelector"], routers)
    listed = next(d for d in docs if d["kind"] == "SLMDeployment")["spec"]["networkPolicy"]["allowFrom"]
    [clients] = router_policy["spec"]["ingress"]  # `slmpack render` knows no operator to admit
    assert (len(clients["from"]), clients["ports"]) == (len(listed), [{"protocol": "TCP", "port": 8000}])
    for obj in docs[:-1]:
        for release in RELEASES:
            kubernetes_validate.validate(obj, release, strict=True)
    env = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "smollm2-api", "key": "key"}}} in env
