"""Every pod the operator makes is admitted by the real kubelet in each device-plugin configuration.

For a representative subset of none/mps/time-slicing x R x G, the emulated NVIDIA device plugin
runs with those settings, `slmpack render` reads the Node as the API shows it and prints what
the operator would create, and the pod-making objects (the profiling Job, the replica
StatefulSet) are created as rendered, with busybox in place of the engine. Each pod must run
and see a GPU of this node; or render must refuse, exit non-zero with the InvalidSpec message,
and print nothing to create.
"""

import contextlib
import io
import time

import pytest
import yaml
from kubernetes import client, utils

from slmpack.cli import main as slmpack

pytestmark = pytest.mark.node

# (sharing, R, G) of the node; the SLMDeployment asks for `sharing` and, when fixed, `replicas`.
CONFIGURATIONS = [("none", 1, 1), ("mps", 4, 1), ("time-slicing", 4, 1), ("mps", 2, 2), ("time-slicing", 2, 2),
                  ("mps", 4, 2), ("time-slicing", 7, 8)]
REPORT = 'echo "visible=$NVIDIA_VISIBLE_DEVICES shm=$(ls /dev/shm | tr "\\n" " ")"; sleep 3600'


def slmdeployment(namespace: str, sharing: str, replicas: int | None) -> dict:
    spec = {"model": {"name": "HuggingFaceTB/SmolLM2-360M-Instruct", "maxModelLen": 4096},
            "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}, "sharing": "mps" if sharing == "none" else sharing}
    if replicas:
        spec["replicas"] = replicas
    return {"apiVersion": "slmpack.dev/v1alpha1", "kind": "SLMDeployment",
            "metadata": {"name": "chat", "namespace": namespace}, "spec": spec}


def render(tmp_path, deployment: dict, node: dict) -> tuple[int, list[dict], str]:
    (tmp_path / "chat.yaml").write_text(yaml.safe_dump(deployment))
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(node))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = slmpack(["render", "-f", str(tmp_path / "chat.yaml"), "--node", str(tmp_path / "node.yaml")])
    return code, [d for d in yaml.safe_load_all(out.getvalue()) if d], err.getvalue().strip()


def on_busybox(obj: dict, image: str) -> dict:
    """The rendered object, its pods running busybox in place of the engine; nothing else changed
    that admission looks at (resources, node selection, volumes, security context)."""
    obj["metadata"].pop("ownerReferences", None)  # the rendered owner does not exist here
    pod = obj["spec"]["template"]["spec"]
    pod["terminationGracePeriodSeconds"] = 0
    for container in pod["containers"]:
        container.update(image=image, imagePullPolicy="Never", command=["sh", "-c", REPORT], args=[])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            container.pop(probe, None)
    return obj


def pods_report(core: client.CoreV1Api, namespace: str, selector: str, count: int) -> dict[str, dict]:
    """What every container of the `count` pods printed, by `pod/container` (a profiling pod holds a slot in each
    of its containers)."""
    deadline = time.monotonic() + 120
    while True:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        failed = [p for p in pods if p.status.phase == "Failed"]
        assert not failed, f"{failed[0].metadata.name}: {failed[0].status.reason}: {failed[0].status.message}"
        running = [p for p in pods if p.status.phase == "Running"]
        logs = {f"{p.metadata.name}/{c.name}": core.read_namespaced_pod_log(p.metadata.name, namespace,
                                                                             container=c.name)
                for p in running for c in p.spec.containers}
        if len(running) == count and all("visible=" in text for text in logs.values()):
            return {name: dict(kv.split("=", 1) for kv in text.split(" ") if "=" in kv) for name, text in logs.items()}
        assert time.monotonic() < deadline, f"{count} pods of {selector} did not run: {[p.status for p in pods]}"
        time.sleep(1)


# The node configuration changes slowest: each change restarts the plugin.
@pytest.mark.parametrize("fixed", [None, 2], ids=["profiling-job", "two-replicas"])
@pytest.mark.parametrize("sharing, replicas_per_gpu, gpus", CONFIGURATIONS,
                         ids=[f"{s}-r{r}-g{g}" for s, r, g in CONFIGURATIONS])
def test_rendered_pods_are_admitted_or_refused_before_creation(gpu_node, emulated_plugin, busybox_image, api_client,
                                                               namespace, tmp_path, sharing, replicas_per_gpu, gpus,
                                                               fixed):
    node = gpu_node(gpus=gpus, sharing=sharing, replicas=replicas_per_gpu)
    mps_shm = emulated_plugin.mps_root / "shm" / "mps-shm-marker"  # what the MPS daemon's shm holds on the host
    if sharing == "mps":
        mps_shm.write_text("")
    core = client.CoreV1Api(api_client)
    node_object = api_client.sanitize_for_serialization(core.read_node(node.node))
    code, objects, refusal = render(tmp_path, slmdeployment(namespace, sharing, fixed), node_object)

    if fixed and fixed > replicas_per_gpu:  # a pack larger than the GPU's slots cannot be placed
        assert code != 0 and objects == []
        assert refusal.startswith("spec.replicas (2) exceeds the 1 sharing slots"), refusal
        return
    assert code == 0, refusal
    workloads = [o for o in objects if o["kind"] in ("Job", "StatefulSet")]
    assert [o["kind"] for o in workloads] == (["StatefulSet"] if fixed else ["Job"])
    for obj in objects:
        if obj["kind"] == "ServiceAccount":
            core.create_namespaced_service_account(namespace, obj)
    (workload,) = workloads
    utils.create_from_dict(api_client, on_busybox(workload, busybox_image), namespace=namespace)
    selector = ",".join(f"{k}={v}" for k, v in workload["spec"]["template"]["metadata"]["labels"].items())
    seen = pods_report(core, namespace, selector, fixed or 1)
    assert {report["visible"] for report in seen.values()} <= set(node.uuids)
    if not fixed:  # the profiling pod holds one slot per engine it may run, each container one, all admitted
        assert len(seen) == min(4, replicas_per_gpu), seen  # maxReplicas 4 by default, at most the node's R
    if sharing == "mps":  # no pod volume hides the node's MPS shm that the plugin mounts at /dev/shm
        assert all(mps_shm.name in report["shm"].split() for report in seen.values()), seen
