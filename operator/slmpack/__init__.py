"""slmpack: profile small language models and pack their replicas onto shared GPUs."""

__version__ = "0.1.0"
API_GROUP = "slmpack.dev"
API_VERSION = "v1alpha1"

# Set on engine pods by the node's exporter: the UUIDs of the GPUs the device plugin gave the pod's
# containers, as the kubelet's PodResources API reports them (comma-separated). The operator reads it
# to show which GPU each replica runs on and to detect a pack split across GPUs.
GPU_UUIDS_ANNOTATION = f"{API_GROUP}/gpu-uuids"
