"""The profiling pod's slot holders, seen from the profiler: which GPUs their slots are on.

The pod holds one device-plugin slot per engine it may run: its own container's, and one per holder container
(core/manifests.py, `slot_holder`). Each holder writes the NVIDIA_VISIBLE_DEVICES it was given into the shared
directory, then waits for `done`, which the shell that runs the profiler writes once the profiler has ended,
however it ended: the holders end with the profiler, and the Job's pod completes or fails as the profiler did.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from slmpack.core.manifests import slot_holder_name

log = logging.getLogger(__name__)


def holder_gpus(directory: Path, holders: int, timeout_s: float = 60.0) -> list[str | None]:
    """What each of the `holders` containers was given (NVIDIA_VISIBLE_DEVICES), None for one that never said."""
    names = [slot_holder_name(i) for i in range(1, holders + 1)]
    deadline = time.monotonic() + timeout_s
    while not all((directory / n).exists() for n in names) and time.monotonic() < deadline:
        time.sleep(0.5)
    found = [(directory / n).read_text().strip() if (directory / n).exists() else None for n in names]
    if None in found:
        log.warning("%d of %d slot holders did not say which GPU they hold", found.count(None), holders)
    return found
