"""From the kubelet's PodResources answer to the node's ConfigMap of GPU assignments, and back to each
replica's GPUs in the operator (the pure parts, and the exporter's write against a store that keeps
resourceVersions as the apiserver does)."""

import copy
import logging
from types import SimpleNamespace as NS

import pytest

from slmpack.controller.handlers import replica_state, with_gpus
from slmpack.core.gpu_assignments import ASSIGNMENTS_LABEL, build_gpu_assignments, config_map_name, gpus_by_pod_uid
from slmpack.exporter.gpu_assignments import GpuPublisher, engine_pod_gpus, gpu_uuids, running_gpus

A, B = "GPU-0b8e2c3a-1111-2222-3333-444455556666", "GPU-9f1d7e42-aaaa-bbbb-cccc-ddddeeeeffff"
UID0, UID1 = "6f1c2d3e-0000-4000-8000-000000000000", "6f1c2d3e-0000-4000-8000-000000000001"
ENGINE = {"slmpack.dev/deployment": "chat"}


def pod_resources(namespace, name, *containers):
    return NS(namespace=namespace, name=name, containers=[
        NS(name=f"c{i}", devices=[NS(resource_name=r, device_ids=ids) for r, ids in devices])
        for i, devices in enumerate(containers)])


def pod(name, uid, labels=None, namespace="ai"):
    return {"metadata": {"namespace": namespace, "name": name, "uid": uid, "labels": labels or {}}}


def test_replica_ids_become_their_gpu_uuids():
    listed = [
        pod_resources("ai", "chat-0", [("nvidia.com/gpu", [f"{A}::3"])]),
        pod_resources("ai", "chat-1", [("nvidia.com/gpu", [f"{A}::0", f"{B}::1"])], [("nvidia.com/gpu", [f"{B}::2"])]),
        pod_resources("ai", "whole", [("nvidia.com/gpu", [B])]),
        pod_resources("ai", "nic", [("example.com/nic", ["eth1"])]),
        pod_resources("ai", "cpu-only"),
    ]
    assert gpu_uuids(listed) == {("ai", "chat-0"): A, ("ai", "chat-1"): f"{A},{B}", ("ai", "whole"): B}


def test_only_engine_pods_with_gpus_are_published_by_namespace_name_and_uid():
    uuids = {("ai", "chat-0"): A, ("ai", "other"): A, ("ai", "gone"): B}
    pods = [pod("chat-0", UID0, ENGINE), pod("other", "u-other"), pod("chat-1", UID1, ENGINE)]
    assert engine_pod_gpus(uuids, pods) == {("ai", "chat-0", UID0): A}


def test_the_config_map_is_named_and_labelled_for_its_node_and_its_keys_are_valid():
    config_map = build_gpu_assignments("ip-10-0-0-7.ec2.internal", "slmpack-system", {("ai", "chat-0", UID0): A})
    meta = config_map["metadata"]
    assert meta["namespace"] == "slmpack-system" and meta["name"] == config_map_name("ip-10-0-0-7.ec2.internal")
    assert meta["name"].startswith("slmpack-gpus-ip-10-0-0-7") and len(meta["name"]) <= 253
    assert meta["labels"][ASSIGNMENTS_LABEL] == "ip-10-0-0-7.ec2.internal"
    assert config_map["data"] == {f"ai.chat-0.{UID0}": A}
    assert config_map_name("gpu-1") == "slmpack-gpus-gpu-1" != config_map_name("gpu-2")


def test_the_operator_reads_each_pods_gpus_by_its_uid():
    nodes = [build_gpu_assignments("gpu-1", "ns", {("ai", "chat-0", UID0): A}),
             build_gpu_assignments("gpu-2", "ns", {("ai", "chat-1", UID1): f"{A},{B}"}),
             {"metadata": {"name": "hand-made"}, "data": {"no-uid": A, "ai.x.u2": " , "}}, {"metadata": {}}]
    assert gpus_by_pod_uid(nodes) == {UID0: (A,), UID1: (A, B)}


def test_a_replica_gets_the_gpus_published_for_its_uid_and_a_recreated_pod_none():
    engine = {"metadata": {"name": "chat-0", "uid": UID0}, "spec": {"nodeName": "gpu-1"},
              "status": {"containerStatuses": [{"name": "engine", "ready": True}]}}
    recreated = copy.deepcopy(engine)
    recreated["metadata"]["uid"] = UID1  # the same StatefulSet pod name, a new pod
    (before,) = with_gpus((replica_state(engine),), {UID0: (A,)})
    (after,) = with_gpus((replica_state(recreated),), {UID0: (A,)})
    assert (before.name, before.gpu_uuids) == ("chat-0", (A,)) and after.gpu_uuids == ()


class ConfigMapStore:
    """ConfigMaps of one namespace as the apiserver keeps them: a resourceVersion per write, and a
    replace from an older version refused (409)."""

    def __init__(self):
        self.objects, self.version, self.writes = {}, 0, 0

    def read(self, name):
        return copy.deepcopy(self.objects.get(name))

    def _store(self, config_map):
        self.version += 1
        self.writes += 1
        stored = copy.deepcopy(config_map)
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.objects[stored["metadata"]["name"]] = stored

    def create(self, config_map):
        if config_map["metadata"]["name"] in self.objects:
            raise RuntimeError("409 AlreadyExists")
        self._store(config_map)

    def replace(self, config_map):
        held = self.objects[config_map["metadata"]["name"]]
        if config_map["metadata"].get("resourceVersion") != held["metadata"]["resourceVersion"]:
            raise RuntimeError("409 Conflict")
        self._store(config_map)


@pytest.fixture
def node():
    """A node whose kubelet and pod list the test changes; the exporter's publisher on it."""
    state = NS(resources=[pod_resources("ai", "chat-0", [("nvidia.com/gpu", [f"{A}::1"])])],
               pods=[pod("chat-0", UID0, ENGINE)], store=ConfigMapStore())
    state.publisher = GpuPublisher("gpu-1", "slmpack-system", lambda: state.resources, lambda: state.pods,
                                   state.store)
    return state


def published(node):
    return node.store.objects[config_map_name("gpu-1")]["data"]


def test_the_exporter_creates_the_config_map_once_then_writes_only_changes(node, caplog):
    caplog.set_level(logging.INFO)
    assert node.publisher.sync() is True and published(node) == {f"ai.chat-0.{UID0}": A}
    assert f"pod ai.chat-0.{UID0} runs on GPU {A}" in caplog.text
    assert node.publisher.sync() is False and node.store.writes == 1
    node.resources.append(pod_resources("ai", "chat-1", [("nvidia.com/gpu", [f"{B}::0"])]))
    node.pods.append(pod("chat-1", UID1, ENGINE))
    assert node.publisher.sync() is True and published(node) == {f"ai.chat-0.{UID0}": A, f"ai.chat-1.{UID1}": B}
    assert node.store.writes == 2


def test_where_the_engines_processes_run_is_published_beside_what_they_were_given(node):
    from functools import partial

    from slmpack.exporter.fake import FakeNode, FakeNvml, FakePods, FakeProcess
    from slmpack.exporter.nvml import NvmlSource
    from slmpack.exporter.pods import PodRef

    # chat-0 holds a slot on GPU A (kubelet), and NVML shows its process as an MPS client on the node's GPU 1.
    gpus = FakeNode(gpus=2, mps=True, processes=[FakeProcess(10_001, 1, PodRef("ai", "chat-0", "engine", "chat"))])
    node.publisher.list_running = partial(running_gpus, NvmlSource(FakeNvml(gpus)), FakePods(gpus))
    assert node.publisher.sync() is True
    assert published(node) == {f"ai.chat-0.{UID0}": A, f"ai.chat-0.{UID0}.running": "GPU-fake-0001"}
    config_map = node.store.objects[config_map_name("gpu-1")]
    assert gpus_by_pod_uid([config_map]) == {UID0: (A,)}
    assert gpus_by_pod_uid([config_map], running=True) == {UID0: ("GPU-fake-0001",)}
    # NVML gone (a GPU lost): the kubelet's answer is still published, without where the processes ran.
    gpus.lost = True
    assert node.publisher.sync() is True and published(node) == {f"ai.chat-0.{UID0}": A}


def test_the_entry_of_a_pod_that_is_gone_is_dropped(node):
    node.publisher.sync()
    node.resources, node.pods = [], []  # the kubelet no longer lists it
    assert node.publisher.sync() is True and published(node) == {}


def test_a_config_map_changed_by_someone_else_is_put_back(node):
    node.publisher.sync()
    node.store.objects[config_map_name("gpu-1")]["data"] = {"ai.chat-0.forged": B}
    assert node.publisher.sync() is True and published(node) == {f"ai.chat-0.{UID0}": A}


def test_a_failing_round_is_counted_and_the_next_one_writes(node):
    calls = iter([RuntimeError("kubelet away"), None])

    def flaky():
        error = next(calls)
        if error:
            raise error
        return node.resources

    node.publisher.list_pod_resources = flaky
    stop = NS(wait=lambda _: node.publisher.errors >= 1 and config_map_name("gpu-1") in node.store.objects)
    node.publisher.run(0, stop)
    assert node.publisher.errors == 1 and published(node) == {f"ai.chat-0.{UID0}": A}


def test_the_operators_cache_names_the_pods_whose_gpus_changed():
    from slmpack.controller.gpu_assignments import GpuAssignments

    changes = []
    cache = GpuAssignments(kube=None, namespace="slmpack-system", on_change=changes.append)
    first = build_gpu_assignments("gpu-1", "slmpack-system", {("ai", "chat-0", UID0): A})
    cache.replace_all([first])
    second = build_gpu_assignments("gpu-2", "slmpack-system", {("ai", "chat-1", UID1): B})
    cache.apply("ADDED", second)
    cache.apply("MODIFIED", first)  # unchanged data: nothing to reconcile
    assert cache.by_uid == {UID0: (A,), UID1: (B,)}
    cache.apply("DELETED", second)
    assert changes == [{UID0}, {UID1}, {UID1}] and cache.by_uid == {UID0: (A,)}
    # Where a pod's processes run changing is a change of that pod too.
    cache.apply("MODIFIED", build_gpu_assignments("gpu-1", "slmpack-system", {("ai", "chat-0", UID0): A},
                                                  {("ai", "chat-0", UID0): B}))
    assert changes[-1] == {UID0} and cache.running_by_uid == {UID0: (B,)} and cache.by_uid == {UID0: (A,)}


def test_the_operators_watch_lists_watches_and_lists_again_after_an_error(monkeypatch):
    """The list-watch loop in its thread, handing changes to a running event loop (the API stood in for
    by lists and watch streams that a test scripts)."""
    import asyncio

    import slmpack.controller.gpu_assignments as module

    monkeypatch.setattr(module, "RETRY_SECONDS", 0.01)

    first = build_gpu_assignments("gpu-1", "ns", {("ai", "chat-0", UID0): A})
    second = build_gpu_assignments("gpu-1", "ns", {("ai", "chat-0", UID0): A, ("ai", "chat-1", UID1): B})
    first["metadata"]["resourceVersion"], second["metadata"]["resourceVersion"] = "5", "6"

    class Api:
        def __init__(self):
            self.lists, self.watched_from = 0, []

        def list_config_maps(self, namespace, selector):
            assert (namespace, selector) == ("ns", ASSIGNMENTS_LABEL)
            self.lists += 1
            return ([first] if self.lists == 1 else [second]), str(self.lists * 10)

        def watch_config_maps(self, namespace, selector, version, timeout_s):
            self.watched_from.append(version)
            if len(self.watched_from) == 1:
                yield "MODIFIED", second
            raise RuntimeError("410 Gone")  # the version expired: list again

    async def follow():
        changes = []
        api = Api()
        cache = module.GpuAssignments(api, "ns", on_change=changes.append)
        cache.start(asyncio.get_running_loop())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if api.lists >= 2 and len(api.watched_from) >= 2:
                break
        cache.stop()
        await asyncio.sleep(0.05)
        return api, cache, changes

    api, cache, changes = asyncio.run(follow())
    assert api.watched_from[:2] == ["10", "20"]  # from each list's version
    assert cache.by_uid == {UID0: (A,), UID1: (B,)}
    assert changes[:2] == [{UID0}, {UID1}]


def test_new_gpus_of_a_pod_requeue_the_deployment_it_belongs_to():
    from slmpack.controller.handlers import Controller
    from slmpack.core.conditions import ReplicaState

    indices = {"pod_index": {("ai", "chat"): [ReplicaState("chat-0", True, uid=UID0)],
                             ("ai", "other"): [ReplicaState("other-0", True, uid=UID1)]},
               "deployments_by_label": {("ai", "chat"): ["chat"], ("ai", "other"): ["other"]}}
    controller = Controller(kube=None, indices=indices)
    controller.gpus_changed({UID0})
    assert controller.queue._dirty == {("ai", "chat")}
    controller.threads.shutdown()
