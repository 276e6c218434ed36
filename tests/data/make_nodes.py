"""Write the Node fixtures in tests/data/nodes/: one H100 node per device-plugin configuration.

Each file is a Node as `kubectl get node -o yaml` shows it on a cluster running NVIDIA's device
plugin with GPU feature discovery, sharing none, mps or time-slicing with R replicas per GPU,
and G GPUs. The labels follow GFD (NVIDIA/k8s-device-plugin internal/lm/resource.go):
`nvidia.com/gpu.product` gets `-SHARED` when R > 1, `nvidia.com/gpu.replicas` is R per GPU,
`nvidia.com/gpu.count` counts physical GPUs, `nvidia.com/gpu.memory` is in MiB, and the
allocatable `nvidia.com/gpu` is G x R. The GPU Operator also writes `nvidia.com/gpu.present=true`;
the `h100-plugin-*` nodes are a plain device-plugin cluster's, without it, and the `h100-tainted-*` ones a
pool tainted `nvidia.com/gpu:NoSchedule`. Run `python tests/data/make_nodes.py` to regenerate.
"""

from pathlib import Path

import yaml

PRODUCT = "NVIDIA-H100-80GB-HBM3"
MEMORY_MIB = 81559
REPLICAS = (1, 2, 4, 7)
GPUS = (1, 2, 8)
CONFIGS = [("none", 1)] + [(mode, r) for mode in ("mps", "time-slicing") for r in REPLICAS]


def node(sharing: str, replicas: int, gpus: int) -> dict:
    name = f"h100-{sharing}-r{replicas}-g{gpus}"
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": PRODUCT + ("-SHARED" if replicas > 1 else ""),
        "nvidia.com/gpu.count": str(gpus),
        "nvidia.com/gpu.memory": str(MEMORY_MIB),
        "nvidia.com/gpu.replicas": str(replicas),
        "nvidia.com/gpu.sharing-strategy": sharing,
        "nvidia.com/gpu.family": "hopper",
        "nvidia.com/gpu.compute.major": "9",
        "nvidia.com/gpu.compute.minor": "0",
    }
    if sharing == "mps":
        labels["nvidia.com/mps.capable"] = "true"
    resources = {"cpu": "64", "memory": "527952196Ki", "pods": "110", "nvidia.com/gpu": str(gpus * replicas)}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "spec": {}, "status": {"capacity": dict(resources), "allocatable": dict(resources)}}


def plain_plugin_node(sharing: str, replicas: int, gpus: int) -> dict:
    """A node of a cluster that runs the device plugin and GFD from their own Helm chart, without the GPU
    Operator: no GFD labeler writes nvidia.com/gpu.present (NVIDIA/k8s-device-plugin internal/lm/)."""
    obj = node(sharing, replicas, gpus)
    obj["metadata"]["name"] = name = obj["metadata"]["name"].replace("h100-", "h100-plugin-", 1)
    labels = obj["metadata"]["labels"]
    del labels["nvidia.com/gpu.present"]
    labels["kubernetes.io/hostname"] = name
    return obj


def tainted_node(sharing: str, replicas: int, gpus: int) -> dict:
    """A node of a GPU pool tainted nvidia.com/gpu:NoSchedule, as managed GPU pools are."""
    obj = node(sharing, replicas, gpus)
    obj["metadata"]["name"] = name = obj["metadata"]["name"].replace("h100-", "h100-tainted-", 1)
    obj["metadata"]["labels"]["kubernetes.io/hostname"] = name
    obj["spec"] = {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]}
    return obj


def main() -> None:
    out = Path(__file__).parent / "nodes"
    out.mkdir(exist_ok=True)
    objects = [node(sharing, replicas, gpus) for sharing, replicas in CONFIGS for gpus in GPUS]
    # A plain plugin that shares nothing: where placement pack-pod runs with no sharing set up.
    objects += [plain_plugin_node("mps", 4, 1), plain_plugin_node("time-slicing", 4, 8),
                plain_plugin_node("none", 1, 8),
                tainted_node("mps", 4, 1), tainted_node("mps", 4, 8)]
    for obj in objects:
        (out / f"{obj['metadata']['name']}.yaml").write_text(yaml.safe_dump(obj, sort_keys=False))


if __name__ == "__main__":
    main()
