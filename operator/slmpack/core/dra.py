"""DRA placement with NVIDIA's DRA driver for GPUs (pure).

- One ResourceClaim per pack, named by every replica pod, so all replicas get the same
  physical GPU; the driver sets up MPS or time-slicing for it from the claim's GpuConfig.
- A claim's spec is immutable, so a claim is named by a hash of its config: a new plan
  gets a new claim, the StatefulSet rolls its pods over to it, and the old claim is
  deleted once no pod uses it.
- The profiling Job gets its GPU through its own ResourceClaimTemplate, with the same
  sharing strategy the pack will get.
- Objects are written in the newest `resource.k8s.io` version the cluster serves.
- Device selectors are CEL, evaluated here with cel-python against devices shaped as the
  scheduler gives them (attributes and capacity keyed by domain, capacity as quantities,
  versions as semvers), so the operator can find matching GPUs in the ResourceSlices and
  reject a selector that does not compile before it reaches a cluster.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache, total_ordering

import celpy
from celpy import celtypes
from packaging.version import InvalidVersion, Version

from slmpack.api.models import Plan, Sharing, SLMDeploymentSpec
from slmpack.core.gpu_assignments import dra_device_id
from slmpack.core.manifests import Owner, dns_name, engine_labels
from slmpack.core.validation import MEMORY, GPUNode, InvalidSpec, NoMatchingNode

GROUP = "resource.k8s.io"
# Newest first: v1 is GA from Kubernetes 1.34, v1beta2 came with 1.33, v1beta1 with 1.32.
VERSIONS = ("v1", "v1beta2", "v1beta1")
DRIVER = "gpu.nvidia.com"
DEVICE_CLASS = "gpu.nvidia.com"
GPU_CONFIG_API = "resource.nvidia.com/v1beta1"
REQUEST = "gpu"
# The driver's own DeviceClass selector for full GPUs; MIG devices have type "mig".
DEVICE_CLASS_SELECTOR = f"device.driver == '{DRIVER}' && device.attributes['{DRIVER}'].type == 'gpu'"
MIB = 1024 * 1024


class InvalidSelector(InvalidSpec):
    """A CEL device selector that does not compile or does not yield a bool."""


class DraUnavailable(Exception):
    """The cluster cannot take a DRA claim yet (no resource.k8s.io version, no driver): `reason` is the
    condition's reason, the message says what to turn on."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- API versions


def newest_served(api_versions: Iterable[str]) -> str | None:
    """The newest resource.k8s.io version among the served `group/version` strings, e.g. resource.k8s.io/v1."""
    served = set(api_versions)
    return next((f"{GROUP}/{v}" for v in VERSIONS if f"{GROUP}/{v}" in served), None)


# ---------------------------------------------------------------- quantities and versions in CEL


QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
                      r"([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
SUFFIXES = {None: 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
            "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


@total_ordering
class _Ordered(celtypes.StringType):
    """A value written as a string that the scheduler's CEL compares by what it means (`key`)."""

    key: object

    def __eq__(self, other):
        return type(other) is type(self) and self.key == other.key

    def __lt__(self, other):
        return self.key < other.key

    def __hash__(self):
        return hash(self.key)


class Quantity(_Ordered):
    """A Kubernetes quantity (`81559Mi`, `40Gi`, `1.5`), as the CEL `quantity` library sees it."""

    def __new__(cls, text: str):
        match = QUANTITY.match(str(text).strip())
        if not match:
            raise ValueError(f"{text!r} is not a Kubernetes quantity")
        self = super().__new__(cls, str(text).strip())
        number, suffix = match.groups()
        scale = Decimal(10) ** int(suffix[1:]) if suffix and suffix[0] in "eE" else Decimal(SUFFIXES[suffix])
        self.amount = self.key = Decimal(number) * scale
        return self


class Semver(_Ordered):
    """A version attribute (`570.133.20`), as the CEL `semver` library sees it."""

    def __new__(cls, text: str):
        self = super().__new__(cls, str(text))
        try:
            self.key = Version(str(text))
        except InvalidVersion as error:
            raise ValueError(f"{text!r} is not a semantic version") from error
        return self


def _compare(a, b) -> celtypes.IntType:
    if type(a) is not type(b) or not isinstance(a, Quantity | Semver):
        raise TypeError(f"compareTo needs two quantities or two semvers, got {type(a).__name__}, {type(b).__name__}")
    return celtypes.IntType(0 if a == b else (-1 if a < b else 1))


# The subset of the Kubernetes CEL libraries (quantity, semver, strings) a device selector may use.
KUBERNETES_FUNCTIONS = {
    "quantity": Quantity,
    "semver": Semver,
    "compareTo": _compare,
    "isGreaterThan": lambda a, b: celtypes.BoolType(_compare(a, b) > 0),
    "isLessThan": lambda a, b: celtypes.BoolType(_compare(a, b) < 0),
    "asInteger": lambda q: celtypes.IntType(int(q.amount)),
    "lowerAscii": lambda s: celtypes.StringType(s.lower()),
    "upperAscii": lambda s: celtypes.StringType(s.upper()),
}


@cache
def compile_selector(expression: str):
    """A runnable CEL program, or InvalidSelector naming what is wrong."""
    environment = celpy.Environment()
    try:
        return environment.program(environment.compile(expression), functions=KUBERNETES_FUNCTIONS)
    except celpy.CELParseError as error:
        raise InvalidSelector(f"CEL selector {expression!r} does not compile: {error.args[0]}") from None


# ---------------------------------------------------------------- devices from ResourceSlices


@dataclass(frozen=True)
class DraDevice:
    """One device of a ResourceSlice, as the scheduler shows it to a CEL selector."""

    node: str | None
    pool: str
    name: str
    driver: str
    attributes: dict[str, dict[str, object]] = field(default_factory=dict)  # domain -> name -> value
    capacity: dict[str, dict[str, Quantity]] = field(default_factory=dict)  # domain -> name -> quantity

    def attribute(self, name: str):
        return self.attributes.get(self.driver, {}).get(name)

    @property
    def memory_mib(self) -> int | None:
        memory = self.capacity.get(self.driver, {}).get("memory")
        return int(memory.amount // MIB) if memory is not None else None

    def cel(self) -> celtypes.MapType:
        def domains(values: dict[str, dict[str, object]]) -> celtypes.MapType:
            return celtypes.MapType({celtypes.StringType(d): celtypes.MapType(
                {celtypes.StringType(k): _cel_value(v) for k, v in names.items()}) for d, names in values.items()})
        return celtypes.MapType({celtypes.StringType("driver"): celtypes.StringType(self.driver),
                                 celtypes.StringType("attributes"): domains(self.attributes),
                                 celtypes.StringType("capacity"): domains(self.capacity)})


def _cel_value(value):
    if isinstance(value, Quantity | Semver):
        return value
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, list):
        return celtypes.ListType([_cel_value(v) for v in value])
    return celtypes.StringType(value)


def _split_name(qualified: str, driver: str) -> tuple[str, str]:
    """`domain/name` or a bare name, which belongs to the driver's domain."""
    domain, _, name = qualified.rpartition("/")
    return (domain or driver), name


def _attribute_value(wire: dict):
    for key, convert in (("string", str), ("int", int), ("bool", bool), ("version", Semver),
                         ("strings", list), ("ints", list), ("bools", list), ("versions", list)):
        if key in wire:
            return convert(wire[key])
    return None


def devices_from_slices(slices: Iterable[dict]) -> list[DraDevice]:
    """Every device the slices publish; v1 and v1beta2 devices are flat, v1beta1 ones sit under `basic`."""
    devices = []
    for slice_ in slices:
        spec = slice_.get("spec") or {}
        driver = spec.get("driver", "")
        for wire in spec.get("devices") or []:
            body = wire.get("basic", wire)
            attributes: dict[str, dict[str, object]] = {}
            for qualified, value in (body.get("attributes") or {}).items():
                domain, name = _split_name(qualified, driver)
                attributes.setdefault(domain, {})[name] = _attribute_value(value)
            capacity: dict[str, dict[str, Quantity]] = {}
            for qualified, value in (body.get("capacity") or {}).items():
                domain, name = _split_name(qualified, driver)
                # Every version slmpack reads (v1beta1 from 1.32, v1beta2, v1) wraps it in DeviceCapacity
                # {value}; only v1alpha3 of 1.31 wrote a bare quantity, which is still read.
                capacity.setdefault(domain, {})[name] = Quantity(value["value"] if isinstance(value, dict) else value)
            devices.append(DraDevice(node=spec.get("nodeName"), pool=(spec.get("pool") or {}).get("name", ""),
                                     name=wire["name"], driver=driver, attributes=attributes, capacity=capacity))
    return devices


def resolve_gpu_ids(ids: Iterable[str], devices: Iterable[DraDevice]) -> tuple[str, ...]:
    """GPU IDs as the exporters publish them, with each DRA device (`dra:<driver>/<pool>/<device>`) replaced by
    the UUID its ResourceSlice gives it; one not found in the slices stays as it is."""
    uuids = {dra_device_id(d.driver, d.pool, d.name): d.attribute("uuid") for d in devices}
    return tuple(sorted({uuids.get(i) or i for i in ids}))


def selects(expression: str, device: DraDevice) -> bool:
    """Whether the selector matches the device.

    A CEL runtime error (a missing attribute or capacity, say) does not skip the device: the scheduler
    aborts the claim's whole allocation ("claim %s: selector #%d: CEL runtime error", kubernetes
    staging/src/k8s.io/dynamic-resource-allocation/structured/allocator.go), so it is InvalidSelector
    here too. Selectors guard optional fields with `in` (`device_selectors`).
    """
    try:
        result = compile_selector(expression).evaluate({"device": device.cel()})
    except celpy.CELEvalError as error:
        raise InvalidSelector(f"CEL selector {expression!r} fails on device {device.pool}/{device.name} "
                              f"({error.args[0]}): the scheduler would abort the claim's allocation") from None
    return isinstance(result, celtypes.BoolType) and bool(result)


# What tells otherwise identical devices apart.
IDENTITY_ATTRIBUTES = ("uuid", "parentUUID", "pciBusID", "pcieRoot")


def _kind(device: DraDevice) -> str:
    """The device without its identity: GPUs of one model on one driver version share it."""
    attributes = {domain: {k: v for k, v in names.items() if k not in IDENTITY_ATTRIBUTES}
                  for domain, names in device.attributes.items()}
    return json.dumps([device.driver, attributes, device.capacity], sort_keys=True, default=str)


def matching_devices(selectors: Iterable[str], devices: Iterable[DraDevice]) -> list[DraDevice]:
    """The devices the driver's DeviceClass and every selector accept.

    cel-python takes milliseconds per evaluation, so unless a selector reads an identity attribute each kind
    of device is evaluated once (a cluster of 1000 identical GPUs: one evaluation, not 1000).
    """
    expressions = [DEVICE_CLASS_SELECTOR, *selectors]
    by_kind = not any(name in e for e in expressions for name in IDENTITY_ATTRIBUTES)
    verdicts: dict[str, bool] = {}
    matching = []
    for device in devices:
        key = _kind(device) if by_kind else f"{device.pool}/{device.name}"
        if key not in verdicts:
            verdicts[key] = all(selects(e, device) for e in expressions)
        if verdicts[key]:
            matching.append(device)
    return matching


# A full GPU as the driver publishes it (cmd/gpu-kubelet-plugin/deviceinfo.go), to try selectors on.
SAMPLE_GPU = DraDevice(
    node="node", pool="node", name="gpu-0", driver=DRIVER,
    attributes={DRIVER: {"type": "gpu", "uuid": "GPU-00000000-0000-0000-0000-000000000000",
                         "productName": "NVIDIA H100 80GB HBM3", "brand": "Nvidia", "architecture": "Hopper",
                         "cudaComputeCapability": Semver("9.0.0"), "driverVersion": Semver("570.133.20"),
                         "cudaDriverVersion": Semver("12.8.0")},
                "resource.kubernetes.io": {"pciBusID": "0000:3b:00.0", "pcieRoot": "pci0000:3a"}},
    capacity={DRIVER: {"memory": Quantity("81559Mi")}},
)


def check_selector(expression: str) -> None:
    """Raise InvalidSelector unless the expression compiles and yields a bool on a full GPU."""
    program = compile_selector(expression)
    try:
        result = program.evaluate({"device": SAMPLE_GPU.cel()})
    except celpy.CELEvalError as error:
        raise InvalidSelector(f"CEL selector {expression!r} fails on a GPU of the NVIDIA driver: "
                              f"{error.args[0]}") from None
    if not isinstance(result, celtypes.BoolType):
        raise InvalidSelector(f"CEL selector {expression!r} yields {type(result).__name__}, not a bool")


# ---------------------------------------------------------------- selectors and sharing


def gfd_product(product: str) -> str:
    """The product as written in spec.gpu.product, without the `-SHARED` GFD appends on shared GPUs."""
    return product.removesuffix("-SHARED")


def _cel_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def product_selector(product: str) -> str:
    """Match the driver's productName (NVML's name, `NVIDIA H100 80GB HBM3`) from the name as GPU feature
    discovery labels it (`NVIDIA-H100-80GB-HBM3`): GFD turned each space into a dash, so each dash
    matches either."""
    pattern = "^" + "[ -]".join(re.escape(part) for part in product.split("-")) + "$"
    domain = _cel_string(DRIVER)
    # Every full GPU carries productName (cmd/gpu-kubelet-plugin/deviceinfo.go); guarded all the same, since a
    # device without it would abort the allocation rather than be skipped (`selects`).
    return (f"'productName' in device.attributes[{domain}] && "
            f"device.attributes[{domain}].productName.matches({_cel_string(pattern)})")


def memory_selector(min_memory_mib: int) -> str:
    """At least this much memory. The driver leaves the `memory` capacity out where NVML answers
    NOT_SUPPORTED (kubernetes-sigs/dra-driver-nvidia-gpu cmd/gpu-kubelet-plugin/nvlib.go), and reading an
    absent key is a runtime error that aborts the allocation, so the selector asks first: such a GPU does
    not match (its memory cannot be known to hold the plan)."""
    domain = _cel_string(DRIVER)
    return (f"{domain} in device.capacity && 'memory' in device.capacity[{domain}] && "
            f"device.capacity[{domain}].memory.compareTo(quantity('{min_memory_mib}Mi')) >= 0")


def device_selectors(spec: SLMDeploymentSpec, min_memory_mib: int | None = None) -> list[str]:
    """The CEL selectors of a claim: a full GPU (never a MIG device), of the product asked for, with memory for
    the plan."""
    selectors = [f"device.attributes[{_cel_string(DRIVER)}].type == 'gpu'"]
    if spec.gpu.product:
        selectors.append(product_selector(gfd_product(spec.gpu.product)))
    if min_memory_mib:
        selectors.append(memory_selector(min_memory_mib))
    return selectors


def plan_memory_mib(plan: Plan) -> int | None:
    """What the plan's replicas need of the GPU together."""
    return plan.memory_per_replica_mib * plan.replicas if plan.memory_per_replica_mib else None


def gpu_config(sharing: Sharing, plan: Plan | None) -> dict:
    """The driver's GpuConfig; MPS limits come from the plan (without one, as for profiling, none are set)."""
    if sharing == Sharing.mps:
        mps = {}
        if plan is not None and plan.mps_active_thread_percentage is not None:
            mps["defaultActiveThreadPercentage"] = plan.mps_active_thread_percentage
        if plan is not None and plan.mps_pinned_memory_limit_mib:
            mps["defaultPinnedDeviceMemoryLimit"] = f"{plan.mps_pinned_memory_limit_mib}Mi"
        shared = {"strategy": "MPS", "mpsConfig": mps}
    else:
        shared = {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Default"}}
    return {"apiVersion": GPU_CONFIG_API, "kind": "GpuConfig", "sharing": shared}


# ---------------------------------------------------------------- the GPU a pack is planned for


@dataclass(frozen=True)
class DraTarget:
    """Where a DRA pack goes: the API version to write and the device the plan is sized for."""

    api_version: str
    device: DraDevice
    candidates: int  # how many published full GPUs match

    def node(self) -> GPUNode:
        """The device as the planner sees a GPU node: its memory, and no device-plugin sharing slots."""
        memory = self.device.memory_mib
        return GPUNode(name=self.device.node or self.device.pool, labels={MEMORY: str(memory)} if memory else {})


def choose_device(spec: SLMDeploymentSpec, api_versions: Iterable[str], slices: Iterable[dict]) -> DraTarget:
    """The newest served API version and, among the driver's full GPUs that match the spec, the one with the
    least memory, so that the plan fits whichever of them the scheduler allocates.

    Raises DraUnavailable when the cluster serves no version or publishes no device of the driver,
    NoMatchingNode when no published GPU matches, and InvalidSelector when a selector does not compile or
    fails on a published device.
    """
    api_version = newest_served(api_versions)
    if api_version is None:
        raise DraUnavailable("DRANotServed", "the cluster serves no resource.k8s.io version slmpack writes "
                             f"({', '.join(VERSIONS)}): DRA needs Kubernetes 1.32 or later with the "
                             "DynamicResourceAllocation feature gate (on by default from 1.34); "
                             "turn it on or use placement device-plugin")
    devices = [d for d in devices_from_slices(slices) if d.driver == DRIVER]
    if not devices:
        raise DraUnavailable("NoDRADriver", f"no ResourceSlice of driver {DRIVER} exists: install NVIDIA's DRA "
                             "driver for GPUs with gpuResourcesEnabledOverride=true on the GPU nodes")
    selectors = device_selectors(spec)
    for expression in selectors:
        check_selector(expression)
    matching = matching_devices(selectors, devices)
    if not matching:
        published = sorted({str(d.attribute("productName")) for d in devices if d.attribute("type") == "gpu"})
        raise NoMatchingNode(f"spec.gpu.product: no full GPU that {DRIVER} publishes matches {spec.gpu.product} "
                             f"(published: {', '.join(published) or 'MIG devices only'}): fix spec.gpu.product "
                             "or add such a GPU")
    device = min(matching, key=lambda d: (d.memory_mib or 0, d.node or "", d.name))
    return DraTarget(api_version=api_version, device=device, candidates=len(matching))


# ---------------------------------------------------------------- claims


def claim_spec(api_version: str, selectors: list[str], config: dict) -> dict:
    """A ResourceClaimSpec for one GPU in the wire format of `api_version`."""
    request = {"deviceClassName": DEVICE_CLASS, "allocationMode": "ExactCount", "count": 1,
               "selectors": [{"cel": {"expression": e}} for e in selectors]}
    if api_version.endswith("/v1beta1"):
        request = {"name": REQUEST, **request}
    else:
        # v1beta2 and v1 moved the single-device request under `exactly`.
        request = {"name": REQUEST, "exactly": request}
    return {"devices": {"requests": [request],
                        "config": [{"requests": [REQUEST], "opaque": {"driver": DRIVER, "parameters": config}}]}}


def config_hash(selectors: list[str], config: dict) -> str:
    """A short hash of what a claim asks for, the same in every API version."""
    identity = json.dumps({"selectors": selectors, "config": config}, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:8]


def resource_claim_name(deployment: str, selectors: list[str], config: dict) -> str:
    return dns_name(deployment, limit=50) + "-gpu-" + config_hash(selectors, config)


@dataclass(frozen=True)
class PackClaim:
    """The claim a plan needs, before it is written in an API version."""

    name: str
    selectors: list[str]
    config: dict


def pack_claim(deployment: str, spec: SLMDeploymentSpec, plan: Plan) -> PackClaim:
    selectors = device_selectors(spec, plan_memory_mib(plan))
    config = gpu_config(spec.sharing, plan)
    return PackClaim(resource_claim_name(deployment, selectors, config), selectors, config)


def build_resource_claim(owner: Owner, spec: SLMDeploymentSpec, plan: Plan, api_version: str,
                         pack: str | None = None) -> dict:
    """One claim per pack, shared by all its pods, with the NVIDIA driver's sharing settings from the plan.
    The first pack's claim is named for the deployment, another's for its StatefulSet `pack`."""
    claim = pack_claim(pack or owner.name, spec, plan)
    return {
        "apiVersion": api_version,
        "kind": "ResourceClaim",
        "metadata": {"name": claim.name, "namespace": owner.namespace, "labels": engine_labels(owner.name),
                     "ownerReferences": [owner.reference()]},
        "spec": claim_spec(api_version, claim.selectors, claim.config),
    }


def profiling_claim_template_name(profile: str) -> str:
    return dns_name("profile", profile, limit=59) + "-gpu"


def build_profiling_claim_template(profile_owner: Owner, spec: SLMDeploymentSpec, api_version: str,
                                   labels: dict[str, str]) -> dict:
    """A template that gives the profiling pod a whole GPU of the product asked for, shared by the same strategy
    as the pack (the limits, which depend on the replica count, are left to the engines)."""
    return {
        "apiVersion": api_version,
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": profiling_claim_template_name(profile_owner.name), "namespace": profile_owner.namespace,
                     "labels": labels, "ownerReferences": [profile_owner.reference()]},
        "spec": {"metadata": {"labels": labels},
                 "spec": claim_spec(api_version, device_selectors(spec), gpu_config(spec.sharing, None))},
    }


# ---------------------------------------------------------------- old claims


def claims_to_delete(claims: Iterable[dict], in_use: Iterable[str], current: str) -> list[dict]:
    """The pack's earlier claims that no pod uses any more: not the current one, named by no pod, and
    reserved for no consumer (the scheduler's record of who holds the device)."""
    keep = set(in_use) | {current}
    return sorted((c for c in claims
                   if c["metadata"]["name"] not in keep and not (c.get("status") or {}).get("reservedFor")),
                  key=lambda c: c["metadata"]["name"])
