"""Which GPUs each engine pod got: the ConfigMaps in which every node's exporter publishes them.

The exporter of a node reads the kubelet's PodResources API and writes one ConfigMap in its own
namespace, `slmpack-gpus-<node>`, labelled `slmpack.dev/gpu-assignments: <node>`. Its data maps
each engine pod to the UUIDs of the GPUs its containers were given, comma-separated and sorted:

    ai.chat-0.6f1c2d3e-...: GPU-0b8e2c3a-...,GPU-9f1d7e42-...

Where NVML answers, the key `<namespace>.<pod>.<pod uid>.running` lists the GPUs on which the pod's
processes actually run (NVML's per-GPU process lists, MPS clients included): the plugin's MPS clients see
every GPU, so an engine that did not pin itself runs elsewhere than its slot.

A key is `<namespace>.<pod>.<pod uid>`: a ConfigMap key may hold only letters, digits, `-`, `_` and
`.`, and neither a namespace nor a UID has a dot. The UID makes an entry name one pod: a
StatefulSet pod recreated under the same name, maybe on another GPU, has no entry until the
exporter has seen it. The operator lists and watches these ConfigMaps in that one namespace, so
neither needs to write pods: the exporter runs as root on nodes where tenants run images of
their choice, and a pod write there would reach every pod of the cluster.
"""

from __future__ import annotations

from collections.abc import Iterable

from slmpack import API_GROUP
from slmpack.core.manifests import dns_name, label_value

ASSIGNMENTS_LABEL = f"{API_GROUP}/gpu-assignments"  # its value: the node (cut to a label value)
NAME_LIMIT = 253  # a ConfigMap's name is a DNS subdomain


def config_map_name(node: str) -> str:
    return dns_name("slmpack-gpus", node, limit=NAME_LIMIT)


def entry_key(namespace: str, pod: str, uid: str) -> str:
    return f"{namespace}.{pod}.{uid}"


DRA_PREFIX = "dra:"  # a GPU a DRA driver allocated, until its UUID is looked up in the driver's ResourceSlices


def dra_device_id(driver: str, pool: str, device: str) -> str:
    return f"{DRA_PREFIX}{driver}/{pool}/{device}"


RUNNING = "running"  # the suffix of a key listing where a pod's processes run; never a pod UID


def build_gpu_assignments(node: str, namespace: str, uuids: dict[tuple[str, str, str], str],
                          running: dict[tuple[str, str, str], str] | None = None) -> dict:
    """The node's ConfigMap: (namespace, pod, pod uid) -> comma-separated GPU UUIDs it was given, and where
    its processes run (`running`)."""
    data = {entry_key(*pod): value for pod, value in uuids.items()}
    data |= {f"{entry_key(*pod)}.{RUNNING}": value for pod, value in (running or {}).items()}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": config_map_name(node), "namespace": namespace,
                         "labels": {ASSIGNMENTS_LABEL: label_value(node),
                                    "app.kubernetes.io/name": "slmpack",
                                    "app.kubernetes.io/component": "exporter"}},
            "data": dict(sorted(data.items()))}


def gpus_by_pod_uid(config_maps: Iterable[dict], running: bool = False) -> dict[str, tuple[str, ...]]:
    """Pod UID -> the GPU UUIDs it was given (or, with `running`, where its processes run), from the nodes'
    ConfigMaps (a key without a UID is skipped)."""
    found: dict[str, tuple[str, ...]] = {}
    for config_map in config_maps:
        for key, value in (config_map.get("data") or {}).items():
            if key.endswith(f".{RUNNING}") != running:
                continue
            _, dot, uid = key.removesuffix(f".{RUNNING}").rpartition(".")
            uuids = tuple(u.strip() for u in (value or "").split(",") if u.strip())
            if dot and uid and uuids:
                found[uid] = uuids
    return found
