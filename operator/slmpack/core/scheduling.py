"""spec.scheduling as pod spec fields (pure): tolerations, runtime and priority class, image pull secrets."""

from __future__ import annotations

from slmpack.api.models import Device, Placement, SLMDeploymentSpec

# The taint GPU pools carry (the GPU Operator's and cloud providers' GPU node pools, the DRA driver's examples).
GPU_TAINT_KEY = "nvidia.com/gpu"


def tolerations(spec: SLMDeploymentSpec) -> list[dict]:
    """The spec's tolerations, and a GPU pod's toleration of its GPU taint unless the spec has it already.

    A pod that requests an extended resource such as `nvidia.com/gpu` gets `<resource>:NoSchedule`
    tolerated by the ExtendedResourceToleration admission plugin, which clusters may leave off; a DRA
    pod requests a claim, not an extended resource, so the plugin adds nothing and it would stay
    Pending on a pool tainted `nvidia.com/gpu:NoSchedule` (kubernetes
    plugin/pkg/admission/extendedresourcetoleration/admission.go). The DRA driver's own examples add
    that toleration (kubernetes-sigs/dra-driver-nvidia-gpu demo/specs/quickstart). So every GPU pod
    carries what the admission plugin would give it: the device plugin's resource name as the key,
    and `nvidia.com/gpu` under DRA.
    """
    own = [t.to_wire() for t in spec.scheduling.tolerations]
    if spec.engine.device != Device.gpu:
        return own
    key = GPU_TAINT_KEY if spec.placement == Placement.dra else spec.gpu.resource_name
    if not any(t.tolerates({"key": key, "effect": "NoSchedule"}) for t in spec.scheduling.tolerations):
        own.append({"key": key, "operator": "Exists", "effect": "NoSchedule"})
    return own


def scheduling(spec: SLMDeploymentSpec) -> dict:
    """The pod spec's tolerations, runtime and priority class and image pull secrets (spec.scheduling)."""
    chosen = spec.scheduling
    fields: dict = {}
    if found := tolerations(spec):
        fields["tolerations"] = found
    if chosen.runtime_class_name:
        fields["runtimeClassName"] = chosen.runtime_class_name
    if chosen.priority_class_name:
        fields["priorityClassName"] = chosen.priority_class_name
    if chosen.image_pull_secrets:
        fields["imagePullSecrets"] = [{"name": name} for name in chosen.image_pull_secrets]
    return fields
