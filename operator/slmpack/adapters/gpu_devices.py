"""What a container can see of its GPUs: its /dev/nvidia<minor> nodes, and NVML's minor-to-UUID map."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from slmpack.core.gpu_pin import GpuPin, allocated_gpus

log = logging.getLogger(__name__)
GPU_NODE = re.compile(r"nvidia(\d+)")  # not nvidiactl, nvidia-uvm, nvidia-caps


def device_minors(dev: Path = Path("/dev")) -> set[int]:
    try:
        return {int(m.group(1)) for entry in dev.iterdir() if (m := GPU_NODE.fullmatch(entry.name))}
    except OSError:
        return set()


def uuid_by_minor() -> dict[int, str]:
    """NVML's GPUs by minor number; empty where NVML is missing or fails (no driver, no GPU)."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        found = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            found[pynvml.nvmlDeviceGetMinorNumber(handle)] = uuid.decode() if isinstance(uuid, bytes) else uuid
        return found
    except pynvml.NVMLError as error:
        log.warning("NVML could not map device nodes to GPUs: %s", error)
        return {}
    finally:
        pynvml.nvmlShutdown()


def pinned_environment(env: Mapping[str, str] | None = None, dev: Path = Path("/dev")) -> tuple[dict[str, str], GpuPin]:
    """The environment with CUDA_VISIBLE_DEVICES set to the GPUs this container was given, and the decision."""
    env = dict(os.environ if env is None else env)
    minors = device_minors(dev)
    pin = allocated_gpus(env, minors, uuid_by_minor() if minors else {})
    if pin.devices:
        env["CUDA_VISIBLE_DEVICES"] = pin.devices
    return env, pin
