"""Manifest builders: spec and plan in, Kubernetes objects (plain dicts) out (pure).

Children of an SLMDeployment carry an ownerReference to it, so deleting the
deployment removes them through garbage collection, with no finalizer. The
SLMProfile is not owned by any deployment: it is reusable. Its profiling Job is
owned by the profile.
"""

from __future__ import annotations

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

MANAGED_BY = {"app.kubernetes.io/managed-by": "slmpack"}
DEPLOYMENT_LABEL = f"{API_GROUP}/deployment"
PROFILE_LABEL = f"{API_GROUP}/profile"
PROFILE_KEY_LABEL = f"{API_GROUP}/profile-key"
PROFILER_SERVICE_ACCOUNT = "slmpack-profiler"
ENGINE_UID = 10001
# Long enough for a cold engine start on a CPU (about 90 s) or a large GPU model download.
STARTUP_SECONDS = 900
DRA_DRIVER = "gpu.nvidia.com"


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


def dns_name(*parts: str, limit: int = 63) -> str:
    """A DNS-1123 label from the parts, cut to `limit` characters."""
    text = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    return text[:limit].rstrip("-")


def engine_labels(deployment: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "slmpack-engine", "app.kubernetes.io/instance": deployment,
            DEPLOYMENT_LABEL: deployment, **MANAGED_BY}


def selector_labels(deployment: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "slmpack-engine", DEPLOYMENT_LABEL: deployment}


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
    return dns_name(model, limit=50) + "-" + conditions.key()


def profiling_job_name(profile: str) -> str:
    return dns_name("profile", profile)


# ---------------------------------------------------------------- pod pieces


def restricted_security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def pod_security_context() -> dict:
    return {"runAsNonRoot": True, "runAsUser": ENGINE_UID, "runAsGroup": ENGINE_UID, "fsGroup": ENGINE_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def scratch_volumes(spec: SLMDeploymentSpec) -> tuple[list[dict], list[dict]]:
    """Writable /tmp (caches, compiled kernels), shared memory for the engine, and the model volume."""
    volumes = [{"name": "tmp", "emptyDir": {}}, {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]
    source = spec.model.volume
    if source is not None:
        if source.host_path:
            volumes.append({"name": "model", "hostPath": {"path": source.host_path, "type": "Directory"}})
        else:
            volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": source.persistent_volume_claim,
                                                                       "readOnly": True}})
        mounts.append({"name": "model", "mountPath": source.mount_path, "readOnly": True})
    return volumes, mounts


def base_env(spec: SLMDeploymentSpec) -> list[dict]:
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/hf"}]
    if spec.engine.device == Device.cpu:
        env.append({"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(spec.engine.cpu_kv_cache_space_gib)})
    return env + [e.to_wire() for e in spec.engine.env]


def node_selector(spec: SLMDeploymentSpec, node: str | None) -> dict[str, str]:
    selector = dict(spec.gpu.node_selector)
    if spec.gpu.product:
        selector["nvidia.com/gpu.product"] = spec.gpu.product
    if node:
        # All pods of a pack share one GPU, so they must land on one node.
        selector["kubernetes.io/hostname"] = node
    return selector


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
    return args + list(spec.engine.extra_args)


def mps_env(plan: Plan) -> list[dict]:
    if plan.mps_active_thread_percentage is None:
        return []
    env = [{"name": "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "value": str(plan.mps_active_thread_percentage)}]
    if plan.mps_pinned_memory_limit_mib:
        env.append({"name": "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "value": f"0={plan.mps_pinned_memory_limit_mib}M"})
    return env


# ---------------------------------------------------------------- SLMDeployment children


def build_statefulset(owner: Owner, spec: SLMDeploymentSpec, plan: Plan, node: str | None) -> dict:
    """One StatefulSet per GPU pack; OrderedReady so replicas start one by one and measure free memory right."""
    volumes, mounts = scratch_volumes(spec)
    resources = {"requests": dict(spec.resources.requests), "limits": dict(spec.resources.limits)}
    pod_spec: dict = {
        "securityContext": pod_security_context(),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "nodeSelector": node_selector(spec, node),
        "volumes": volumes,
        "terminationGracePeriodSeconds": 30,
    }
    if spec.placement == Placement.dra:
        pod_spec["resourceClaims"] = [{"name": "gpu", "resourceClaimName": resource_claim_name(owner.name)}]
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
        "env": base_env(spec) + mps_env(plan) + [{"name": k, "value": v} for k, v in
                                                  cpu_threads_env(plan.cpu_threads_per_replica).items()],
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": STARTUP_SECONDS // 5},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6},
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": restricted_security_context(),
    }]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": owner.name, "namespace": owner.namespace, "labels": engine_labels(owner.name),
                     "ownerReferences": [owner.reference()]},
        "spec": {
            "replicas": plan.replicas,
            "serviceName": owner.name,
            "podManagementPolicy": "OrderedReady",
            "selector": {"matchLabels": selector_labels(owner.name)},
            "template": {
                "metadata": {"labels": engine_labels(owner.name),
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
        "metadata": {"name": owner.name, "namespace": owner.namespace, "labels": engine_labels(owner.name),
                     "ownerReferences": [owner.reference()]},
        "spec": {"type": "ClusterIP", "selector": selector_labels(owner.name),
                 "ports": [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}]},
    }


def service_endpoint(owner: Owner, spec: SLMDeploymentSpec) -> str:
    return f"http://{owner.name}.{owner.namespace}.svc:{spec.port}/v1"


def resource_claim_name(deployment: str) -> str:
    return dns_name(deployment, "gpu")


def build_resource_claim(owner: Owner, spec: SLMDeploymentSpec, plan: Plan) -> dict:
    """DRA: one claim per pack, shared by all its pods, with the NVIDIA driver's sharing settings."""
    if spec.sharing == Sharing.mps:
        sharing = {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": plan.mps_active_thread_percentage}}
        if plan.mps_pinned_memory_limit_mib:
            sharing["mpsConfig"]["defaultPinnedDeviceMemoryLimit"] = f"{plan.mps_pinned_memory_limit_mib}Mi"
    else:
        sharing = {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Default"}}
    request = {"name": "gpu", "deviceClassName": DRA_DRIVER}
    if spec.gpu.product:
        request["selectors"] = [{"cel": {"expression":
                                         f'device.attributes["{DRA_DRIVER}"].productName == "{spec.gpu.product}"'}}]
    return {
        "apiVersion": "resource.k8s.io/v1beta1",
        "kind": "ResourceClaim",
        "metadata": {"name": resource_claim_name(owner.name), "namespace": owner.namespace,
                     "labels": engine_labels(owner.name), "ownerReferences": [owner.reference()]},
        "spec": {"devices": {
            "requests": [request],
            "config": [{"requests": ["gpu"], "opaque": {"driver": DRA_DRIVER, "parameters": {
                "apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig", "sharing": sharing}}}],
        }},
    }


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


def profiler_args(profile: str, namespace: str, conditions: ProfileConditions, spec: SLMDeploymentSpec) -> list[str]:
    policy = spec.profiling
    args = ["profile", "--engine", "vllm", "--device", conditions.device.value,
            "--model", conditions.model, "--dtype", conditions.dtype.value,
            "--max-model-len", str(conditions.max_model_len),
            "--input-tokens", str(policy.workload.input_tokens), "--output-tokens", str(policy.workload.output_tokens),
            "--rule", policy.rule.value,
            "--efficiency-threshold-percent", str(policy.efficiency_threshold_percent),
            "--latency-factor", str(policy.latency_factor),
            "--max-replicas", str(policy.max_replicas),
            "--requests-per-point", str(policy.requests_per_point),
            "--sharing", spec.sharing.value, "--confidence-percent", str(policy.confidence_percent),
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
                        node: str | None, gpu_slots: int, backoff_limit: int = 2) -> dict:
    """The Job that measures the model on a whole GPU of a matching node and writes the SLMProfile status."""
    volumes, mounts = scratch_volumes(spec)
    # The Job runs up to maxReplicas engines at once, so the per-replica memory limit is not its own.
    limits = {k: v for k, v in spec.resources.limits.items() if k != "memory"}
    resources = {"requests": dict(spec.resources.requests), "limits": limits}
    # Every sharing slot of the GPU, so nothing else runs on it while it is measured.
    resources["limits"][spec.gpu.resource_name] = str(gpu_slots)
    labels = {"app.kubernetes.io/name": "slmpack-profiler", PROFILE_LABEL: profile_owner.name, **MANAGED_BY}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": profiling_job_name(profile_owner.name), "namespace": profile_owner.namespace,
                     "labels": labels, "ownerReferences": [profile_owner.reference()]},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": PROFILER_SERVICE_ACCOUNT,
                    "securityContext": pod_security_context(),
                    "nodeSelector": node_selector(spec, node),
                    "volumes": volumes,
                    "containers": [{
                        "name": "profiler",
                        "image": conditions.engine_image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["slmpack"],
                        "args": profiler_args(profile_owner.name, profile_owner.namespace, conditions, spec),
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
