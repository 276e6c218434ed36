"""Checks the CRD schema cannot express, and the choice of a GPU node (pure).

Each problem names the field and the fix, so the InvalidSpec condition and its Event
tell the user what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from slmpack.api.models import Placement, SLMDeploymentSpec

PRODUCT = "nvidia.com/gpu.product"
MEMORY = "nvidia.com/gpu.memory"
REPLICAS = "nvidia.com/gpu.replicas"
SHARING_STRATEGY = "nvidia.com/gpu.sharing-strategy"
COUNT = "nvidia.com/gpu.count"
# Node Feature Discovery labels each CPUID feature of the node's CPU, e.g. ...cpu-cpuid.AVX512BF16=true.
CPUID_LABEL_PREFIX = "feature.node.kubernetes.io/cpu-cpuid."
SHARED_SUFFIX = "-SHARED"


def product_labels(product: str) -> list[str]:
    """The values GFD may give `nvidia.com/gpu.product` for this product: as is, and with `-SHARED`,
    which it appends when the device plugin shares the GPU (replicas > 1) without renaming the
    resource (NVIDIA/k8s-device-plugin internal/lm/resource.go, productLabel)."""
    base = product.removesuffix(SHARED_SUFFIX)
    return [base, base + SHARED_SUFFIX]


@dataclass(frozen=True)
class GPUNode:
    """What the operator needs to know of a node: its labels and the GPU resources it can allocate."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    allocatable: dict[str, int] = field(default_factory=dict)  # whole units, e.g. {"nvidia.com/gpu": 4}

    def label_int(self, key: str) -> int | None:
        value = self.labels.get(key, "")
        return int(value) if value.isdigit() else None

    @property
    def cpu_flags(self) -> set[str]:
        """The CPU's features as Node Feature Discovery labels them; empty without NFD."""
        return {key.removeprefix(CPUID_LABEL_PREFIX) for key, value in self.labels.items()
                if key.startswith(CPUID_LABEL_PREFIX) and value == "true"}

    @property
    def gpu_memory_mib(self) -> int | None:
        return self.label_int(MEMORY)

    @property
    def sharing_slots(self) -> int:
        return self.label_int(REPLICAS) or 1

    @property
    def sharing_strategy(self) -> str:
        """none, time-slicing or mps, as GFD labels it; none when unlabelled."""
        return self.labels.get(SHARING_STRATEGY, "none")

    @property
    def gpu_count(self) -> int | None:
        """Physical GPUs on the node (nvidia.com/gpu.count), when labelled."""
        return self.label_int(COUNT)


class InvalidSpec(ValueError):
    """The spec cannot be served as written; the message names the field and the fix."""


class NoMatchingNode(InvalidSpec):
    """No node offers what the spec asks for yet: a node may join or be labelled later."""


def parse_spec(raw: dict) -> SLMDeploymentSpec:
    """Parse a spec from the API, turning pydantic's errors into one message per field."""
    try:
        return SLMDeploymentSpec.model_validate(raw)
    except ValidationError as error:
        problems = ["spec." + ".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in error.errors()]
        raise InvalidSpec("; ".join(problems)) from None


def spec_problems(spec: SLMDeploymentSpec) -> list[str]:
    """Cross-field rules."""
    problems = []
    policy = spec.profiling
    if policy.min_batch_size > policy.max_batch_size:
        problems.append(f"spec.profiling.minBatchSize ({policy.min_batch_size}) is larger than maxBatchSize "
                        f"({policy.max_batch_size}): lower minBatchSize or raise maxBatchSize")
    if policy.min_repeats > policy.max_repeats:
        problems.append(f"spec.profiling.minRepeats ({policy.min_repeats}) is larger than maxRepeats "
                        f"({policy.max_repeats}): lower minRepeats or raise maxRepeats")
    repeated = sorted({b for b in policy.batch_sizes if policy.batch_sizes.count(b) > 1})
    if repeated:
        problems.append(f"spec.profiling.batchSizes lists {repeated} more than once: list each batch size once")
    volume = spec.model.volume
    if volume is not None and bool(volume.host_path) == bool(volume.persistent_volume_claim):
        problems.append("spec.model.volume needs exactly one of hostPath or persistentVolumeClaim")
    if volume is not None and not spec.model.name.startswith(volume.mount_path.rstrip("/") + "/"):
        problems.append(f"spec.model.name must be a path under spec.model.volume.mountPath ({volume.mount_path}) "
                        "when a volume holds the model")
    needed = spec.model.max_model_len
    shape = policy.workload.input_tokens + policy.workload.output_tokens
    if shape > needed:
        problems.append(f"spec.profiling.workload needs {shape} tokens per request, more than "
                        f"spec.model.maxModelLen ({needed}): raise maxModelLen or shorten the workload")
    scaling = spec.autoscaling
    if scaling is not None and scaling.min_packs > scaling.max_packs:
        problems.append(f"spec.autoscaling.minPacks ({scaling.min_packs}) is larger than maxPacks "
                        f"({scaling.max_packs}): lower minPacks or raise maxPacks")
    if spec.placement == Placement.dra and spec.gpu.resource_name != "nvidia.com/gpu":
        problems.append("spec.gpu.resourceName applies to device-plugin placement only: remove it with placement dra")
    return problems


def node_matches(spec: SLMDeploymentSpec, node: GPUNode) -> bool:
    if spec.gpu.product and node.labels.get(PRODUCT) not in product_labels(spec.gpu.product):
        return False
    if any(node.labels.get(k) != v for k, v in spec.gpu.node_selector.items()):
        return False
    if spec.placement == Placement.device_plugin:
        if node.allocatable.get(spec.gpu.resource_name, 0) < 1:
            return False
        strategy = node.labels.get(SHARING_STRATEGY)
        if strategy is not None and strategy not in (spec.sharing.value, "none"):
            return False
    return True


def choose_node(spec: SLMDeploymentSpec, nodes: list[GPUNode]) -> GPUNode:
    """The node to pack on: it matches the GPU selector, has one GPU if any such node does, and
    then the most sharing slots.

    On a node with one GPU (nvidia.com/gpu.count=1) the device plugin can only give the pack's
    pods slots of that GPU; with several, it spreads them (its default `distributed` policy),
    so the pack may split, which the operator then reports.

    Raises InvalidSpec naming what no node offers.
    """
    matching = [n for n in nodes if node_matches(spec, n)]
    if not matching:
        wanted = [f"{spec.gpu.resource_name} allocatable" if spec.placement == Placement.device_plugin else "a GPU"]
        if spec.gpu.product:
            wanted.append(f"{PRODUCT} in ({', '.join(product_labels(spec.gpu.product))})")
        wanted += [f"{k}={v}" for k, v in spec.gpu.node_selector.items()]
        if spec.placement == Placement.device_plugin:
            wanted.append(f"{SHARING_STRATEGY}={spec.sharing.value}")
        hint = ""
        others = sorted({r for n in nodes for r in n.allocatable
                         if r.startswith("nvidia.com/gpu") and r != spec.gpu.resource_name})
        if spec.placement == Placement.device_plugin and others:
            hint = f" (nodes advertise {', '.join(others)}: set spec.gpu.resourceName to it if the plugin renames " \
                   "shared GPUs)"
        raise NoMatchingNode("spec.gpu: no node offers " + ", ".join(wanted) +
                             ": fix spec.gpu.product / spec.gpu.nodeSelector / spec.sharing, or add such a node" + hint)
    node = max(matching, key=lambda n: (n.gpu_count == 1, n.sharing_slots, n.name))
    if spec.replicas != "auto" and spec.placement == Placement.device_plugin and spec.replicas > node.sharing_slots:
        shared = "does not share its GPUs" if node.sharing_strategy == "none" else \
            f"shares each GPU {node.sharing_slots} ways by {node.sharing_strategy}"
        raise InvalidSpec(f"spec.replicas ({spec.replicas}) exceeds the {node.sharing_slots} sharing slots "
                          f"({REPLICAS}) of node {node.name}, which {shared}: lower spec.replicas or raise the "
                          "device plugin's replicas, since one pack shares one GPU")
    return node
