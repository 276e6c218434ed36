"""Checks the CRD schema cannot express, and the choice of a GPU node (pure).

Each problem names the field and the fix, so the InvalidSpec condition and its Event
tell the user what to change. Host paths are checked against what the cluster admin allows
(`HostPathPolicy`), since a node directory reaches past every tenant's namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from slmpack.api.models import Placement, SLMDeploymentSpec, Toleration
from slmpack.core.scheduling import tolerations

PRODUCT = "nvidia.com/gpu.product"
MEMORY = "nvidia.com/gpu.memory"
REPLICAS = "nvidia.com/gpu.replicas"
SHARING_STRATEGY = "nvidia.com/gpu.sharing-strategy"
COUNT = "nvidia.com/gpu.count"
# Node Feature Discovery labels each CPUID feature of the node's CPU, e.g. ...cpu-cpuid.AVX512BF16=true.
CPUID_LABEL_PREFIX = "feature.node.kubernetes.io/cpu-cpuid."
SHARED_SUFFIX = "-SHARED"
# vLLM refuses requests to /v1 without this key as a bearer token, taken from its argument or its env
# (vllm/entrypoints/serve/middleware/register.py); /health and /metrics stay open.
API_KEY_ARG = "--api-key"
API_KEY_ENV = "VLLM_API_KEY"
# Engine arguments whose value is a secret: extraArgs are part of the profile's key and spec, and of Events.
SECRET_ARGS = {API_KEY_ARG: "put the key in a Secret and name it in spec.apiKeySecretRef",
               "--hf-token": "put the token in a Secret and set HF_TOKEN from it in spec.engine.env (valueFrom)"}


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
    taints: list[dict] = field(default_factory=list)  # spec.taints, as the API shows them

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


def path_parts(path: str) -> tuple[str, ...] | None:
    """The components of an absolute path, or None when it has `.` or `..`: the node resolves those after
    following symlinks, so no prefix check on the text can say where they lead."""
    parts = tuple(part for part in path.split("/") if part)
    return None if {".", ".."} & set(parts) else parts


def within(path: tuple[str, ...], prefix: tuple[str, ...]) -> bool:
    """Whether `path` is `prefix` or below it, component by component: /data/models-evil is not under /data/models."""
    return path[:len(prefix)] == prefix


@dataclass(frozen=True)
class HostPathPolicy:
    """The node directories the cluster admin lets SLMDeployments mount; none by default.

    `model_prefixes` (the chart's `hostPaths.modelPrefixes`): directories whose subtrees any
    deployment may mount read-only as its model. `engine_cache` (the chart's
    `exporter.engineCacheHostPath`): the one node directory allowed as `spec.engine.cache.hostPath`,
    exactly, since each namespace writes its own subdirectory of it: a cache below it would be
    another namespace's directory.
    """

    model_prefixes: tuple[str, ...] = ()
    engine_cache: str | None = None

    def __post_init__(self) -> None:
        for path in (*self.model_prefixes, *filter(None, [self.engine_cache])):
            if not path.startswith("/") or path_parts(path) is None:
                raise ValueError(f"allowed host path {path!r} must be absolute, without . or .. components")
        cache = path_parts(self.engine_cache) if self.engine_cache else None
        for prefix in self.model_prefixes:
            if cache is not None and (within(cache, path_parts(prefix)) or within(path_parts(prefix), cache)):
                # Engines write symlinks into the cache; a model volume there would follow them anywhere.
                raise ValueError(f"model host path prefix {prefix} overlaps the engine cache {self.engine_cache}, "
                                 "which every engine may write: keep models apart from it")

    @classmethod
    def from_settings(cls, model_prefixes: str, engine_cache: str) -> HostPathPolicy:
        """From the operator's settings: prefixes separated by `:` as in PATH, and one directory; empty is none."""
        return cls(tuple(p for p in model_prefixes.split(":") if p), engine_cache or None)


NO_HOST_PATHS = HostPathPolicy()


def host_path_problems(spec: SLMDeploymentSpec, allowed: HostPathPolicy) -> list[str]:
    """The spec's host paths that the cluster admin does not allow, each with the fix."""
    problems = []
    volume = spec.model.volume
    if volume is not None and volume.host_path:
        parts = path_parts(volume.host_path)
        listed = ", ".join(allowed.model_prefixes) or "none"
        if parts is None:
            problems.append(f"spec.model.volume.hostPath ({volume.host_path}) has . or .. components: "
                            "write the directory without them")
        elif not any(within(parts, path_parts(prefix)) for prefix in allowed.model_prefixes):
            problems.append(f"spec.model.volume.hostPath ({volume.host_path}) is not under a node directory the "
                            f"cluster admin allows for models ({listed}): use spec.model.volume.persistentVolumeClaim, "
                            "or have the admin add the directory to the chart's hostPaths.modelPrefixes")
    cache = spec.engine.cache
    if cache is not None and cache.host_path:
        parts = path_parts(cache.host_path)
        if allowed.engine_cache is None or parts != path_parts(allowed.engine_cache):
            node_cache = allowed.engine_cache or "none is set"
            problems.append(f"spec.engine.cache.hostPath ({cache.host_path}) is not the node engine cache the "
                            f"cluster admin allows ({node_cache}): use that directory or "
                            "spec.engine.cache.persistentVolumeClaim, or have the admin set the chart's "
                            "exporter.engineCacheHostPath")
    return problems


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
    if spec.placement == Placement.pack_pod and spec.routing.mode != "router":
        problems.append(f"spec.routing.mode {spec.routing.mode} cannot reach the engines of placement pack-pod, which "
                        "listen on one port each in one pod: use spec.routing.mode router")
    if spec.routing.mode == "inferencePool" and spec.routing.endpoint_picker_ref is None:
        problems.append("spec.routing.mode inferencePool needs spec.routing.endpointPickerRef: name the endpoint "
                        "picker's Service")
    problems += secret_problems(spec)
    return problems


def secret_problems(spec: SLMDeploymentSpec) -> list[str]:
    """Where a secret would leak: an --api-key argument is part of the profile's key and shows in its
    spec and in Events."""
    problems = []
    args = spec.engine.extra_args
    for i, arg in enumerate(args):
        name, equals, _ = arg.partition("=")
        valued = equals or (i + 1 < len(args) and not args[i + 1].startswith("-"))
        if name in SECRET_ARGS and (valued or name == API_KEY_ARG):
            problems.append(f"spec.engine.extraArgs: an {name} there is stored in the SLMProfile and shown in "
                            f"Events: {SECRET_ARGS[name]}")
    for env in spec.engine.env:
        if env.value_from is not None and env.value_from.sources() != 1:
            problems.append(f"spec.engine.env {env.name}: valueFrom needs exactly one of secretKeyRef, "
                            "configMapKeyRef, fieldRef or resourceFieldRef")
        if env.value_from is not None and env.value:
            problems.append(f"spec.engine.env {env.name}: an env entry takes value or valueFrom, not both")
    if spec.api_key_secret_ref is not None and any(e.name == API_KEY_ENV for e in spec.engine.env):
        problems.append(f"spec.engine.env sets {API_KEY_ENV}, which spec.apiKeySecretRef sets: remove it from env")
    return problems


def untolerated_taints(spec: SLMDeploymentSpec, node: GPUNode) -> list[dict]:
    """The node's taints that keep the spec's pods off it (NoSchedule, NoExecute), given the tolerations they get."""
    given = [Toleration.model_validate(t) for t in tolerations(spec)]
    return [t for t in node.taints if t.get("effect") in ("NoSchedule", "NoExecute")
            and not any(g.tolerates(t) for g in given)]


def node_matches(spec: SLMDeploymentSpec, node: GPUNode) -> bool:
    if untolerated_taints(spec, node):
        return False
    if spec.gpu.product and node.labels.get(PRODUCT) not in product_labels(spec.gpu.product):
        return False
    if any(node.labels.get(k) != v for k, v in spec.gpu.node_selector.items()):
        return False
    if spec.placement in (Placement.device_plugin, Placement.pack_pod):
        if node.allocatable.get(spec.gpu.resource_name, 0) < 1:
            return False
        strategy = node.labels.get(SHARING_STRATEGY)
        # A pack pod needs a whole GPU: on a node whose plugin shares, one nvidia.com/gpu is a slot.
        allowed = ("none",) if spec.placement == Placement.pack_pod else (spec.sharing.value, "none")
        if strategy is not None and strategy not in allowed:
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
        plugin = spec.placement in (Placement.device_plugin, Placement.pack_pod)
        wanted = [f"{spec.gpu.resource_name} allocatable" if plugin else "a GPU"]
        if spec.gpu.product:
            wanted.append(f"{PRODUCT} in ({', '.join(product_labels(spec.gpu.product))})")
        wanted += [f"{k}={v}" for k, v in spec.gpu.node_selector.items()]
        if spec.placement == Placement.device_plugin:
            wanted.append(f"{SHARING_STRATEGY}={spec.sharing.value}")
        if spec.placement == Placement.pack_pod:
            wanted.append(f"{SHARING_STRATEGY}=none (a whole GPU per pack pod)")
        hint = ""
        tainted = sorted({f"{t.get('key')}:{t.get('effect')}" for n in nodes for t in untolerated_taints(spec, n)})
        if tainted:
            hint += f" (some nodes are tainted {', '.join(tainted)}: add spec.scheduling.tolerations for them)"
        others = sorted({r for n in nodes for r in n.allocatable
                         if r.startswith("nvidia.com/gpu") and r != spec.gpu.resource_name})
        if plugin and others:
            hint += f" (nodes advertise {', '.join(others)}: set spec.gpu.resourceName to it if the plugin renames " \
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
