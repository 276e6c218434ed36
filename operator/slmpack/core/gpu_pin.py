"""Which GPUs an engine container was given, so that it can pin CUDA to them (CUDA_VISIBLE_DEVICES).

The device plugin's MPS daemon does not restrict which GPUs its clients see (NVIDIA/k8s-device-plugin
cmd/mps-control-daemon/mps/daemon.go: "TODO: Set CUDA_VISIBLE_DEVICES to include only the devices for this
resource type"; k8s-device-plugin#1299 shows a one-slot pod seeing and using both GPUs of its node). CUDA
enumerates through the MPS server, and vLLM takes `cuda:0`, so on a multi-GPU node every engine would land on
the first GPU whatever slot it holds. The container itself still says what it was given:

- **NVIDIA_VISIBLE_DEVICES** with GPU (or MIG) UUIDs: the plugin's default envvar strategy with
  deviceIDStrategy uuid (internal/plugin/server.go), MPS included;
- **device nodes** `/dev/nvidia<minor>` under CDI, where the toolkit's spec injects each allocated GPU's node
  and sets NVIDIA_VISIBLE_DEVICES=void for every container (nvidia-container-toolkit pkg/nvcdi: the common
  edits carry the env, each device's edits its node). NVML maps a minor number to its UUID.

A CUDA_VISIBLE_DEVICES the user set is kept. When neither source names a GPU (indices, `all`, no node), the
engine starts unpinned and says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

NOT_DEVICES = {"", "all", "none", "void"}


def device_list(value: str) -> list[str]:
    return [d.strip() for d in value.split(",") if d.strip()]


def names_gpus(value: str) -> bool:
    """Whether a device list names its GPUs (or MIG devices) by UUID, not by index, `all` or `void`."""
    listed = device_list(value)
    return bool(listed) and all(d.startswith(("GPU-", "MIG-")) for d in listed)


@dataclass(frozen=True)
class GpuPin:
    """CUDA_VISIBLE_DEVICES to set (None: leave the environment as it is), and why."""

    devices: str | None
    reason: str


def allocated_gpus(env: Mapping[str, str], device_minors: set[int], uuid_by_minor: Mapping[int, str]) -> GpuPin:
    """The GPUs this container was given, from its environment, its /dev/nvidia<minor> nodes and NVML's
    minor-to-UUID map."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return GpuPin(None, f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} is set: kept")
    given = env.get("NVIDIA_VISIBLE_DEVICES")
    if names_gpus(given or ""):
        return GpuPin(",".join(device_list(given)), "the GPUs NVIDIA_VISIBLE_DEVICES names")
    if device_minors and device_minors <= set(uuid_by_minor):
        return GpuPin(",".join(uuid_by_minor[m] for m in sorted(device_minors)),
                      f"the GPUs of the device nodes {', '.join(f'/dev/nvidia{m}' for m in sorted(device_minors))}")
    why = (f"NVIDIA_VISIBLE_DEVICES={given!r} names no GPU by UUID" if given not in (None, *NOT_DEVICES)
           else "no GPU UUID in NVIDIA_VISIBLE_DEVICES")
    if device_minors:
        why += f", and NVML names no GPU for the device nodes (minors {sorted(device_minors)})"
    else:
        why += ", and no /dev/nvidia<minor> device node"
    return GpuPin(None, f"not pinned: {why}; CUDA uses every GPU it sees")


def profiling_slots(own: str, holders: list[str | None], max_replicas: int) -> tuple[int, str]:
    """How many replicas the profiling pod may measure, and what to say, from the GPUs its slots are on.

    The pod holds one slot per engine it may run (its own container's and one per slot holder), so the
    scheduler counts what the engines use. The plugin's default `distributed` policy may put those slots on
    several GPUs; the engines all run on the profiler's own GPU, so only the slots there are the engines'.
    `own` and `holders` are NVIDIA_VISIBLE_DEVICES of the profiler and of each holder (None: it never said)."""
    held = 1 + len(holders)
    if not names_gpus(own) or any(h is None for h in holders):
        return max_replicas, (f"held {held} slot(s); on which GPUs is not visible here (NVIDIA_VISIBLE_DEVICES="
                              f"{own!r}, as under CDI), so that they share one GPU is not verified")
    elsewhere = [h for h in holders if h != own]
    if not elsewhere:
        return max_replicas, f"held {held} slot(s), all on {own}"
    measured = min(max_replicas, held - len(elsewhere))
    others = ", ".join(sorted(set(elsewhere)))
    return measured, (f"held {held} slot(s), {len(elsewhere)} of them on another GPU ({others}) by the device "
                      f"plugin's allocation policy: measured up to {measured} replica(s) on {own}, whose other "
                      "slots other pods may use meanwhile")
