"""How long the operator takes to find its GPU among the DRA driver's ResourceSlices.

    python3 benchmarks/dra_selectors.py [--nodes 125] [--gpus-per-node 8] [--kinds 1]

Each decision on a DRA deployment evaluates its CEL selectors (cel-python) against the devices the
driver publishes (tests/data/dra/h100-node.yaml's full GPU, copied per node and GPU, with distinct
UUIDs and bus IDs; `--kinds` makes that many distinct driver versions, as on a cluster mid-upgrade).
It prints the time of `choose_device` (median of 5) and of one selector evaluation.
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import yaml

from slmpack.api.models import SLMDeploymentSpec
from slmpack.core.dra import DEVICE_CLASS_SELECTOR, choose_device, devices_from_slices, selects

ROOT = Path(__file__).resolve().parents[1]


def cluster_slices(nodes: int, gpus: int, kinds: int) -> list[dict]:
    template = yaml.safe_load((ROOT / "tests" / "data" / "dra" / "h100-node.yaml").read_text())
    gpu = template["spec"]["devices"][0]
    slices = []
    for n in range(nodes):
        slice_ = copy.deepcopy(template)
        slice_["metadata"]["name"] = f"node-{n}-gpu.nvidia.com"
        slice_["spec"].update(nodeName=f"node-{n}", pool={"name": f"node-{n}", "generation": 1,
                                                           "resourceSliceCount": 1})
        devices = []
        for i in range(gpus):
            device = copy.deepcopy(gpu)
            device["name"] = f"gpu-{i}"
            device["attributes"]["uuid"] = {"string": f"GPU-{n:08x}-0000-0000-0000-{i:012x}"}
            device["attributes"]["resource.kubernetes.io/pciBusID"] = {"string": f"0000:{i:02x}:00.0"}
            device["attributes"]["driverVersion"] = {"version": f"570.{n % kinds}.0"}
            devices.append(device)
        slice_["spec"]["devices"] = devices
        slices.append(slice_)
    return slices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=125)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--kinds", type=int, default=1)
    args = parser.parse_args()
    slices = cluster_slices(args.nodes, args.gpus_per_node, args.kinds)
    spec = SLMDeploymentSpec.model_validate({"model": {"name": "m"}, "placement": "dra",
                                             "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}})
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        target = choose_device(spec, ["resource.k8s.io/v1"], slices)
        runs.append(time.perf_counter() - started)
    device = devices_from_slices(slices[:1])[0]
    started = time.perf_counter()
    for _ in range(100):
        selects(DEVICE_CLASS_SELECTOR, device)
    one = (time.perf_counter() - started) / 100
    print(f"devices: {args.nodes * args.gpus_per_node} ({args.kinds} kind(s)), matching: {target.candidates}")
    print(f"choose_device: median {statistics.median(runs) * 1000:.0f} ms, worst {max(runs) * 1000:.0f} ms")
    print(f"one selector evaluation: {one * 1000:.2f} ms")


if __name__ == "__main__":
    main()
