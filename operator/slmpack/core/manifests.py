"""Manifest builders: spec and plan in, Kubernetes objects (plain dicts) out (pure).

Children of an SLMDeployment carry an ownerReference to it, so deleting the
deployment removes them through garbage collection, with no finalizer. The
SLMProfile is not owned by any deployment: it is reusable. Its profiling Job is
owned by the profile.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from slmpack import API_GROUP
from slmpack.api.models import (
    API,
    DEFAULT_CPU_ENGINE_IMAGE,
    DEFAULT_ENGINE_IMAGE,
    Device,
    Placement,
    Plan,
    ProfileConditions,
    ProfilingSpec,
    Sharing,
    SLMDeploymentSpec,
    SLMProfileSpec,
)
from slmpack.core.hardware import cpu_threads_env, resolve_dtype
from slmpack.core.packpod import SUPERVISOR_CONFIG_ENV, engine_port_name, pack_pod_ports, supervisor_config
from slmpack.core.scheduling import scheduling
from slmpack.core.validation import (
    API_KEY_ENV,
    MEMORY,
    PRODUCT,
    REPLICAS,
    SHARING_STRATEGY,
    GPUNode,
    product_labels,
)

MANAGED_BY = {"app.kubernetes.io/managed-by": "slmpack"}
# The operator's watches ask the apiserver for objects with these labels alone, so its memory
# grows with slmpack's objects, not with the cluster's. Pods carry one common label, the one
# every pod template here sets (engines and profilers alike).
POD_WATCH_SELECTOR = "app.kubernetes.io/managed-by=slmpack"
DEPLOYMENT_LABEL = f"{API_GROUP}/deployment"
PROFILE_LABEL = f"{API_GROUP}/profile"
PROFILE_KEY_LABEL = f"{API_GROUP}/profile-key"
PACK_LABEL = f"{API_GROUP}/pack"
PROFILER_SERVICE_ACCOUNT = "slmpack-profiler"
# The engines' and profilers' UID, which is also their GID and the group of the node's engine cache: the chart's
# engine.uid, this one unless set (the engine images' own user). An MPS server serves one UID at a time, so every
# MPS client of a GPU must run as it (README: "Scheduling, memory and container settings on a GPU cluster").
DEFAULT_ENGINE_UID = 10001
# Kubernetes refuses a runAsUser or runAsGroup above this (apimachinery validation.IsValidUserID, IsValidGroupID).
MAX_UID = 2**31 - 1
ENGINE_CACHE = "/var/cache/slmpack"  # where spec.engine.cache is mounted
# Long enough for a cold engine start on a CPU (about 90 s) or a large GPU model download.
STARTUP_SECONDS = 900
EPHEMERAL_STORAGE = "ephemeral-storage"
DEFAULT_EPHEMERAL_STORAGE_REQUEST = "1Gi"
# How long a stopping replica keeps serving before the engine gets SIGTERM: the Service and the routers drop
# it in that time.
DRAIN_SECONDS = 10
# Then how long its engine may take to finish the requests it holds (vLLM's --shutdown-timeout: it admits no
# new one, and exits as soon as none is left); vLLM's default, 0, would cut every stream in flight.
FINISH_SECONDS = 120
# What vLLM is told so that a SIGTERM finishes the requests in flight instead of aborting them.
FINISH_ARGS = ["--shutdown-timeout", str(FINISH_SECONDS)]
# An engine pod's terminationGracePeriodSeconds: the drain, the finish, and a margin for the process to exit.
ENGINE_GRACE_SECONDS = DRAIN_SECONDS + FINISH_SECONDS + 5


@dataclass(frozen=True)
class EngineImages:
    """The engine images of deployments that name none (spec.engine.image): the operator's configuration (the
    chart's engine.image and engine.cpuImage, under its registry), so the CRD holds no default of its own."""

    gpu: str = DEFAULT_ENGINE_IMAGE
    cpu: str = DEFAULT_CPU_ENGINE_IMAGE

    def fill(self, spec: SLMDeploymentSpec) -> SLMDeploymentSpec:
        if spec.engine.image:
            return spec
        image = self.cpu if spec.engine.device == Device.cpu else self.gpu
        return spec.model_copy(update={"engine": spec.engine.model_copy(update={"image": image})})


@dataclass(frozen=True)
class Owner:
    """The object children point their ownerReference at."""

    kind: str
    name: str
    uid: str
    namespace: str

    def reference(self) -> dict:
        return {"apiVersion": API, "kind": self.kind, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


# An SLMDeployment's name is a DNS subdomain (up to 253 characters, dots allowed); its children
# need less. A name that already fits is kept; any other is cut and given a short stable hash of
# the whole original, so two deployments never share a child and a child's name never changes.
HASH_LENGTH = 8
LABEL_LIMIT = 63
# A StatefulSet's pods carry `controller-revision-hash: <name>-<up to 10 characters>`, a label
# value of at most 63 characters (Kubernetes: pkg/controller/history/controller_history.go).
STATEFULSET_NAME_LIMIT = 52


def name_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def slug(text: str) -> str:
    """Lowercase letters, digits and dashes, for readable names that something else keeps unique."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def dns_name(*parts: str, limit: int = LABEL_LIMIT) -> str:
    """A DNS-1035 label (a letter first, as a Service needs) from the parts, at most `limit` long.

    Parts that already form such a label are joined as they are; otherwise the result is cut and
    ends in a hash of the parts, so distinct inputs never map to one name."""
    joined = "-".join(parts)
    if re.fullmatch(r"[a-z]([a-z0-9-]*[a-z0-9])?", joined) and len(joined) <= limit:
        return joined
    text = slug(joined)
    if not text[:1].isalpha():
        text = "x-" + text
    return text[:limit - HASH_LENGTH - 1].rstrip("-") + "-" + name_hash(joined)


def label_value(name: str) -> str:
    """An object name as a label value (at most 63 characters), hashed like `dns_name` when cut."""
    if len(name) <= LABEL_LIMIT:
        return name
    return name[:LABEL_LIMIT - HASH_LENGTH - 1].rstrip("-.") + "-" + name_hash(name)


def workload_name(deployment: str) -> str:
    """The StatefulSet's and the Service's name: one name for both, as `kubectl get sts,svc NAME` expects."""
    return dns_name(deployment, limit=STATEFULSET_NAME_LIMIT)


def pack_name(deployment: str, pack: int) -> str:
    """A pack's StatefulSet: the first keeps the deployment's name, the others add `-pack-<i>`."""
    return workload_name(deployment) if pack == 0 else dns_name(deployment, "pack", str(pack),
                                                                 limit=STATEFULSET_NAME_LIMIT)


def engine_labels(deployment: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "slmpack-engine", "app.kubernetes.io/instance": label_value(deployment),
            DEPLOYMENT_LABEL: label_value(deployment), **MANAGED_BY}


def selector_labels(deployment: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "slmpack-engine", DEPLOYMENT_LABEL: label_value(deployment)}


def profile_conditions(spec: SLMDeploymentSpec, gpu_memory_mib: int | None, sharing_slots: int | None = None,
                       cpu_flags: Iterable[str] = ()) -> ProfileConditions:
    """What the profile is measured under and keyed by. `cpu_flags` are the node's, where known (NFD's
    cpu-cpuid labels): without AVX512-BF16 among them, dtype auto on CPU is float32."""
    cpu = spec.engine.device == Device.cpu
    return ProfileConditions(
        model=spec.model.name, revision=spec.model.revision,
        dtype=resolve_dtype(spec.model.dtype, spec.engine.device, cpu_flags), max_model_len=spec.model.max_model_len,
        device=spec.engine.device, gpu_product=spec.gpu.product, gpu_memory_mib=gpu_memory_mib,
        engine_image=spec.engine.resolved_image(), engine_args=list(spec.engine.extra_args),
        sharing=None if cpu else spec.sharing, sharing_slots=None if cpu else sharing_slots,
        cpu_kv_cache_space_gib=spec.engine.cpu_kv_cache_space_gib if cpu else None, workload=spec.profiling.workload,
    )


def profile_name(conditions: ProfileConditions) -> str:
    model = conditions.model.rstrip("/").split("/")[-1]
    return (slug(model)[:50].rstrip("-") or "model") + "-" + conditions.key()


def profiling_job_name(profile: str) -> str:
    return dns_name("profile", profile)


def extension_job_name(profile: str, policy: ProfilingSpec) -> str:
    """The Job that adds what one profiling policy (its SLO, knee rule, batch range) needs to a shared profile:
    one per policy, so that deployments with the same SLO share it."""
    return dns_name("profile", profile, "for", name_hash(policy.model_dump_json(by_alias=True)))


# ---------------------------------------------------------------- pod pieces


def restricted_security_context(read_only_root: bool = True) -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": read_only_root,
            "capabilities": {"drop": ["ALL"]}}


def engine_security_context(spec: SLMDeploymentSpec) -> dict:
    """The engine's and the profiler's container security context: read-only root on CPU, writable on a GPU.

    Under CDI, which the GPU Operator turns on by default since v25.10, the toolkit's `nvidia-cdi-hook`
    writes into the container's root filesystem while it is created (the ldcache update, the library
    symlinks), and fails on a read-only one, so the container is never created (kserve PR #5711 drops
    readOnlyRootFilesystem from GPU containers for this). Toolkit 1.20.0's `update-application-profile`
    hook also failed on a read-only `/etc/nvidia` (NVIDIA/nvidia-container-toolkit#2026, fixed by #2028).
    Everything else stays restricted: no privilege escalation, no capabilities, a non-root UID, and the
    engine writes only its emptyDir /tmp and the engine cache.
    """
    return restricted_security_context(read_only_root=spec.engine.device != Device.gpu)


def engine_uid_setting(text: str) -> int:
    """The engines' UID from the operator's setting (the chart's engine.uid); empty is the default."""
    if not text.strip():
        return DEFAULT_ENGINE_UID
    try:
        uid = int(text)
    except ValueError:
        raise ValueError(f"engine UID {text!r} is not a whole number") from None
    if not 1 <= uid <= MAX_UID:
        raise ValueError(f"engine UID {uid} must be from 1 to {MAX_UID}: the engines never run as root")
    return uid


def pod_security_context(uid: int) -> dict:
    """Non-root as `uid`, with the same GID, which also owns the pod's volumes (fsGroup)."""
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"}}


def mps_client(spec: SLMDeploymentSpec, node: GPUNode | None) -> bool:
    """Whether the pod's GPU comes with an MPS server that the cluster runs (device plugin or DRA driver)."""
    if spec.engine.device != Device.gpu:
        return False
    if spec.placement == Placement.dra:
        return spec.sharing == Sharing.mps
    return node is not None and node.sharing_strategy == "mps"


def scratch_volumes(spec: SLMDeploymentSpec, namespace: str, own_shm: bool = True) -> tuple[list[dict], list[dict]]:
    """Writable /tmp (caches, compiled kernels), shared memory for the engine, the model volume and the
    engine cache.

    A node's engine cache is shared by every namespace, so each mounts only its own subdirectory
    (`subPath`): no tenant loads what another compiled. The kubelet creates a missing subdirectory
    as root with the mode of its parent (kubernetes pkg/volume/util/subpath/subpath_linux.go,
    doSafeMakeDir), and the exporter makes that parent setgid to the engines' group
    (charts/slmpack/templates/exporter.yaml), so the new directory is writable by the engines.

    An MPS client gets /dev/shm from whoever runs the MPS server: the device plugin mounts the
    node's MPS shm there and the DRA driver a per-claim tmpfs (NVIDIA/k8s-device-plugin
    internal/plugin/mps.go; dra-driver-nvidia-gpu cmd/gpu-kubelet-plugin/sharing.go). The
    kubelet mounts a pod's own volumes after the plugin's, so an emptyDir there would hide it
    (kubernetes pkg/kubelet/kubelet_pods.go): such pods (`own_shm=False`) declare none.
    """
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": spec.engine.tmp_size_limit}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    if own_shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.engine.shm_size_limit}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    source = spec.model.volume
    if source is not None:
        volumes.append(node_or_claim_volume("model", source.host_path, source.persistent_volume_claim, True))
        mounts.append({"name": "model", "mountPath": source.mount_path, "readOnly": True})
    cache = spec.engine.cache
    if cache is not None:
        volumes.append(node_or_claim_volume("engine-cache", cache.host_path, cache.persistent_volume_claim, False))
        own = {"subPath": namespace} if cache.host_path else {}  # a claim is the namespace's own already
        mounts.append({"name": "engine-cache", "mountPath": ENGINE_CACHE, **own})
    return volumes, mounts


def container_requests(spec: SLMDeploymentSpec) -> dict[str, str]:
    """The spec's requests, and room on the node's disk for /tmp, so the scheduler does not place an engine
    where its model download would fill the disk."""
    return {EPHEMERAL_STORAGE: DEFAULT_EPHEMERAL_STORAGE_REQUEST, **spec.resources.requests}


def node_or_claim_volume(name: str, host_path: str | None, claim: str | None, read_only: bool) -> dict:
    """A pod volume from a node directory that must exist, or from a PersistentVolumeClaim."""
    if host_path:
        return {"name": name, "hostPath": {"path": host_path, "type": "Directory"}}
    return {"name": name, "persistentVolumeClaim": {"claimName": claim, **({"readOnly": True} if read_only else {})}}


def engine_cache_env(device: Device, root: str = ENGINE_CACHE) -> dict[str, str]:
    """Where vLLM and inductor keep what a start compiles, for the next start with the same settings. vLLM
    CPU 0.32 cannot load its own AOT artefacts again ("'function' object has no attribute 'finalize_loading'",
    so it compiles anew); its older cache path loads, so CPU engines take that one."""
    env = {"VLLM_CACHE_ROOT": f"{root}/vllm", "TORCHINDUCTOR_CACHE_DIR": f"{root}/inductor"}
    if device == Device.cpu:
        env["VLLM_USE_AOT_COMPILE"] = "0"
    return env


def base_env(spec: SLMDeploymentSpec) -> list[dict]:
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/hf"}]
    if spec.engine.cache is not None:  # where every pod of the node finds what an earlier start compiled
        env += [{"name": k, "value": v} for k, v in engine_cache_env(spec.engine.device).items()]
    return env + [e.to_container() for e in spec.engine.env]


def replica_env(spec: SLMDeploymentSpec, plan: Plan) -> list[dict]:
    """An engine replica's env: the base, on CPU its OpenMP threads, always unbound, and the API key from its
    Secret. The profiling Job's engines get no key: its load generator talks to them inside the pod."""
    env = base_env(spec)
    if spec.engine.device == Device.cpu:
        env += [{"name": k, "value": v} for k, v in cpu_threads_env(plan.cpu_threads_per_replica).items()]
    if spec.api_key_secret_ref is not None:
        ref = spec.api_key_secret_ref
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def node_selector(spec: SLMDeploymentSpec, node: GPUNode | None) -> dict[str, str]:
    selector = dict(spec.gpu.node_selector)
    if node:
        # All pods of a pack share one GPU, so they must land on one node.
        selector["kubernetes.io/hostname"] = node.name
    return selector


def node_affinity(spec: SLMDeploymentSpec, node: GPUNode | None) -> dict | None:
    """The GPU labels a pod's node must carry, as a required node affinity.

    The product matches `X` and `X-SHARED` (GFD's label on a shared GPU), which a nodeSelector
    cannot say. On the device plugin the plan is sized for the chosen node's sharing strategy,
    slots per GPU (MPS caps each client at 1/R) and memory, so those must stay what they were.
    """
    expressions = []
    plugin = spec.placement in (Placement.device_plugin, Placement.pack_pod)
    if spec.gpu.product and plugin:
        # Under DRA the claim's selector picks the product; GFD labels may be absent there.
        expressions.append({"key": PRODUCT, "operator": "In", "values": product_labels(spec.gpu.product)})
    if node is not None and plugin and spec.engine.device == Device.gpu:
        expressions += [{"key": key, "operator": "In", "values": [node.labels[key]]}
                        for key in (SHARING_STRATEGY, REPLICAS, MEMORY) if key in node.labels]
    expressions += [e.to_wire() for e in spec.scheduling.node_affinity]
    if not expressions:
        return None
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": expressions}]}}}


def placement(spec: SLMDeploymentSpec, node: GPUNode | None) -> dict:
    """The pod spec's nodeSelector and affinity, and what spec.scheduling adds."""
    affinity = node_affinity(spec, node)
    return {"nodeSelector": node_selector(spec, node), **({"affinity": affinity} if affinity else {}),
            **scheduling(spec)}


def engine_args(spec: SLMDeploymentSpec, deployment: str, plan: Plan, port: int | None = None) -> list[str]:
    model = spec.model
    args = ["--model", model.name, "--served-model-name", model.name, deployment,
            "--host", "0.0.0.0", "--port", str(port or spec.port),
            "--max-num-seqs", str(plan.max_num_seqs), "--max-model-len", str(model.max_model_len),
            "--dtype", plan.dtype or model.dtype.value]
    if model.revision:
        args += ["--revision", model.revision]
    if plan.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(plan.gpu_memory_utilization)]
    if plan.kv_cache_memory_bytes is not None:
        # A fixed KV cache (vLLM >= 0.10.2): no replica sizes itself from what its neighbours hold. On CPU it
        # replaces VLLM_CPU_KVCACHE_SPACE, which is whole GiB and, when set, overrides this argument.
        args += ["--kv-cache-memory-bytes", str(plan.kv_cache_memory_bytes)]
    return args + list(spec.engine.extra_args)


# ---------------------------------------------------------------- SLMDeployment children


VLLM_SERVER = ["python3", "-m", "vllm.entrypoints.openai.api_server"]


def engine_command(spec: SLMDeploymentSpec) -> list[str]:
    """vLLM's server; on a GPU through `slmpack engine`, which pins it to the GPUs its container was given
    (core/gpu_pin.py: the plugin's MPS clients see every GPU of the node)."""
    return VLLM_SERVER if spec.engine.device == Device.cpu else ["slmpack", "engine", "--", *VLLM_SERVER]


def build_statefulset(owner: Owner, spec: SLMDeploymentSpec, plan: Plan, node: GPUNode | None,
                      claim: str | None = None, pack: int = 0, replicas: int | None = None,
                      uid: int = DEFAULT_ENGINE_UID) -> dict:
    """One StatefulSet per pack. On a GPU its replicas start one by one (OrderedReady), so each measures the
    memory its neighbours left; on CPU they start together (Parallel), as the profiler started them.

    No CUDA_MPS_* env: the MPS limits are the daemon's defaults (memory/R and 100/R % under the
    device plugin, the claim's settings under DRA), which the clients get without asking.
    Under DRA every pod names the pack's ResourceClaim `claim` (core/dra.py).
    Pack `pack` runs `replicas` of the plan's slots (all of them when None); the first pack's
    selector is the one it always had (selectors cannot change), the others' add the pack label.
    The pods run as `uid` (the operator's engine UID setting).
    """
    volumes, mounts = scratch_volumes(spec, owner.namespace, own_shm=not mps_client(spec, node))
    resources = {"requests": container_requests(spec), "limits": dict(spec.resources.limits)}
    pod_spec: dict = {
        "securityContext": pod_security_context(uid),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        **placement(spec, node),
        "volumes": volumes,
        "terminationGracePeriodSeconds": ENGINE_GRACE_SECONDS,
    }
    if spec.placement == Placement.dra:
        pod_spec["resourceClaims"] = [{"name": "gpu", "resourceClaimName": claim}]
        resources["claims"] = [{"name": "gpu"}]
    else:
        resources["limits"][spec.gpu.resource_name] = "1"
    probe = {"httpGet": {"path": "/health", "port": "http"}}
    pod_spec["containers"] = [{
        "name": "engine",
        "image": spec.engine.resolved_image(),
        "imagePullPolicy": "IfNotPresent",
        "command": engine_command(spec),
        "args": [*engine_args(spec, owner.name, plan), *FINISH_ARGS],
        "env": replica_env(spec, plan),
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": STARTUP_SECONDS // 5},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6},
        # A replica being replaced keeps serving until the Service stops sending to it: the endpoints
        # controller and kube-proxy drop it a few seconds after it starts terminating.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(DRAIN_SECONDS)]}}},
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": engine_security_context(spec),
    }]
    return build_pack_statefulset(owner, pack, plan.replicas if replicas is None else replicas, spec.port, pod_spec,
                                  parallel=spec.engine.device == Device.cpu)


def build_pack_statefulset(owner: Owner, pack: int, replicas: int, metrics_port: int, pod_spec: dict,
                           parallel: bool = False) -> dict:
    """The StatefulSet of one pack, whatever its pods hold: stable pod names, started one by one (together
    when `parallel`), scraped on `metrics_port`. The policy is immutable: decide keeps an existing pack's."""
    labels = {**engine_labels(owner.name), PACK_LABEL: str(pack)}
    selector = selector_labels(owner.name) | ({PACK_LABEL: str(pack)} if pack else {})
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": pack_name(owner.name, pack), "namespace": owner.namespace,
                     "labels": labels, "ownerReferences": [owner.reference()]},
        "spec": {
            "replicas": replicas,
            "serviceName": workload_name(owner.name),
            "podManagementPolicy": "Parallel" if parallel else "OrderedReady",
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels,
                             "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port),
                                             "prometheus.io/path": "/metrics"}},
                "spec": pod_spec,
            },
        },
    }


def build_pack_pod(owner: Owner, spec: SLMDeploymentSpec, plan: Plan, node: GPUNode | None, pack: int = 0,
                   engines: int | None = None, uid: int = DEFAULT_ENGINE_UID) -> dict:
    """A pack as one pod (`placement: pack-pod`): one whole GPU, and `engines` engines (the plan's replicas
    when None) under `slmpack supervise` (core/packpod.py).

    The pod requests `nvidia.com/gpu: 1` on a node whose device plugin shares nothing, so it gets one
    physical GPU and no MPS daemon of the cluster's: the supervisor runs the pod's own, whose clients are
    the pod's engines only, all of one UID (`uid`), sharing the pod's own /dev/shm. A StatefulSet of one keeps the
    pod's name stable, as the replica packs' pods are named. Engine i listens on spec.port + i (the
    container port `engine-<i>`), which the router reaches through the engines' headless Service.
    """
    count = plan.replicas if engines is None else engines
    no_kv = plan.model_copy(update={"kv_cache_memory_bytes": None})  # the supervisor adds each engine's own
    env = replica_env(spec, plan)
    # Values from Secrets (the API key, a user's secretKeyRef) stay out of the configuration: the kubelet sets
    # them in the container's environment, which every engine inherits.
    config = supervisor_config(spec, owner.name, plan, max(count, 1),
                               lambda port: [*VLLM_SERVER, *engine_args(spec, owner.name, no_kv, port),
                                             *FINISH_ARGS],
                               {e["name"]: e["value"] for e in env if "value" in e})
    # Each engine finishes its requests before the supervisor sends SIGKILL.
    config = config.model_copy(update={"stop_grace_seconds": FINISH_SECONDS + 5})
    volumes, mounts = scratch_volumes(spec, owner.namespace, own_shm=True)
    resources = {"requests": container_requests(spec), "limits": dict(spec.resources.limits)}
    resources["limits"][spec.gpu.resource_name] = "1"
    ready = {"httpGet": {"path": "/ready", "port": "supervisor"}}
    ports = [{"name": engine_port_name(i), "containerPort": slot.port, "protocol": "TCP"}
             for i, slot in enumerate(config.engines)]
    ports.append({"name": "supervisor", "containerPort": config.port, "protocol": "TCP"})
    pod_spec: dict = {
        "securityContext": pod_security_context(uid),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        **placement(spec, node),
        "volumes": volumes,
        # The supervisor drains (its engines keep serving while the pod leaves the router), then stops them.
        "terminationGracePeriodSeconds": int(config.drain_seconds + config.stop_grace_seconds) + 5,
        "containers": [{
            "name": "supervisor",
            "image": spec.engine.resolved_image(),
            "imagePullPolicy": "IfNotPresent",
            "command": ["slmpack", "supervise"],
            "env": [*env, {"name": SUPERVISOR_CONFIG_ENV, "value": config.model_dump_json(exclude_defaults=True)}],
            "ports": ports,
            # The engines start one after another, each within the startup time a replica pod gets.
            "startupProbe": {**ready, "periodSeconds": 5, "failureThreshold": STARTUP_SECONDS * len(ports) // 5},
            "readinessProbe": {**ready, "periodSeconds": 5, "failureThreshold": 3},
            "livenessProbe": {"httpGet": {"path": "/health", "port": "supervisor"}, "periodSeconds": 10,
                              "failureThreshold": 6},
            "resources": resources,
            "volumeMounts": mounts,
            "securityContext": engine_security_context(spec),
        }],
    }
    # Scraped at the supervisor, which serves every engine's series, each labelled with its engine.
    return build_pack_statefulset(owner, pack, 1 if count else 0, config.port, pod_spec)


def build_service(owner: Owner, spec: SLMDeploymentSpec, selector: dict[str, str] | None = None) -> dict:
    """The Service clients use: its name and port never change; it selects the engines, or the routers in
    front of them (core/router.py)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": workload_name(owner.name), "namespace": owner.namespace,
                     "labels": engine_labels(owner.name), "ownerReferences": [owner.reference()]},
        "spec": {"type": "ClusterIP", "selector": selector or selector_labels(owner.name),
                 "ports": [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}]},
    }


NETWORK_POLICY_API_VERSION = "networking.k8s.io/v1"
# PodDisruptionBudget: policy/v1 from Kubernetes 1.21, policy/v1beta1 before (and until 1.25).
DISRUPTION_BUDGET_API_VERSION = "policy/v1"


def engines_policy_name(deployment: str) -> str:
    """The engines' NetworkPolicy and PodDisruptionBudget: named for the engines, since a router in front of
    them has its own."""
    return dns_name(deployment, "engines")


def build_disruption_budget(owner: Owner, api_version: str = DISRUPTION_BUDGET_API_VERSION) -> dict:
    """A voluntary disruption (a node drain, a cluster upgrade) takes one engine replica of the deployment at a
    time, over all its packs: the others keep serving while it moves. It never blocks a drain outright, even
    with one replica."""
    return {
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": {"name": engines_policy_name(owner.name), "namespace": owner.namespace,
                     "labels": engine_labels(owner.name), "ownerReferences": [owner.reference()]},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(owner.name)}},
    }


def network_policy_peer(namespace_labels: dict[str, str] | None, pod_labels: dict[str, str] | None) -> dict:
    """A NetworkPolicy peer: the pods with `pod_labels` (every pod when None) in the namespaces with
    `namespace_labels` (the policy's own namespace when None)."""
    peer = {"podSelector": {"matchLabels": dict(pod_labels or {})}}
    if namespace_labels is not None:
        peer["namespaceSelector"] = {"matchLabels": dict(namespace_labels)}
    return peer


def build_network_policy(owner: Owner, spec: SLMDeploymentSpec, operator_peer: dict | None,
                         router_peer: dict | None = None, pack_sizes: Sequence[int] = ()) -> dict:
    """Only the listed peers, the deployment's routers (`router_peer`, which send every request the clients
    make through the Service) and the operator (`operator_peer`, which reads /metrics for the autoscaler) reach
    the engines' ports; nothing reaches any other port. Those are spec.port, or with pack pods of `pack_sizes`
    engines each engine's port and the supervisor's (which serves their /metrics). With no peer at all it
    admits nothing: an ingress rule with an empty `from` would admit everyone."""
    peers = allowed_peers(spec) + [peer for peer in (router_peer, operator_peer) if peer is not None]
    served = sorted({port for size in pack_sizes for port in pack_pod_ports(spec, size)}) or [spec.port]
    ingress = [{"from": peers, "ports": [{"protocol": "TCP", "port": port} for port in served]}] if peers else []
    meta = {"name": engines_policy_name(owner.name), "namespace": owner.namespace,
            "labels": engine_labels(owner.name), "ownerReferences": [owner.reference()]}
    return build_ingress_policy(meta, selector_labels(owner.name), ingress)


def allowed_peers(spec: SLMDeploymentSpec) -> list[dict]:
    """spec.networkPolicy.allowFrom, as NetworkPolicy peers."""
    return [network_policy_peer(p.namespace_selector.match_labels if p.namespace_selector else None,
                                p.pod_selector.match_labels if p.pod_selector else None)
            for p in (spec.network_policy.allow_from if spec.network_policy else [])]


def build_ingress_policy(meta: dict, pod_labels: dict[str, str], ingress: list[dict]) -> dict:
    """A NetworkPolicy over the pods with `pod_labels` that admits only what `ingress` lists."""
    return {"apiVersion": NETWORK_POLICY_API_VERSION, "kind": "NetworkPolicy", "metadata": meta,
            "spec": {"podSelector": {"matchLabels": pod_labels}, "policyTypes": ["Ingress"], "ingress": ingress}}


def controlled_by(obj: dict, owner_uid: str) -> bool:
    """Whether `obj` is controlled by the object of that uid (controller-runtime's IsControlledBy): a label
    alone says nothing, since anyone who may create objects in the namespace may copy it."""
    return any(ref.get("controller") and ref.get("uid") == owner_uid
               for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def service_endpoint(owner: Owner, spec: SLMDeploymentSpec) -> str:
    return f"http://{workload_name(owner.name)}.{owner.namespace}.svc:{spec.port}/v1"


# ---------------------------------------------------------------- profiling


def build_profile(namespace: str, conditions: ProfileConditions, spec: SLMDeploymentSpec) -> dict:
    name = profile_name(conditions)
    return {
        "apiVersion": API,
        "kind": "SLMProfile",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {PROFILE_KEY_LABEL: conditions.key(), **MANAGED_BY}},
        "spec": SLMProfileSpec(conditions=conditions, profiling=spec.profiling).to_wire(),
    }


def max_measured_replicas(spec: SLMDeploymentSpec, node: GPUNode | None) -> int:
    """The most co-located replicas worth measuring: on the device plugin a pack never exceeds the
    node's R slots per GPU, so counts above R measure a regime that is never deployed."""
    if node is not None and spec.placement == Placement.device_plugin:
        return min(spec.profiling.max_replicas, node.sharing_slots)
    return spec.profiling.max_replicas


def profiled_sharing(spec: SLMDeploymentSpec, node: GPUNode | None) -> str:
    """The sharing the profiler reproduces: on a device-plugin node that shares nothing, its one replica runs
    without MPS (no daemon of the profiler's), as it will be deployed."""
    unshared = spec.placement == Placement.device_plugin and node is not None and node.sharing_strategy == "none"
    return "none" if unshared else spec.sharing.value


def profiler_args(profile: str, namespace: str, conditions: ProfileConditions, spec: SLMDeploymentSpec,
                  max_replicas: int | None = None, sharing: str | None = None) -> list[str]:
    policy = spec.profiling
    args = ["profile", "--engine", "vllm", "--device", conditions.device.value,
            "--model", conditions.model, "--dtype", conditions.dtype.value,
            "--max-model-len", str(conditions.max_model_len),
            "--input-tokens", str(policy.workload.input_tokens), "--output-tokens", str(policy.workload.output_tokens),
            "--rule", policy.rule.value,
            "--efficiency-threshold-percent", str(policy.efficiency_threshold_percent),
            "--latency-factor", str(policy.latency_factor),
            "--max-replicas", str(max_replicas or policy.max_replicas),
            "--requests-per-point", str(policy.requests_per_point),
            "--sharing", sharing or spec.sharing.value, "--placement", spec.placement.value,
            "--confidence-percent", str(policy.confidence_percent),
            "--precision-percent", str(policy.precision_percent),
            "--min-repeats", str(policy.min_repeats), "--max-repeats", str(policy.max_repeats),
            "--replication-budget-seconds", str(policy.replication_budget_seconds),
            "--write-profile", f"{namespace}/{profile}", "--out", "/tmp/profile"]
    if policy.batch_sizes:
        args += ["--batch-sizes", ",".join(map(str, policy.batch_sizes))]
    else:
        args += ["--min-batch", str(policy.min_batch_size), "--max-batch", str(policy.max_batch_size)]
    if policy.slo.p99_itl_ms:
        args += ["--slo-p99-itl-ms", str(policy.slo.p99_itl_ms)]
    if policy.slo.p99_ttft_ms:
        args += ["--slo-p99-ttft-ms", str(policy.slo.p99_ttft_ms)]
    if conditions.gpu_memory_mib:
        args += ["--gpu-memory-mib", str(conditions.gpu_memory_mib)]
    if conditions.sharing_slots and spec.placement == Placement.device_plugin:
        args += ["--sharing-slots", str(conditions.sharing_slots)]
    if conditions.revision:
        args += ["--revision", conditions.revision]
    if conditions.device == Device.cpu:
        args += ["--cpu-kv-cache-space-gib", str(spec.engine.cpu_kv_cache_space_gib)]
    return args + [f"--engine-arg={a}" for a in spec.engine.extra_args]


SLOTS_DIR = "/slots"
# A slot holder says which GPU it was given, then waits until the profiler has ended (profiler/slots.py).
HOLD_SLOT = ('trap "exit 0" TERM; echo "${NVIDIA_VISIBLE_DEVICES:-}" > "/slots/$SLOT.tmp" && '
             'mv "/slots/$SLOT.tmp" "/slots/$SLOT"; until [ -e /slots/done ]; do sleep 1; done')
# The profiler under a shell that says when it has ended, however it ended (an OOM kill of the interpreter at
# start included), and passes SIGTERM on, so the profiler still stops its engines when the pod goes.
PROFILE_THEN_RELEASE = ('trap \'kill -TERM "$pid" 2>/dev/null\' TERM; "$@" & pid=$!; wait "$pid"; status=$?; '
                        'while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done; '
                        'touch /slots/done; exit "$status"')


def held_slots(spec: SLMDeploymentSpec, node: GPUNode | None) -> int:
    """The slot holders the profiling pod needs: one per engine beyond the profiler's own container, on a node
    whose device plugin shares its GPUs (it refuses a container asking for two shared slots)."""
    if spec.placement != Placement.device_plugin or node is None or node.sharing_slots <= 1:
        return 0
    return max_measured_replicas(spec, node) - 1


def slot_holder_name(index: int) -> str:
    """Holder `index` (from 1): its container's name, and the file in SLOTS_DIR where it says its GPU."""
    return f"slot-{index}"


def slot_holder(index: int, image: str, spec: SLMDeploymentSpec) -> dict:
    return {"name": slot_holder_name(index), "image": image, "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c", HOLD_SLOT], "env": [{"name": "SLOT", "value": slot_holder_name(index)}],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi", "ephemeral-storage": "1Mi"},
                          "limits": {"memory": "16Mi", spec.gpu.resource_name: "1"}},
            "volumeMounts": [{"name": "slots", "mountPath": SLOTS_DIR}],
            "securityContext": engine_security_context(spec)}


def build_profiling_job(profile_owner: Owner, conditions: ProfileConditions, spec: SLMDeploymentSpec,
                        node: GPUNode | None, claim_template: str | None = None, name: str | None = None,
                        uid: int = DEFAULT_ENGINE_UID) -> dict:
    """The Job that measures the model on a matching node and writes the SLMProfile status.

    Its container requests one slot, as a replica does: the device plugin refuses more than one per
    container under MPS ("maximum request size for shared resources is 1", NVIDIA/k8s-device-plugin
    internal/rm/rm.go), and as an MPS client of the plugin every process in the pod gets the replicas'
    memory/R and 100/R % caps, so it measures the regime that is deployed. It runs up to
    max_measured_replicas engines, so on a shared node a holder container per further engine holds a
    slot each (`held_slots`): the scheduler counts what the engines use, and the profiler measures only
    the counts whose slots are on its own GPU (profiler/slots.py). Under DRA the GPU comes from the
    ResourceClaimTemplate `claim_template` (core/dra.py) and no device-plugin resource is requested.
    It runs as `uid`, the engines' UID: a profiler of another UID would wait behind the replicas' MPS server.
    """
    volumes, mounts = scratch_volumes(spec, profile_owner.namespace, own_shm=not mps_client(spec, node))
    # The Job runs up to maxReplicas engines at once, so the per-replica memory limit is not its own.
    limits = {k: v for k, v in spec.resources.limits.items() if k != "memory"}
    resources = {"requests": container_requests(spec), "limits": limits}
    pod_claims = {}
    if spec.placement == Placement.dra:
        pod_claims = {"resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": claim_template}]}
        resources["claims"] = [{"name": "gpu"}]
    else:
        resources["limits"][spec.gpu.resource_name] = "1"
    labels = {"app.kubernetes.io/name": "slmpack-profiler", PROFILE_LABEL: label_value(profile_owner.name),
              **MANAGED_BY}
    args = profiler_args(profile_owner.name, profile_owner.namespace, conditions, spec,
                         max_measured_replicas(spec, node), profiled_sharing(spec, node))
    holders = [slot_holder(i, conditions.engine_image, spec) for i in range(1, held_slots(spec, node) + 1)]
    command = ["slmpack"]
    if holders:
        volumes = [*volumes, {"name": "slots", "emptyDir": {"sizeLimit": "1Mi"}}]
        mounts = [*mounts, {"name": "slots", "mountPath": SLOTS_DIR}]
        args += ["--held-slots", SLOTS_DIR]
        command = ["sh", "-c", PROFILE_THEN_RELEASE, "profiler", "slmpack"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name or profiling_job_name(profile_owner.name), "namespace": profile_owner.namespace,
                     "labels": labels, "ownerReferences": [profile_owner.reference()]},
        "spec": {
            # Bounded: a crashing or OOM-killed profiler is retried this often, a hung one stopped.
            "backoffLimit": spec.profiling.job_backoff_limit,
            "activeDeadlineSeconds": spec.profiling.job_active_deadline_seconds,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": PROFILER_SERVICE_ACCOUNT,
                    "securityContext": pod_security_context(uid),
                    **placement(spec, node),
                    "volumes": volumes,
                    **pod_claims,
                    "containers": [{
                        "name": "profiler",
                        "image": conditions.engine_image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": command,
                        "args": args,
                        "env": base_env(spec),
                        "resources": resources,
                        "volumeMounts": mounts,
                        "securityContext": engine_security_context(spec),
                    }, *holders],
                },
            },
        },
    }


def build_profiler_access(namespace: str, cluster_role: str) -> list[dict]:
    """The profiler's ServiceAccount in the profile's namespace, bound to the ClusterRole that may
    only read and patch SLMProfile status.

    The binding is named after the ClusterRole (the release's), since its roleRef cannot change: a
    release installed under another name binds its own role anew instead of meeting a binding to a
    role that is gone (a 409 on create), and the old binding grants nothing."""
    meta = {"namespace": namespace, "labels": dict(MANAGED_BY)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": PROFILER_SERVICE_ACCOUNT, **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": cluster_role, **meta},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
         "subjects": [{"kind": "ServiceAccount", "name": PROFILER_SERVICE_ACCOUNT, "namespace": namespace}]},
    ]
