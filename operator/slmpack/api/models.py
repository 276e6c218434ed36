"""The slmpack API: `SLMDeployment` and `SLMProfile`, group `slmpack.dev`, version `v1alpha1`.

These pydantic models are the single source of the API: the CRDs in `crds/` are
generated from them (`slmpack crds`), the operator parses specs with them, and the
profiler writes its report in the `SLMProfileStatus` shape.

Conventions (Kubernetes API conventions): camelCase field names, a description on
every field, integers with units in the name in spec (no floats in spec), enums as
strings, conditions keyed by type.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from slmpack import API_GROUP, API_VERSION

API = f"{API_GROUP}/{API_VERSION}"
DEFAULT_ENGINE_IMAGE = "slmpack/engine:0.1.0"
DEFAULT_CPU_ENGINE_IMAGE = "slmpack/engine-cpu:0.1.0"
REPORT_SCHEMA_VERSION = 3

# Kubernetes' own formats (apimachinery/pkg/util/validation), so a bad value is refused at apply
# rather than when the operator creates a child from it.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
QUALIFIED_NAME = "^(" + DNS_SUBDOMAIN[1:-1] + "/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
ENV_VAR_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"
ABSOLUTE_PATH = r"^/"


def cel(*rules: tuple[str, str]) -> dict:
    """CEL rules for the CRD (`x-kubernetes-validations`). Apiservers before 1.25 ignore them, so each
    has a twin in the operator's own checks (core/validation.py) that marks the spec InvalidSpec."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


class Model(BaseModel):
    """Base: camelCase on the wire, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict:
        """The object as the Kubernetes API stores it: camelCase, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def merge_patch(self) -> dict:
        """The object as a JSON merge patch that leaves nothing of an older value behind: every
        field this version knows, absent ones null, nested objects too (lists replace whole)."""
        wire = self.to_wire()
        return {field.alias: value.merge_patch() if isinstance(value := getattr(self, name), Model)
                else wire.get(field.alias) for name, field in type(self).model_fields.items()}

    @classmethod
    def from_stored(cls, raw: dict | None):
        """Parse what the API stored, keeping only the fields this version knows (kopf and older
        or newer versions of slmpack may have written others)."""
        known = {field.alias or name for name, field in cls.model_fields.items()}
        return cls.model_validate({k: v for k, v in (raw or {}).items() if k in known})


# ---------------------------------------------------------------- shared pieces


class Dtype(StrEnum):
    auto = "auto"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class Device(StrEnum):
    gpu = "gpu"
    cpu = "cpu"


class Sharing(StrEnum):
    mps = "mps"
    time_slicing = "time-slicing"


class Placement(StrEnum):
    device_plugin = "device-plugin"
    dra = "dra"
    pack_pod = "pack-pod"


class KneeRule(StrEnum):
    bca = "bca"
    kneedle = "kneedle"


class ModelVolume(Model):
    """Where a model given as a path lives: exactly one source, mounted read-only at `mountPath`."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("has(self.hostPath) != has(self.persistentVolumeClaim)",
         "spec.model.volume needs exactly one of hostPath or persistentVolumeClaim")))

    host_path: str | None = Field(
        None, pattern=ABSOLUTE_PATH,
        description="A directory on the node that holds the model (an absolute path), under one the cluster admin "
        "allows (the chart's hostPaths.modelPrefixes).")
    persistent_volume_claim: str | None = Field(
        None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="The name of a PersistentVolumeClaim in the same namespace that holds the model."
    )
    mount_path: str = Field("/models", pattern=ABSOLUTE_PATH,
                            description="Where the volume is mounted in the engine container (an absolute path).")


class EngineCache(Model):
    """A volume that keeps the engine's compilation and warm-up caches between starts, exactly one source.

    vLLM writes its torch.compile artefacts under VLLM_CACHE_ROOT and inductor's kernels under
    TORCHINDUCTOR_CACHE_DIR; a start whose settings were compiled before loads them instead. The
    profiling Job and every replica on a node mount the same directory, so the profile pays the
    compilation once and the replicas it plans start warm. A hostPath must be the node directory the
    cluster admin allows (the chart's `exporter.engineCacheHostPath`, which the chart prepares), and
    each namespace mounts only its own subdirectory of it."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("has(self.hostPath) != has(self.persistentVolumeClaim)",
         "spec.engine.cache needs exactly one of hostPath or persistentVolumeClaim")))

    host_path: str | None = Field(
        None, pattern=ABSOLUTE_PATH,
        description="The node's engine cache directory that the cluster admin allows (the chart's "
        "exporter.engineCacheHostPath); the namespace's own subdirectory of it is mounted.")
    persistent_volume_claim: str | None = Field(
        None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="The name of a PersistentVolumeClaim in the same namespace (ReadWriteMany for several nodes)."
    )


class ModelSpec(Model):
    """The model to serve."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("!has(self.volume) || self.name.startsWith(self.volume.mountPath.endsWith('/') ? self.volume.mountPath "
         ": self.volume.mountPath + '/')",
         "spec.model.name must be a path under spec.model.volume.mountPath when a volume holds the model")))

    name: str = Field(
        ...,
        min_length=1, max_length=1024,
        description="A Hugging Face model id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) or an absolute path "
        "inside the engine container (e.g. /models/SmolLM2-135M-Instruct).",
    )
    revision: str | None = Field(None, description="The Hugging Face revision (branch, tag or commit) to load.")
    dtype: Dtype = Field(Dtype.auto, description="The weight and activation dtype passed to the engine.")
    max_model_len: int = Field(
        2048, ge=64, le=1_048_576, description="The longest sequence (prompt plus output) in tokens the engine admits."
    )
    volume: ModelVolume | None = Field(None, description="A volume that holds the model, for a model given as a path.")


SECRET_KEY = r"^[-._a-zA-Z0-9]+$"


class SecretKeyRef(Model):
    """A key of a Secret in the deployment's namespace."""

    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="The Secret's name.")
    key: str = Field(..., min_length=1, max_length=253, pattern=SECRET_KEY, description="The key within it.")
    optional: bool | None = Field(None, description="Start even when the Secret or its key is missing.")


class ConfigMapKeyRef(Model):
    """A key of a ConfigMap in the deployment's namespace."""

    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="The ConfigMap's name.")
    key: str = Field(..., min_length=1, max_length=253, pattern=SECRET_KEY, description="The key within it.")
    optional: bool | None = Field(None, description="Start even when the ConfigMap or its key is missing.")


class FieldRef(Model):
    """A field of the pod, e.g. metadata.name or status.podIP."""

    field_path: str = Field(..., min_length=1, description="The field's path.")
    api_version: str | None = Field(None, description="The version the path is written in (v1 when unset).")


class ResourceFieldRef(Model):
    """A resource request or limit of a container."""

    resource: str = Field(..., min_length=1, description="The resource, e.g. limits.memory.")
    container_name: str | None = Field(None, description="The container; the engine's when unset.")
    divisor: str | None = Field(None, pattern=QUANTITY, description="The unit the value is given in, e.g. 1Mi.")


class EnvVarSource(Model):
    """Where a variable's value comes from, exactly one source (the core API's EnvVarSource)."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("[has(self.secretKeyRef), has(self.configMapKeyRef), has(self.fieldRef), has(self.resourceFieldRef)]"
         ".filter(x, x).size() == 1",
         "valueFrom needs exactly one of secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef")))

    secret_key_ref: SecretKeyRef | None = Field(None, description="A key of a Secret: keeps e.g. HF_TOKEN out of "
                                                "the spec, the profiles and the Events.")
    config_map_key_ref: ConfigMapKeyRef | None = Field(None, description="A key of a ConfigMap.")
    field_ref: FieldRef | None = Field(None, description="A field of the pod.")
    resource_field_ref: ResourceFieldRef | None = Field(None, description="A resource of a container.")

    def sources(self) -> int:
        return sum(x is not None for x in (self.secret_key_ref, self.config_map_key_ref, self.field_ref,
                                           self.resource_field_ref))


class EnvVar(Model):
    """An environment variable for the engine container: a value, or a reference to one (the core API's EnvVar)."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("!has(self.valueFrom) || !has(self.value) || size(self.value) == 0",
         "an env entry takes value or valueFrom, not both")))

    name: str = Field(..., min_length=1, pattern=ENV_VAR_NAME, description="The variable's name.")
    value: str = Field("", description="The variable's value, in clear text: use valueFrom.secretKeyRef for a secret.")
    value_from: EnvVarSource | None = Field(None, description="Where the value comes from instead: a Secret's key, "
                                            "a ConfigMap's key, a field of the pod or a container's resource.")

    def to_container(self) -> dict:
        """The entry as a container's env takes it: value or valueFrom."""
        wire = self.to_wire()
        if self.value_from is not None:
            wire.pop("value", None)
        return wire


class EngineSpec(Model):
    """The inference engine that serves the model."""

    kind: Literal["vllm"] = Field("vllm", description="The engine. Only vLLM is supported for deployments.")
    device: Device = Field(
        Device.gpu,
        description="gpu runs the CUDA engine on shared GPUs; cpu runs vLLM's CPU build (development clusters).",
    )
    image: str | None = Field(
        None, min_length=1,
        description="The engine+profiler image. Unset: the engine image for the chosen device that the operator is "
        "configured with (the chart's engine.image or engine.cpuImage, under its imageRegistry)."
    )
    extra_args: list[str] = Field(
        default_factory=list, description="Extra command-line arguments appended to `vllm serve`."
    )
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables for the engine.")
    cpu_kv_cache_space_gib: int = Field(
        1, ge=1, le=1024, description="With device cpu: the KV-cache space of a pack in GiB, shared equally by its "
        "replicas (each gets --kv-cache-memory-bytes = this / replicas), so every replica count has the same total."
    )
    cache: EngineCache | None = Field(
        None, description="A volume for the engine's compilation caches, shared by the profiling Job and the "
        "replicas, so that only the first start with given settings compiles. Without it each pod compiles anew."
    )
    tmp_size_limit: str = Field(
        "20Gi", pattern=QUANTITY,
        description="The most /tmp of an engine or profiler pod may hold (the model download from the Hub, and the "
        "compiled kernels without spec.engine.cache): the kubelet evicts a pod that writes more. Each engine "
        "container also requests 1Gi of ephemeral storage unless spec.resources.requests names ephemeral-storage.")
    shm_size_limit: str = Field(
        "1Gi", pattern=QUANTITY,
        description="The most /dev/shm (memory, counted in the pod's memory) a pod may hold, where the pod has its "
        "own: not under MPS, whose server provides it.")

    def resolved_image(self) -> str:
        return self.image or (DEFAULT_CPU_ENGINE_IMAGE if self.device == Device.cpu else DEFAULT_ENGINE_IMAGE)


class GPUSpec(Model):
    """Which GPUs may run the model."""

    product: str | None = Field(
        None, max_length=63, pattern=LABEL_VALUE,
        description="The GPU product as NVIDIA GPU feature discovery labels it (nvidia.com/gpu.product), "
        "e.g. NVIDIA-H100-80GB-HBM3. Empty means any.",
    )
    node_selector: dict[Annotated[str, Field(pattern=QUALIFIED_NAME)],
                        Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] = Field(
        default_factory=dict, description="Extra node labels that the node must carry."
    )
    resource_name: str = Field(
        "nvidia.com/gpu", pattern=QUALIFIED_NAME,
        description="The extended resource that the device plugin advertises for a share of a GPU "
        "(nvidia.com/gpu, or nvidia.com/gpu.shared when the plugin renames shared GPUs).",
    )


class TaintEffect(StrEnum):
    no_schedule = "NoSchedule"
    prefer_no_schedule = "PreferNoSchedule"
    no_execute = "NoExecute"


class Toleration(Model):
    """A toleration of a node taint, as in a pod spec (core/v1 Toleration)."""

    key: str | None = Field(None, pattern=QUALIFIED_NAME, description="The taint key; empty with Exists means all.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists, or Equal to value.")
    value: str | None = Field(None, max_length=63, pattern=LABEL_VALUE, description="The value, with Equal.")
    effect: TaintEffect | None = Field(None, description="NoSchedule, PreferNoSchedule or NoExecute; empty "
                                       "means all.")
    toleration_seconds: int | None = Field(None, ge=0, description="With NoExecute: how long the pod stays.")

    def tolerates(self, taint: dict) -> bool:
        """Whether this tolerates `taint` (a Node's spec.taints entry), as the scheduler decides
        (kubernetes staging/src/k8s.io/api/core/v1/toleration.go `ToleratesTaint`)."""
        if self.effect is not None and self.effect.value != taint.get("effect"):
            return False
        if self.key is not None and self.key != taint.get("key"):
            return False
        return self.operator == "Exists" or (self.value or "") == (taint.get("value") or "")


class NodeSelectorRequirement(Model):
    """One node affinity expression (core/v1 NodeSelectorRequirement)."""

    key: str = Field(..., pattern=QUALIFIED_NAME, description="The node label.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(..., description="How the "
                                                                                   "label is compared.")
    values: list[str] = Field(default_factory=list, description="The values, for In, NotIn, Gt and Lt.")


class SchedulingSpec(Model):
    """Where and how the engines and the profiling Job are scheduled, beside the GPU's own labels."""

    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations of node taints, e.g. the nvidia.com/gpu:NoSchedule that GPU "
        "pools often carry. The device plugin's pods get it from the ExtendedResourceToleration admission plugin "
        "where the cluster enables it; under placement dra slmpack adds it, since claims are not extended "
        "resources.")
    runtime_class_name: str | None = Field(
        None, max_length=253, pattern=DNS_SUBDOMAIN,
        description="The RuntimeClass of the pods, e.g. nvidia where the NVIDIA runtime is not the default.")
    priority_class_name: str | None = Field(
        None, max_length=253, pattern=DNS_SUBDOMAIN, description="The PriorityClass of the pods.")
    node_affinity: list[NodeSelectorRequirement] = Field(
        default_factory=list, description="More node affinity expressions that the node must match, with the "
        "GPU's own (all must hold).")
    image_pull_secrets: list[Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN)]] = Field(
        default_factory=list, description="Secrets in this namespace for pulling the engine image.")


class Workload(Model):
    """The request shape that profiling measures and the plan is sized for."""

    input_tokens: int = Field(128, ge=1, le=1_000_000, description="Prompt length in tokens.")
    output_tokens: int = Field(128, ge=1, le=1_000_000, description="Generated tokens per request.")


class LatencySLO(Model):
    """A latency objective that caps the knee and the replica count. Unset means none."""

    p99_itl_ms: int | None = Field(None, ge=1, description="The 99th percentile inter-token latency, in ms.")
    p99_ttft_ms: int | None = Field(None, ge=1, description="The 99th percentile time to first token, in ms.")


class ProfilingSpec(Model):
    """How the model is profiled when no matching SLMProfile exists."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("self.minBatchSize <= self.maxBatchSize",
         "spec.profiling.minBatchSize is larger than maxBatchSize: lower minBatchSize or raise maxBatchSize")))

    profile_ref: str | None = Field(
        None, max_length=253, pattern=DNS_SUBDOMAIN,
        description="The name of an existing SLMProfile in this namespace to use instead of profiling."
    )
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=list, max_length=64, json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Batch sizes to probe, all of them. Empty means an adaptive sweep over "
        "minBatchSize..maxBatchSize.",
    )
    min_batch_size: int = Field(1, ge=1, le=4096, description="The smallest batch of the adaptive sweep.")
    max_batch_size: int = Field(256, ge=1, le=4096, description="The largest batch of the adaptive sweep.")
    rule: KneeRule = Field(KneeRule.bca, description="The knee rule: bca (efficiency and latency) or kneedle.")
    efficiency_threshold_percent: int = Field(
        20, ge=1, le=100, description="BCA's ε: keep B while T(B)/(B·T(1)) exceeds this share, in percent."
    )
    latency_factor: int = Field(
        5, ge=1, le=100, description="BCA's L: keep B while its mean ITL is at most L times the ITL at batch 32."
    )
    slo: LatencySLO = Field(default_factory=LatencySLO, description="A latency objective that caps the knee.")
    workload: Workload = Field(default_factory=Workload, description="The request shape to measure.")
    requests_per_point: int = Field(
        0, ge=0, le=100_000, description="A fixed request count per batch size. 0 (the default) stops each probe "
        "as soon as its throughput is known to precisionPercent, after at least 3 and at most 12 windows of B requests."
    )
    max_replicas: int = Field(4, ge=1, le=48, description="The most co-located replicas to measure per GPU.")
    job_active_deadline_seconds: int = Field(
        7200, ge=60, le=7 * 86400,
        description="The profiling Job's activeDeadlineSeconds: a profile that runs longer fails, with the "
        "reason DeadlineExceeded.")
    job_backoff_limit: int = Field(
        2, ge=0, le=10,
        description="The profiling Job's backoffLimit: how often a failed profiler pod (crashed, OOM-killed) "
        "is retried before the profile fails.")
    confidence_percent: int = Field(
        95, ge=50, le=99, description="The confidence of every interval, and of the test that k > 1 replicas "
        "beat one: more replicas are planned only when their gain is significant at this level.")
    precision_percent: int = Field(
        5, ge=1, le=50, description="A probe, and a candidate's repeats, stop once the throughput's confidence "
        "interval is within plus or minus this share of its mean.")
    min_repeats: int = Field(3, ge=2, le=20, description="Runs of each replica count, at least.")
    max_repeats: int = Field(5, ge=2, le=50, description="Runs of each replica count, at most, "
                             "when the spread stays wider than precisionPercent.")
    replication_budget_seconds: int = Field(
        0, ge=0, le=86400, description="Stop the replica counts' runs after this many seconds once every count has "
        "minRepeats runs, even if their intervals are wider than precisionPercent (busy machines); the profile "
        "says so. 0 runs to maxRepeats.")


class ResourceSpec(Model):
    """CPU and memory for each engine container, as Kubernetes quantities. The GPU share is added by slmpack."""

    requests: dict[Annotated[str, Field(pattern=QUALIFIED_NAME)], Annotated[str, Field(pattern=QUANTITY)]] = Field(
        default_factory=dict, description="Resource requests as quantities, e.g. {cpu: '2'}.")
    limits: dict[Annotated[str, Field(pattern=QUALIFIED_NAME)], Annotated[str, Field(pattern=QUANTITY)]] = Field(
        default_factory=dict, description="Resource limits as quantities, e.g. {memory: 16Gi}.")


class AutoscalingSpec(Model):
    """GPU-aware autoscaling: fill each pack's GPU up to the profile's knee before taking another GPU."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("self.minPacks <= self.maxPacks",
         "spec.autoscaling.minPacks is larger than maxPacks: lower minPacks or raise maxPacks")))

    min_packs: int = Field(1, ge=1, le=64, description="The fewest packs (GPUs) to keep, however idle.")
    max_packs: int = Field(4, ge=1, le=64, description="The most packs (GPUs) to use, however busy.")
    target_knee_percent: int = Field(
        80, ge=10, le=100,
        description="The load to hold each replica at, in percent of the profile's knee batch (requests running "
        "plus waiting per replica): above it a replica is added, and one is removed while the rest would stay "
        "below it.")
    scale_in_cooldown_seconds: int = Field(
        300, ge=0, le=86400, description="How long after the last scaling a replica may be removed.")
    period_seconds: int = Field(15, ge=5, le=3600, description="How often the engines' metrics are read.")


class RoutingMode(StrEnum):
    router = "router"
    service = "service"
    inference_pool = "inferencePool"


class EndpointPickerRef(Model):
    """The endpoint picker (the Gateway API Inference Extension's EPP) that the cluster's gateway asks."""

    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                      description="The picker's Service, in the deployment's namespace.")
    port: int = Field(9002, ge=1, le=65535, description="The picker's Service port (its gRPC ext-proc port).")
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        "FailClose", description="What the gateway does when the picker does not answer: FailClose refuses the "
        "request, FailOpen sends it to any replica.")


class RoutingSpec(Model):
    """How requests reach the replicas."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("self.mode != 'inferencePool' || has(self.endpointPickerRef)",
         "spec.routing.mode inferencePool needs spec.routing.endpointPickerRef: name the endpoint picker's Service")))

    mode: RoutingMode = Field(
        RoutingMode.router,
        description="router: each request goes to the replica with the fewest in flight, none ever holds more than "
        "its --max-num-seqs, and the rest wait in a bounded queue at the router (HAProxy) behind the deployment's "
        "Service. service: the Service reaches the replicas directly, balancing connections, not requests. "
        "inferencePool: the Service reaches the replicas directly, and an InferencePool "
        "(inference.networking.k8s.io/v1) over them lets the cluster's gateway and its endpoint picker route.")
    queue_length: int = Field(
        128, ge=0, le=100_000,
        description="With mode router: the most requests that wait at the router while every replica is at its "
        "--max-num-seqs; one more is refused with 429 and Retry-After.")
    queue_wait_seconds: int = Field(
        30, ge=1, le=3600,
        description="With mode router: how long a request may wait for a free replica before it is refused with "
        "503 and Retry-After.")
    router_replicas: int = Field(
        2, ge=1, le=16,
        description="With mode router: router pods. Each sends an engine at most --max-num-seqs / routerReplicas "
        "requests (at least one), so together they never exceed the engine's cap.")
    endpoint_picker_ref: EndpointPickerRef | None = Field(
        None, description="With mode inferencePool: the endpoint picker the gateway asks (required there).")


class LabelSelector(Model):
    """Labels to select by, as matchLabels: every one must match."""

    match_labels: dict[Annotated[str, Field(pattern=QUALIFIED_NAME)],
                       Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] = Field(
        default_factory=dict, description="Labels that must all match; empty selects all.")


class NetworkPolicyPeer(Model):
    """Pods allowed to reach the engines: those matching podSelector in the namespaces matching
    namespaceSelector (the deployment's own namespace when namespaceSelector is unset)."""

    namespace_selector: LabelSelector | None = Field(
        None, description="The namespaces, by their labels (every namespace carries kubernetes.io/metadata.name "
        "from Kubernetes 1.21). Unset: the deployment's namespace.")
    pod_selector: LabelSelector | None = Field(None, description="The pods, by their labels. Unset: every pod of "
                                               "those namespaces.")


class NetworkPolicySpec(Model):
    """Who may reach the engine pods' port."""

    allow_from: list[NetworkPolicyPeer] = Field(
        default_factory=list, max_length=32,
        description="The peers allowed to reach the engines (your clients, a router, Prometheus). Empty: only the "
        "operator, which reads the engines' /metrics for the autoscaler.")


# ---------------------------------------------------------------- conditions


class Condition(Model):
    """A condition in the Kubernetes API conventions' shape."""

    type: str = Field(..., description="The condition's type, e.g. ProfileReady.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="A CamelCase word for the last transition's cause.")
    message: str = Field("", description="A human-readable explanation.")
    last_transition_time: datetime = Field(..., description="When the status last changed.")
    observed_generation: int | None = Field(None, description="The spec generation this condition was computed from.")


# ---------------------------------------------------------------- SLMDeployment


class SLMDeploymentSpec(Model):
    """The desired state: which model, on which GPUs, shared how, with how many replicas."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("self.profiling.workload.inputTokens + self.profiling.workload.outputTokens <= self.model.maxModelLen",
         "spec.profiling.workload needs more tokens per request than spec.model.maxModelLen: raise maxModelLen "
         "or shorten the workload"),
        ("self.placement != 'dra' || self.gpu.resourceName == 'nvidia.com/gpu'",
         "spec.gpu.resourceName applies to device-plugin placement only: remove it with placement dra")))

    model: ModelSpec = Field(..., description="The model to serve.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="The inference engine.")
    gpu: GPUSpec = Field(default_factory=GPUSpec, description="Which GPUs may run the model.")
    sharing: Sharing = Field(
        Sharing.mps, description="How co-located replicas share one GPU: mps (NVIDIA MPS) or time-slicing."
    )
    placement: Placement = Field(
        Placement.device_plugin,
        description="How the GPU is claimed: device-plugin (shared nvidia.com/gpu resource), dra "
        "(one ResourceClaim per pack, Kubernetes ≥ 1.32 with the NVIDIA DRA driver), or pack-pod (one pod per "
        "pack holds one whole GPU, nvidia.com/gpu: 1 on a node whose device plugin shares nothing, and runs the "
        "pack's engines under its own supervisor and, with sharing mps, its own MPS daemon: no cluster-wide "
        "GPU sharing to set up).",
    )
    replicas: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = Field(
        "auto", description="auto sizes the replicas per GPU from the profile; a number fixes it and skips profiling."
    )
    profiling: ProfilingSpec = Field(default_factory=ProfilingSpec, description="The profiling policy.")
    packs: int = Field(
        1, ge=1, le=64,
        description="Packs to run: each is spec.replicas replicas sharing one physical GPU, spread over the "
        "matching GPUs and nodes, all behind the one Service. The unit of the scale subresource, so "
        "`kubectl scale slmd/NAME --replicas=P`, an HPA or KEDA set it. Ignored while spec.autoscaling is set, "
        "which decides the packs itself.")
    autoscaling: AutoscalingSpec | None = Field(
        None, description="GPU-aware autoscaling between minPacks and maxPacks. Unset means spec.packs packs, "
        "each full.")
    port: int = Field(8000, ge=1024, le=65535, description="The port the engine serves its OpenAI API on.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        None, description="A Secret's key that holds the API key: every engine replica then refuses requests to "
        "/v1 without `Authorization: Bearer <key>` (vLLM's VLLM_API_KEY; /health and /metrics stay open, as vLLM "
        "leaves them). The key reaches the engines from the Secret alone, never the profile or the Events. Unset: "
        "anyone who reaches the Service may use the model.")
    network_policy: NetworkPolicySpec | None = Field(
        None, description="A NetworkPolicy for the engine pods: only the peers listed, and the operator, reach their "
        "port. Enforced only where the cluster's network plugin enforces NetworkPolicy. Unset: none is written.")
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="CPU and memory per replica.")
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, description="Tolerations, runtime and "
                                       "priority class, node affinity and image pull secrets of the engines and "
                                       "the profiling Job.")
    routing: RoutingSpec = Field(default_factory=RoutingSpec, description="How requests reach the replicas: "
                                 "by load through a router (the default), or through the plain Service.")


class Phase(StrEnum):
    pending = "Pending"
    profiling = "Profiling"
    deploying = "Deploying"
    ready = "Ready"
    degraded = "Degraded"
    failed = "Failed"


class ProfilingPhase(StrEnum):
    waiting = "Waiting"
    starting_engine = "StartingEngine"
    sweeping = "Sweeping"
    replicating = "Replicating"
    writing = "Writing"
    done = "Done"
    failed = "Failed"


class Plan(Model):
    """What the planner decided, and why."""

    knee_batch_size: int | None = Field(None, description="The knee batch size from the profile.")
    replicas: int = Field(..., description="Replicas per GPU.")
    max_num_seqs: int = Field(..., description="vLLM --max-num-seqs per replica.")
    dtype: str | None = Field(None, description="The dtype the replicas run: the one profiled (auto resolved "
                              "for the hardware), or the spec's.")
    gpu_memory_utilization: float | None = Field(None, description="vLLM --gpu-memory-utilization per replica.")
    memory_per_replica_mib: int | None = Field(None, description="The per-replica GPU (or CPU KV) memory budget.")
    cpu_threads_per_replica: int | None = Field(None, description="With device cpu: OpenMP threads per replica, "
                                                "unbound, as the profile measured them.")
    kv_cache_memory_bytes: int | None = Field(None, description="vLLM --kv-cache-memory-bytes per replica.")
    mps_active_thread_percentage: int | None = Field(
        None, description="The share of the SMs each replica may use under MPS, in percent.")
    mps_pinned_memory_limit_mib: int | None = Field(
        None, description="The device memory each replica may pin under MPS, in MiB.")
    predicted_throughput_tokens_per_s: float | None = Field(None, description="Predicted aggregate output tokens/s.")
    predicted_p99_itl_ms: float | None = Field(None, description="Predicted p99 inter-token latency.")
    energy_per_token_joules: float | None = Field(None, description="Measured J per output token, when measured.")
    slo_miss: str | None = Field(None, description="Why the SLO is out of reach at this plan, with the numbers; "
                                 "null when the plan meets it or none is set.")
    explanation: str = Field("", description="Why this plan, in a sentence or two.")


class ReplicaGPU(Model):
    """Where one replica runs: its node and the physical GPUs its container got."""

    name: str = Field(..., description="The replica's pod.")
    node: str | None = Field(None, description="The node it runs on.")
    gpu_uuids: list[str] = Field(default_factory=list, alias="gpuUUIDs",
                                 description="The UUIDs of its GPUs, as the node reports them; empty until known.")


class PackStatus(Model):
    """One pack: a StatefulSet whose replicas share one physical GPU."""

    name: str = Field(..., description="The pack's StatefulSet.")
    node: str | None = Field(None, description="The node it is pinned to, or where its replicas run.")
    gpu_uuids: list[str] = Field(default_factory=list, alias="gpuUUIDs",
                                 description="The GPUs its replicas report; one when the pack shares one GPU.")
    replicas: int = Field(..., description="Replicas planned in this pack.")
    ready_replicas: int = Field(0, description="Its replicas that pass their readiness probe.")


class AutoscalingStatus(Model):
    """What the autoscaler last observed and decided."""

    replicas: int = Field(..., description="The replicas it wants, over all packs (packs fill in order).")
    last_scale_time: datetime | None = Field(None, description="When it last changed the replicas.")
    load_per_replica: float | None = Field(None, description="Requests running plus waiting per replica, "
                                           "as last read.")
    reason: str = Field("", description="Why, in a CamelCase word: PackHasFreeSlots, AllPacksAtKnee, BelowTarget, "
                        "CoolingDown, AtTarget...")
    message: str = Field("", description="Its last decision, with its numbers.")
    queued_since: datetime | None = Field(None, description="Since when requests have waited at the routers "
                                          "without a break. They count as load once they have waited a whole "
                                          "period (spec.autoscaling.periodSeconds): a burst the engines absorb "
                                          "adds no replica.")


class SLMDeploymentStatus(Model):
    """What the operator observed and decided."""

    phase: Phase = Field(Phase.pending, description="A one-word summary derived from the conditions.")
    profiling_phase: ProfilingPhase | None = Field(None, description="Where profiling stands, while it runs.")
    conditions: list[Condition] = Field(default_factory=list,
                                        description="ProfileReady, Placed, Available, OneGPU, InvalidSpec, and "
                                        "MetricsAvailable with spec.autoscaling.")
    observed_generation: int | None = Field(None, description="The spec generation the status reflects.")
    profile: str | None = Field(None, description="The name of the SLMProfile in use.")
    plan: Plan | None = Field(None, description="The chosen plan.")
    replicas: int | None = Field(None, description="Planned replicas, all packs.")
    ready_replicas: int | None = Field(None, description="Replicas that pass their readiness probe, all packs.")
    replica_gpus: list[ReplicaGPU] = Field(default_factory=list, alias="replicaGPUs",
                                           description="Per replica, the node and the GPUs it runs on.")
    endpoint: str | None = Field(None, description="The in-cluster URL of the OpenAI-compatible Service.")
    current_packs: int | None = Field(None, description="Packs whose StatefulSet is applied (the scale "
                                      "subresource's replicas).")
    packs: list[PackStatus] = Field(default_factory=list, description="Per pack, its node, GPU and readiness.")
    selector: str | None = Field(None, description="The label selector of all engine pods, for HPA and KEDA.")
    autoscaling: AutoscalingStatus | None = Field(None, description="The autoscaler's state, while it is on.")


# ---------------------------------------------------------------- SLMProfile


class ProfileConditions(Model):
    """What a profile was measured under; deployments whose conditions match reuse it.

    Everything that changes the measured curve or replication runs is here, and in the key.
    The knee rule and the SLO are not: the knee and the plan are recomputed from the raw
    curve for each deployment, so deployments with different SLOs share one profile.
    """

    model: str = Field(..., description="The model id or path.")
    revision: str | None = Field(None, description="The model revision.")
    dtype: Dtype = Field(Dtype.auto, description="The dtype the engine runs. On CPU, auto is resolved from the "
                         "node's CPU flags before the key is taken (float32 without AVX512-BF16).")
    max_model_len: int = Field(2048, description="The engine's max model length.")
    device: Device = Field(Device.gpu, description="gpu or cpu.")
    gpu_product: str | None = Field(None, description="The GPU product (nvidia.com/gpu.product), or none on cpu.")
    gpu_memory_mib: int | None = Field(None, description="The GPU's memory in MiB.")
    engine_image: str = Field("", description="The engine image (its tag fixes the engine's version).")
    engine_version: str | None = Field(None, description="The engine's version, when known.")
    engine_args: list[str] = Field(default_factory=list, description="Extra engine arguments.")
    sharing: Sharing | None = Field(None, description="How co-located replicas share the GPU: mps or time-slicing.")
    sharing_slots: int | None = Field(None, description="Pods the device plugin lets share one GPU (R); under "
                                      "plugin MPS each gets 1/R of the SMs and memory.")
    cpu_kv_cache_space_gib: int | None = Field(None, description="With device cpu: the KV cache of a pack, shared "
                                               "equally by its replicas.")
    workload: Workload = Field(default_factory=Workload, description="The request shape.")

    def key(self) -> str:
        """A short stable hash of what makes two profiles interchangeable."""
        identity = self.model_dump(mode="json", exclude={"engine_version"})
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


class Percentiles(Model):
    """A latency distribution in milliseconds."""

    mean: float | None = Field(None, description="Mean.")
    p50: float | None = Field(None, description="Median.")
    p90: float | None = Field(None, description="90th percentile.")
    p99: float | None = Field(None, description="99th percentile.")


class Spread(Model):
    """A mean over repeated samples, its spread and its two-sided Student-t confidence interval."""

    samples: int = Field(..., description="How many samples the mean is over.")
    mean: float = Field(..., description="Their mean.")
    stdev: float | None = Field(None, description="Their sample standard deviation; null with one sample.")
    ci_low: float | None = Field(None, description="The confidence interval's lower end.")
    ci_high: float | None = Field(None, description="The confidence interval's upper end.")
    confidence_percent: int = Field(95, description="The interval's confidence.")


class ProfilePoint(Model):
    """One measured batch size."""

    batch_size: int = Field(..., description="Concurrent requests (and the engine's running batch).")
    completed: int = Field(0, description="Requests that completed.")
    failed: int = Field(0, description="Requests that failed.")
    error: str | None = Field(None, description="Why the point failed, when it did.")
    duration_s: float | None = Field(None, description="Measured wall time.")
    request_throughput_per_s: float | None = Field(None, description="Completed requests per second.")
    output_throughput_tokens_per_s: float | None = Field(None, description="Generated tokens per second.")
    total_throughput_tokens_per_s: float | None = Field(None, description="Prompt plus generated tokens per second.")
    ttft_ms: Percentiles | None = Field(None, description="Time to first token.")
    itl_ms: Percentiles | None = Field(None, description="Inter-token latency.")
    tpot_ms: Percentiles | None = Field(None, description="Time per output token after the first.")
    e2e_latency_ms: Percentiles | None = Field(None, alias="e2eLatencyMs", description="Request latency end to end.")
    kv_cache_usage_percent: float | None = Field(None, description="Peak KV-cache use during the point.")
    preemptions: int | None = Field(None, description="Engine preemptions during the point.")
    power_watts: float | None = Field(None, description="Mean GPU power; null when not measured.")
    energy_joules: float | None = Field(None, description="GPU energy over the point; null when not measured.")
    energy_per_token_joules: float | None = Field(None, description="J per output token; null when not measured.")
    energy_note: str | None = Field(None, description="Why energy is null, e.g. 'not measured: no GPU'.")
    idle_power_watts: float | None = Field(None, description="GPU power with the engine idle just before the point.")
    throughput_spread: Spread | None = Field(
        None, description="Output tokens/s over windows of batchSize completed requests; the probe stopped "
        "when its interval was narrow enough (see stoppedBy).")
    stopped_by: Literal["precision", "verdict", "samples", "requests"] | None = Field(
        None, description="Why the probe stopped: precision (its interval within precisionPercent), verdict (the "
        "adaptive sweep's: its interval wholly above or below BCA's efficiency bar, so more windows could not change "
        "the knee), samples (12 windows), or requests (requestsPerPoint, or a replication run's fixed length).")


class Knee(Model):
    """The chosen knee."""

    batch_size: int = Field(..., description="The knee batch size.")
    rule: str = Field(..., description="The rule that chose it, with its parameters.")
    reason: str = Field("", description="Why the next larger batch was not taken.")
    slo_met: bool = Field(True, description="False when no probed batch meets the SLO: the knee is then the "
                          "smallest batch, which breaks it.")
    throughput_tokens_per_s: float | None = Field(None, description="Output tokens/s at the knee.")
    request_throughput_per_s: float | None = Field(None, description="Requests/s at the knee.")
    mean_itl_ms: float | None = Field(None, description="Mean ITL at the knee.")
    p99_itl_ms: float | None = Field(None, description="p99 ITL at the knee.")
    kv_cache_usage_percent: float | None = Field(None, description="KV-cache share used at the knee.")
    memory_free_mib: int | None = Field(None, description="Engine memory left unused at the knee.")


class ReplicationPoint(Model):
    """k co-located replicas under the offered load every k faces, run several times."""

    replicas: int = Field(..., description="Co-located replicas.")
    batch_size_per_replica: int = Field(..., description="The most requests each replica ran at once (its "
                                        "--max-num-seqs, the knee), the same for every k.")
    offered_concurrency: int | None = Field(None, description="Concurrent clients in all, the same for every k, "
                                            "enough to hold every replica of the largest k at its batch.")
    runs_tokens_per_s: list[float] = Field(default_factory=list, description="Aggregate output tokens/s, per run.")
    requests_per_run: int | None = Field(None, description="Requests measured in each run, the same for every "
                                         "count: two windows of the offered load, and at least 20 s at the "
                                         "knee's rate.")
    run_positions: list[int] = Field(default_factory=list, description="Where each run fell in the profile's sequence "
                                     "of replication runs (0 first): the counts interleave so that drift cancels.")
    throughput_spread: Spread | None = Field(None, description="Mean, spread and interval of the runs.")
    aggregate_throughput_tokens_per_s: float | None = Field(None, description="Output tokens/s, all replicas: "
                                                            "the mean of the runs.")
    aggregate_request_throughput_per_s: float | None = Field(None, description="Requests/s, all replicas.")
    p99_itl_ms: float | None = Field(None, description="p99 ITL across replicas, the worst run.")
    p99_ttft_ms: float | None = Field(None, description="p99 TTFT across replicas, the worst run.")
    energy_per_token_joules: float | None = Field(None, description="J per output token of the measured requests "
                                                  "(warm-up excluded); null when not measured.")
    idle_power_watts: float | None = Field(None, description="GPU power with the replicas idle.")
    cpu_threads_per_replica: int | None = Field(None, description="With device cpu: the OpenMP threads each "
                                                "replica ran with (unbound), as the deployment runs them.")
    kv_cache_memory_bytes: int | None = Field(None, description="Each replica's KV cache (--kv-cache-memory-bytes): "
                                              "the same total for every k.")
    memory_share: float | None = Field(None, description="With device gpu: each replica's share of the GPU's memory "
                                       "(--gpu-memory-utilization).")
    mps_active_thread_percentage: int | None = Field(None, description="Under MPS: each replica's share of the SMs.")
    error: str | None = Field(None, description="Why the point failed, when it did.")


class ReplicationDecision(Model):
    """The best k > 1 against one replica at the same offered load, and whether its gain is significant."""

    replicas: int = Field(..., description="The replicas decided on.")
    best_candidate: int | None = Field(None, description="The k > 1 the numbers are for: the one chosen, or the "
                                       "highest mean when none is significant.")
    ratio: float | None = Field(None, description="Its mean throughput over one replica's.")
    ratio_ci_low: float | None = Field(None, description="Fieller's one-sided lower bound of the ratio at "
                                       "boundsConfidencePercent: above 1 exactly when the gain is significant.")
    ratio_ci_high: float | None = Field(None, description="Fieller's one-sided upper bound of the ratio at "
                                        "boundsConfidencePercent; null when unbounded.")
    p_value: float | None = Field(None, description="Welch's one-sided t-test of its runs against one replica's.")
    p_value_adjusted: float | None = Field(None, description="Its p-value after Holm's correction over the counts "
                                           "tried: significant exactly when below 1 - confidence.")
    candidates_tested: int | None = Field(None, description="How many k > 1 were tested against one replica.")
    runs_tested: int | None = Field(None, description="The fixed number of each count's first runs the test used.")
    bounds_confidence_percent: float | None = Field(None, description="The confidence of the ratio's bounds: the "
                                                    "level its Holm step tested it at.")
    confidence_percent: int = Field(95, description="The confidence the gain had to reach.")
    significant: bool = Field(False, description="Whether the gain is significant at that confidence.")
    explanation: str = Field("", description="Why, with the numbers.")


class ProfileProgress(Model):
    """How far the profile is."""

    probes_done: int = Field(0, description="Probes (sweep points and replication runs) measured so far.")
    probes_planned: int = Field(0, description="Probes expected in all; the adaptive sweep revises it.")
    eta_seconds: int | None = Field(None, description="Estimated time left, from the probes measured so far.")


class MemoryFootprint(Model):
    """What one replica needs: weights, KV cache per token, and a fixed overhead (activations, CUDA context)."""

    weights_mib: int = Field(..., ge=0, description="Model weights in MiB.")
    kv_bytes_per_token: int = Field(..., ge=0, description="KV-cache bytes per token (all layers, K and V).")
    overhead_mib: int = Field(1024, ge=0, description="Activations, CUDA graphs and context per replica, in MiB.")


class SweepInfo(Model):
    """How the sweep ran."""

    mode: Literal["adaptive", "full"] = Field("adaptive", description="adaptive (grow then bisect) or full.")
    probes: int = Field(0, description="Batch sizes measured.")
    duration_s: float | None = Field(None, description="Wall time of the whole profile.")
    engine_start_seconds: list[float] = Field(default_factory=list,
                                              description="How long each engine start took, in order.")


class SLMProfileSpec(Model):
    """The conditions a profile is (or was) measured under."""

    conditions: ProfileConditions = Field(..., description="Model, GPU, engine and workload.")
    profiling: ProfilingSpec = Field(default_factory=ProfilingSpec, description="The profiling policy used.")


class SLMProfileStatus(Model):
    """The measurements: the raw curve, the raw replication runs, and the knee and decision at the profile's
    own settings (deployments recompute both with their SLO and knee rule)."""

    schema_version: int = Field(REPORT_SCHEMA_VERSION, description="The report format's version.")
    phase: Literal["Pending", "Profiling", "Ready", "Failed"] = Field(
        "Pending", description="A one-word summary derived from the conditions.")
    profiling_phase: ProfilingPhase | None = Field(None, description="The profiler's current step.")
    message: str | None = Field(None, description="Progress or failure, in words.")
    conditions: list[Condition] = Field(default_factory=list,
                                        description="Ready (measured) and Failed (with the reason).")
    progress: ProfileProgress | None = Field(None, description="Probes done and planned, and the time left.")
    dtype: str | None = Field(None, description="The dtype measured (auto resolved for the hardware).")
    sharing_regime: str | None = Field(None, description="How the co-located replicas shared the device "
                                       "while measured, with their caps.")
    observed_generation: int | None = Field(None, description="The spec generation the status reflects.")
    measured_at: datetime | None = Field(None, description="When the measurement finished.")
    environment: dict[str, str] = Field(default_factory=dict, description="Engine version, host, driver, etc.")
    sweep: SweepInfo | None = Field(None, description="How the sweep ran.")
    points: list[ProfilePoint] = Field(default_factory=list, description="The measured curve.")
    knee: Knee | None = Field(None, description="The knee.")
    replication_stop: str | None = Field(None, description="Why the replica counts' runs stopped: Precise (every "
                                         "interval within precisionPercent), MaxRepeats, or TimeBudget "
                                         "(replicationBudgetSeconds ran out after minRepeats runs each).")
    replication: list[ReplicationPoint] = Field(default_factory=list, description="k = 1..kmax measured, at the "
                                                "knee of each SLO the profile serves (batchSizePerReplica).")
    memory: MemoryFootprint | None = Field(None, description="The per-replica memory model.")
    recommended_replicas: int | None = Field(None, description="The k with the highest throughput within the SLO.")
    replication_gain_percent: float | None = Field(
        None, description="Aggregate throughput of the recommended k over one replica at the same offered load, "
        "in percent."
    )
    decision: ReplicationDecision | None = Field(None, description="The replicate-or-not decision, with its test.")
