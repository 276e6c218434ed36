"""Manifest builders: spec and plan in, Kubernetes objects (plain dicts) out (pure).

Children of an SLMDeployment carry an ownerReference to it, so deleting the
deployment removes them through garbage collection, with no finalizer. The
SLMProfile is not owned by any deployment: it is reusable. Its profiling Job is
owned by the profile.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from slmpack import API_GROUP
from slmpack.api.models import (
    API,
    Device,
    Placement,
    Plan,
    ProfileConditions,
    Sharing,
    SLMDeploymentSpec,
    SLMProfileSpec,
)
from slmpack.core.hardware import cpu_threads_env, resolve_dtype
from slmpack.core.validation import MEMORY, PRODUCT, REPLICAS, SHARING_STRATEGY, GPUNode, product_labels

MANAGED_BY = {"app.kubernetes.io/managed-by": "slmpack"}
DEPLOYMENT_LABEL = f"{API_GROUP}/deployment"
PROFILE_LABEL = f"{API_GROUP}/profile"
PROFILE_KEY_LABEL = f"{API_GROUP}/profile-key"
PACK_LABEL = f"{API_GROUP}/pack"
PROFILER_SERVICE_ACCOUNT = "slmpack-profiler"
ENGINE_UID = 10001
ENGINE_CACHE = "/var/cache/slmpack"  # where spec.engine.cache is mounted
# Long enough for a cold engine start on a CPU (about 90 s) or a large GPU model download.
STARTUP_SECONDS = 900
# How long a stopping replica keeps serving before the engine gets SIGTERM (within the 30 s grace period).
DRAIN_SECONDS = 10


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


# ---------------------------------------------------------------- pod pieces


def restricted_security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def pod_security_context() -> dict:
    return {"runAsNonRoot": True, "runAsUser": ENGINE_UID, "runAsGroup": ENGINE_UID, "fsGroup": ENGINE_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def mps_client(spec: SLMDeploymentSpec, node: GPUNode | None) -> bool:
    """Whether the pod's GPU comes with an MPS server that the cluster runs (device plugin or DRA driver)."""
    if spec.engine.device != Device.gpu:
        return False
    if spec.placement == Placement.dra:
        return spec.sharing == Sharing.mps
    return node is not None and node.sharing_strategy == "mps"


def scratch_volumes(spec: SLMDeploymentSpec, own_shm: bool = True) -> tuple[list[dict], list[dict]]:
    """Writable /tmp (caches, compiled kernels), shared memory for the engine, and the model volume.

    An MPS client gets /dev/shm from whoever runs the MPS server: the device plugin mounts the
    node's MPS shm there and the DRA driver a per-claim tmpfs (NVIDIA/k8s-device-plugin
    internal/plugin/mps.go; dra-driver-nvidia-gpu cmd/gpu-kubelet-plugin/sharing.go). The
    kubelet mounts a pod's own volumes after the plugin's, so an emptyDir there would hide it
    (kubernetes pkg/kubelet/kubelet_pods.go): such pods (`own_shm=False`) declare none.
    """
    volumes, mounts = [{"name": "tmp", "emptyDir": {}}], [{"name": "tmp", "mountPath": "/tmp"}]
    if own_shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    source = spec.model.volume
    if source is not None:
        volumes.append(node_or_claim_volume("model", source.host_path, source.persistent_volume_claim, True))
        mounts.append({"name": "model", "mountPath": source.mount_path, "readOnly": True})
    cache = spec.engine.cache
    if cache is not None:
        volumes.append(node_or_claim_volume("engine-cache", cache.host_path, cache.persistent_volume_claim, False))
        mounts.append({"name": "engine-cache", "mountPath": ENGINE_CACHE})
    return volumes, mounts


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
    if spec.engine.device == Device.cpu:
        env.append({"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(spec.engine.cpu_kv_cache_space_gib)})
    return env + [e.to_wire() for e in spec.engine.env]


def replica_env(spec: SLMDeploymentSpec, plan: Plan) -> list[dict]:
    """An engine replica's env: the base, and on CPU its OpenMP threads, always unbound."""
    env = base_env(spec)
    if spec.engine.device == Device.cpu:
        env += [{"name": k, "value": v} for k, v in cpu_threads_env(plan.cpu_threads_per_replica).items()]
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
    if spec.gpu.product and spec.placement == Placement.device_plugin:
        # Under DRA the claim's selector picks the product; GFD labels may be absent there.
        expressions.append({"key": PRODUCT, "operator": "In", "values": product_labels(spec.gpu.product)})
    if node is not None and spec.placement == Placement.device_plugin and spec.engine.device == Device.gpu:
        expressions += [{"key": key, "operator": "In", "values": [node.labels[key]]}
                        for key in (SHARING_STRATEGY, REPLICAS, MEMORY) if key in node.labels]
    if not expressions:
        return None
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": expressions}]}}}


def placement(spec: SLMDeploymentSpec, node: GPUNode | None) -> dict:
    """The pod spec's nodeSelector and affinity."""
    affinity = node_affinity(spec, node)
    return {"nodeSelector": node_selector(spec, node), **({"affinity": affinity} if affinity else {})}


def engine_args(spec: SLMDeploymentSpec, deployment: str, plan: Plan) -> list[str]:
    model = spec.model
    args = ["--model", model.name, "--served-model-name", model.name, deployment,
            "--host", "0.0.0.0", "--port", str(spec.port),
            "--max-num-seqs", str(plan.max_num_seqs), "--max-model-len", str(model.max_model_len),
            "--dtype", plan.dtype or model.dtype.value]
    if model.revision:
        args += ["--revision", model.revision]
    if plan.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(plan.gpu_memory_utilization)]
    if plan.kv_cache_memory_bytes is not None:
        # A fixed KV cache (vLLM >= 0.10.2): no replica sizes itself from what its neighbours hold.
        args += ["--kv-cache-memory-bytes", str(plan.kv_cache_memory_bytes)]
    return args + list(spec.engine.extra_args)


# ---------------------------------------------------------------- SLMDeployment children


def build_statefulset(owner: Owner, spec: SLMDeploymentSpec, plan: Plan, node: GPUNode | None,
                      claim: str | None = None, pack: int = 0, replicas: int | None = None) -> dict:
    """One StatefulSet per GPU pack; OrderedReady so replicas start one by one and measure free memory right.

    No CUDA_MPS_* env: the MPS limits are the daemon's defaults (memory/R and 100/R % under the
    device plugin, the claim's settings under DRA), which the clients get without asking.
    Under DRA every pod names the pack's ResourceClaim `claim` (core/dra.py).
    Pack `pack` runs `replicas` of the plan's slots (all of them when None); the first pack's
    selector is the one it always had (selectors cannot change), the others' add the pack label.
    """
    volumes, mounts = scratch_volumes(spec, own_shm=not mps_client(spec, node))
    resources = {"requests": dict(spec.resources.requests), "limits": dict(spec.resources.limits)}
    pod_spec: dict = {
        "securityContext": pod_security_context(),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        **placement(spec, node),
        "volumes": volumes,
        "terminationGracePeriodSeconds": 30,
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
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": engine_args(spec, owner.name, plan),
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
        "securityContext": restricted_security_context(),
    }]
    labels = {**engine_labels(owner.name), PACK_LABEL: str(pack)}
    selector = selector_labels(owner.name) | ({PACK_LABEL: str(pack)} if pack else {})
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": pack_name(owner.name, pack), "namespace": owner.namespace,
                     "labels": labels, "ownerReferences": [owner.reference()]},
        "spec": {
            "replicas": plan.replicas if replicas is None else replicas,
            "serviceName": workload_name(owner.name),
            "podManagementPolicy": "OrderedReady",
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels,
                             "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(spec.port),
                                             "prometheus.io/path": "/metrics"}},
                "spec": pod_spec,
            },
        },
    }


def build_service(owner: Owner, spec: SLMDeploymentSpec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": workload_name(owner.name), "namespace": owner.namespace,
                     "labels": engine_labels(owner.name), "ownerReferences": [owner.reference()]},
        "spec": {"type": "ClusterIP", "selector": selector_labels(owner.name),
                 "ports": [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}]},
    }


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
    if conditions.device == Device.cpu:
        args += ["--cpu-kv-cache-space-gib", str(spec.engine.cpu_kv_cache_space_gib)]
    return args + [f"--engine-arg={a}" for a in spec.engine.extra_args]


def build_profiling_job(profile_owner: Owner, conditions: ProfileConditions, spec: SLMDeploymentSpec,
                        node: GPUNode | None, claim_template: str | None = None) -> dict:
    """The Job that measures the model on a matching node and writes the SLMProfile status.

    It requests one slot, as a replica does: the device plugin refuses more than one under MPS
    ("maximum request size for shared resources is 1", NVIDIA/k8s-device-plugin internal/rm/rm.go),
    and as an MPS client of the plugin every process in the pod gets the replicas' memory/R and
    100/R % caps, so it measures the regime that is deployed. Under DRA the GPU comes from the
    ResourceClaimTemplate `claim_template` (core/dra.py) and no device-plugin resource is requested.
    """
    volumes, mounts = scratch_volumes(spec, own_shm=not mps_client(spec, node))
    # The Job runs up to maxReplicas engines at once, so the per-replica memory limit is not its own.
    limits = {k: v for k, v in spec.resources.limits.items() if k != "memory"}
    resources = {"requests": dict(spec.resources.requests), "limits": limits}
    pod_claims = {}
    if spec.placement == Placement.dra:
        pod_claims = {"resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": claim_template}]}
        resources["claims"] = [{"name": "gpu"}]
    else:
        resources["limits"][spec.gpu.resource_name] = "1"
    labels = {"app.kubernetes.io/name": "slmpack-profiler", PROFILE_LABEL: label_value(profile_owner.name),
              **MANAGED_BY}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": profiling_job_name(profile_owner.name), "namespace": profile_owner.namespace,
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
                    "securityContext": pod_security_context(),
                    **placement(spec, node),
                    "volumes": volumes,
                    **pod_claims,
                    "containers": [{
                        "name": "profiler",
                        "image": conditions.engine_image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["slmpack"],
                        "args": profiler_args(profile_owner.name, profile_owner.namespace, conditions, spec,
                                              max_measured_replicas(spec, node), profiled_sharing(spec, node)),
                        "env": base_env(spec),
                        "resources": resources,
                        "volumeMounts": mounts,
                        "securityContext": restricted_security_context(),
                    }],
                },
            },
        },
    }


def build_profiler_access(namespace: str, cluster_role: str) -> list[dict]:
    """The profiler's ServiceAccount in the profile's namespace, bound to the ClusterRole that may
    only read and patch SLMProfile status."""
    meta = {"namespace": namespace, "labels": dict(MANAGED_BY)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": PROFILER_SERVICE_ACCOUNT, **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": PROFILER_SERVICE_ACCOUNT, **meta},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
         "subjects": [{"kind": "ServiceAccount", "name": PROFILER_SERVICE_ACCOUNT, "namespace": namespace}]},
    ]
