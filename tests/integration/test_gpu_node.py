"""The emulated NVIDIA device plugin on the real kubelet: what pods asking for GPUs see.

Busybox pods print what the container got; the kubelet admits them (or not) through the
plugin's real Allocate, so each test shows a user-visible outcome: Running with this env and
these mounts, or Failed with UnexpectedAdmissionError.
"""


import pytest
from kubernetes import client

from slmpack.core.gpu_assignments import config_map_name, gpus_by_pod_uid
from slmpack.core.gpu_pin import allocated_gpus
from slmpack.exporter.gpu_assignments import ConfigMapsApi, GpuPublisher, gpu_uuids, pod_resources_lister
from slmpack.exporter.pods import DEPLOYMENT_LABEL
from tests.fixtures.cluster import wait
from tests.fixtures.gpu_node import publishing_exporter

pytestmark = pytest.mark.node

REPORT = ('echo "visible=$NVIDIA_VISIBLE_DEVICES"; echo "pipe=$CUDA_MPS_PIPE_DIRECTORY"; '
          'echo "shm=$(ls /dev/shm | tr "\\n" " ")"; [ -n "$CUDA_MPS_PIPE_DIRECTORY" ] && '
          'echo "pipedir=$(ls $CUDA_MPS_PIPE_DIRECTORY | tr "\\n" " ")"; '
          'env | grep -c "^CUDA_MPS_.*LIMIT\\|PERCENTAGE" | sed "s/^/limits=/"; sleep 3600')


def gpu_pod(name: str, image: str, slots: int = 1, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "engine", "image": image, "imagePullPolicy": "Never",
                                     "command": ["sh", "-c", REPORT],
                                     "resources": {"limits": {"nvidia.com/gpu": str(slots)}}}]}}


def run(core: client.CoreV1Api, namespace: str, pod: dict) -> dict[str, str]:
    """Create the pod, wait until it reports, return what it printed (key=value lines)."""
    name = pod["metadata"]["name"]
    core.create_namespaced_pod(namespace, pod)

    def report():
        status = core.read_namespaced_pod(name, namespace).status
        assert status.phase != "Failed", f"{name} failed: {status.reason}: {status.message}"
        if status.phase != "Running":
            return None
        text = core.read_namespaced_pod_log(name, namespace)
        return text if "limits=" in text else None

    text = wait(report, 90, f"pod {name} to run and report")
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@pytest.fixture
def core(api_client) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.mark.parametrize("sharing, replicas", [("none", 1), ("time-slicing", 4), ("mps", 4)])
def test_a_one_slot_pod_is_admitted_and_sees_its_gpu(gpu_node, emulated_plugin, busybox_image, core, namespace,
                                                     sharing, replicas):
    node = gpu_node(gpus=1, sharing=sharing, replicas=replicas)
    mps_root = emulated_plugin.mps_root
    if sharing == "mps":  # what the MPS daemon would have put there
        (mps_root / "shm" / "mps-shm-marker").write_text("")
        (mps_root / "nvidia.com" / "gpu" / "pipe" / "control").write_text("")
    seen = run(core, namespace, gpu_pod("engine-0", busybox_image))
    assert seen["visible"] == node.uuids[0]
    assert seen["limits"] == "0"  # the MPS limits are the daemon's defaults, never client env
    if sharing == "mps":
        assert seen["pipe"] == "/mps/nvidia.com/gpu/pipe"
        assert "control" in seen["pipedir"].split()  # the host's pipe directory
        assert "mps-shm-marker" in seen["shm"].split()  # the host's MPS shm at /dev/shm
    else:
        assert seen["pipe"] == "" and "mps-shm-marker" not in seen["shm"]


def test_mps_refuses_a_pod_asking_for_two_slots(gpu_node, busybox_image, core, namespace):
    gpu_node(gpus=1, sharing="mps", replicas=4)
    core.create_namespaced_pod(namespace, gpu_pod("profiler", busybox_image, slots=2))
    status = wait(lambda: (s := core.read_namespaced_pod("profiler", namespace).status).phase == "Failed" and s,
                  90, "the kubelet to refuse the pod")
    assert status.reason == "UnexpectedAdmissionError"
    assert "maximum request size for shared resources is 1; found 2" in status.message


def test_time_slicing_admits_two_slots_of_one_gpu(gpu_node, busybox_image, core, namespace):
    node = gpu_node(gpus=1, sharing="time-slicing", replicas=4)
    assert run(core, namespace, gpu_pod("profiler", busybox_image, slots=2))["visible"] == node.uuids[0]


@pytest.mark.parametrize("policy, same_gpu", [("distributed", False), ("packed", True)])
def test_the_allocation_policy_decides_whether_two_replicas_share_a_gpu(gpu_node, busybox_image, core, namespace,
                                                                         policy, same_gpu):
    node = gpu_node(gpus=2, sharing="mps", replicas=4, policy=policy)
    first = run(core, namespace, gpu_pod("chat-0", busybox_image))["visible"]
    second = run(core, namespace, gpu_pod("chat-1", busybox_image))["visible"]
    assert {first, second} <= set(node.uuids)
    assert (first == second) is same_gpu
    # The plugin's MPS clients see every GPU: each engine pins CUDA to what its container was given, so two
    # replicas the plugin spread over two GPUs do not both run on the first.
    pinned = [allocated_gpus({"NVIDIA_VISIBLE_DEVICES": given}, set(), {}).devices for given in (first, second)]
    assert pinned == [first, second]


def test_the_nodes_config_map_names_the_gpus_the_kubelet_gave_each_engine_pod(gpu_node, busybox_image, core,
                                                                             namespace, emulated_plugin):
    gpu_node(gpus=2, sharing="mps", replicas=2)
    engine = {DEPLOYMENT_LABEL: "chat"}
    visible = {name: run(core, namespace, gpu_pod(name, busybox_image, labels=engine))["visible"]
               for name in ("chat-0", "chat-1")}
    run(core, namespace, gpu_pod("not-an-engine", busybox_image))
    pod_resources = pod_resources_lister(emulated_plugin.kubelet_root / "pod-resources" / "kubelet.sock")
    assert {k: v for k, v in gpu_uuids(pod_resources()).items() if k[0] == namespace} == {
        (namespace, "chat-0"): visible["chat-0"], (namespace, "chat-1"): visible["chat-1"],
        (namespace, "not-an-engine"): gpu_uuids(pod_resources())[(namespace, "not-an-engine")]}

    def engine_pods():
        pods = core.list_namespaced_pod(namespace, label_selector=DEPLOYMENT_LABEL)
        return core.api_client.sanitize_for_serialization(pods)["items"]

    # The test's namespace stands for the exporter's own.
    publisher = GpuPublisher("localhost", namespace, pod_resources, engine_pods, ConfigMapsApi(namespace, core))
    assert publisher.sync() is True
    config_map = core.read_namespaced_config_map(config_map_name("localhost"), namespace).to_dict()
    uid = {name: core.read_namespaced_pod(name, namespace).metadata.uid for name in visible}
    assert gpus_by_pod_uid([config_map]) == {uid[name]: (uuid,) for name, uuid in visible.items()}
    assert publisher.sync() is False  # nothing changed, nothing written
    core.delete_namespaced_pod("chat-1", namespace, grace_period_seconds=0)
    wait(lambda: publisher.sync() or None, 60, "the deleted pod's entry to be dropped")
    config_map = core.read_namespaced_config_map(config_map_name("localhost"), namespace).to_dict()
    assert gpus_by_pod_uid([config_map]) == {uid["chat-0"]: (visible["chat-0"],)}


def test_the_exporter_process_publishes_the_engine_pods_gpus(gpu_node, busybox_image, core, namespace,
                                                             emulated_plugin, node_kubeconfig, tmp_path):
    gpu_node(gpus=2, sharing="time-slicing", replicas=2)
    visible = run(core, namespace, gpu_pod("chat-0", busybox_image, labels={DEPLOYMENT_LABEL: "chat"}))["visible"]
    uid = core.read_namespaced_pod("chat-0", namespace).metadata.uid
    log = tmp_path / "exporter.log"

    def published():
        try:
            return gpus_by_pod_uid([core.read_namespaced_config_map(config_map_name("localhost"), namespace).to_dict()])
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise

    with publishing_exporter(emulated_plugin, node_kubeconfig, log, namespace):
        found = wait(published, 60, "the exporter to publish the engine pod's GPU")
    assert found == {uid: (visible,)}, log.read_text()[-2000:]
    assert not (core.read_namespaced_pod("chat-0", namespace).metadata.annotations or {})  # no pod is written
