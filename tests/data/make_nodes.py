"""Write the Node fixtures in tests/data/nodes/: one H100 node per device-plugin configuration.

Each file is a Node as `kubectl get node -o yaml` shows it on a cluster running NVIDIA's device
plugin with GPU feature discovery, sharing none, mps or time-slicing with R replicas per GPU,
and G GPUs. The labels follow GFD (NVIDIA/k8s-device-plugin internal/lm/resource.go):
`nvidia.com/gpu.product` gets `-SHARED` when R > 1, `nvidia.com/gpu.replicas` is R per GPU,
`nvidia.com/gpu.count` counts physical GPUs, `nvidia.com/gpu.memory` is in MiB, and the
allocatable `nvidia.com/gpu` is G x R. Run `python tests/data/make_nodes.py` to regenerate.
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


def main() -> None:
    out = Path(__file__).parent / "nodes"
    out.mkdir(exist_ok=True)
    for sharing, replicas in CONFIGS:
        for gpus in GPUS:
            obj = node(sharing, replicas, gpus)
            (out / f"{obj['metadata']['name']}.yaml").write_text(yaml.safe_dump(obj, sort_keys=False))


if __name__ == "__main__":
    main()
