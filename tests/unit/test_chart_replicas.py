"""Several operator replicas: a Lease elects the one that acts (controller/leader.py)."""

from tests.unit.test_chart import helm, render  # noqa: F401


def test_one_replica_and_several_alike_elect_through_a_lease(helm):  # noqa: F811
    single = render(helm)
    operator = next(d for d in single if d["kind"] == "Deployment" and "operator" in d["metadata"]["name"])
    env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert operator["spec"]["replicas"] == 1 and env["SLMPACK_LEADER_ELECTION_LEASE"]
    assert any(d["kind"] == "Role" and d["metadata"]["name"].endswith("leader-election") for d in single)

    docs = render(helm, "operator.replicas=2")
    operator = next(d for d in docs if d["kind"] == "Deployment" and "operator" in d["metadata"]["name"])
    env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert operator["spec"]["replicas"] == 2 and "strategy" not in operator["spec"]
    namespace, _, lease = env["SLMPACK_LEADER_ELECTION_LEASE"].partition("/")
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("leader-election"))
    assert role["metadata"]["namespace"] == namespace and lease
    assert role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                              "verbs": ["get", "create", "update"]}]
