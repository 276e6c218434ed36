"""One physical GPU per pack, verified end to end on the real kubelet: the emulated device plugin gives the
replicas their slots, the exporter reads from the kubelet's PodResources API which GPU each replica got and
publishes it in a ConfigMap, and the operator reports the pack split when the plugin spread it over two GPUs."""

import pytest
from kopf.testing import KopfRunner

from tests.fixtures.cluster import local_image
from tests.fixtures.fake_engine import ENGINE_CPU, fake_engine_spec
from tests.fixtures.gpu_node import publishing_exporter
from tests.integration.test_operator import (  # noqa: F401 (the module's cluster fixture)
    Cluster,
    cluster,
    deployment,
    operator,
    wait,
)

pytestmark = [pytest.mark.cluster, pytest.mark.node]


@pytest.fixture
def k(cluster, namespace):  # noqa: F811
    return Cluster(cluster, namespace)


@pytest.fixture
def exporter_log(emulated_plugin, node_kubeconfig, tmp_path, namespace, monkeypatch):
    """The exporter process publishing the engine pods' GPUs while the test runs, in the test's namespace
    (standing for the release's), where the operator reads them; its log."""
    monkeypatch.setenv("SLMPACK_GPU_ASSIGNMENTS_NAMESPACE", namespace)
    log = tmp_path / "exporter.log"
    with publishing_exporter(emulated_plugin, node_kubeconfig, log, namespace):
        yield log


def one_gpu(k, name):
    return next((c for c in k.status(name).get("conditions", []) if c["type"] == "OneGPU"), None)


def test_a_pack_the_plugin_spreads_over_two_gpus_is_reported_split_with_a_warning(k, gpu_node, fake_engines,
                                                                                   exporter_log):
    # Two GPUs shared two ways, slots handed out as NVIDIA's plugin does by default (distributed).
    node = gpu_node(gpus=2, sharing="time-slicing", replicas=2)
    local_image(ENGINE_CPU)
    spec = fake_engine_spec(fake_engines)
    spec["engine"]["device"] = "gpu"  # the OneGPU check is the GPU path's; the stand-in ignores GPU flags
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment("split", replicas=2, sharing="time-slicing", **spec))
        split = wait(lambda: (c := one_gpu(k, "split")) and c["reason"] == "SplitAcrossGPUs" and c, 240,
                     f"the split to be reported (exporter log: {exporter_log})")
        status = k.status("split")
        by_replica = {r["name"]: r["gpuUUIDs"] for r in status["replicaGPUs"]}
        assert sorted(by_replica) == ["split-0", "split-1"]
        gpus = {uuid for uuids in by_replica.values() for uuid in uuids}
        assert len(gpus) == 2 and gpus <= set(node.uuids)
        assert split["status"] == "False" and all(uuid in split["message"] for uuid in gpus)
        assert status["phase"] == "Degraded"
        warnings = [e for e in k.core.list_namespaced_event(k.ns).items
                    if e.reason == "SplitAcrossGPUs" and e.type == "Warning"]
        assert warnings and "placement dra" in warnings[0].message
    assert runner.exception is None, runner.output
