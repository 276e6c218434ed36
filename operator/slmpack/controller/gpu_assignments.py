"""The exporters' GPU assignments (`core/gpu_assignments.py`), list-watched in one namespace as an informer does.

kopf watches a resource in every namespace the operator serves, but these ConfigMaps live in the
release's namespace alone, and that is the one namespace where the operator may read ConfigMaps.
So they get a watch of their own: a daemon thread lists them, watches from the list's
resourceVersion, lists again when the watch ends or its version expires, and hands every change
to the event loop, where the reconciles read `by_uid`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from slmpack.adapters.kube import Kube
from slmpack.core.gpu_assignments import ASSIGNMENTS_LABEL, gpus_by_pod_uid

log = logging.getLogger(__name__)
WATCH_SECONDS = 300
RETRY_SECONDS = 5.0


class GpuAssignments:
    def __init__(self, kube: Kube, namespace: str, on_change: Callable[[set[str]], None]) -> None:
        self.kube, self.namespace, self.on_change = kube, namespace, on_change
        self.config_maps: dict[str, dict] = {}  # by name: one per node
        self.by_uid: dict[str, tuple[str, ...]] = {}  # pod UID -> the GPU UUIDs it was given
        self.running_by_uid: dict[str, tuple[str, ...]] = {}  # pod UID -> where its processes run (NVML)
        self._stop = threading.Event()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        threading.Thread(target=self._follow, args=(loop,), name="gpu-assignments", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    # ---- in the event loop

    def replace_all(self, config_maps: list[dict]) -> None:
        self.config_maps = {c["metadata"]["name"]: c for c in config_maps}
        self._changed()

    def apply(self, kind: str, config_map: dict) -> None:
        name = config_map["metadata"]["name"]
        if kind == "DELETED":
            self.config_maps.pop(name, None)
        else:
            self.config_maps[name] = config_map
        self._changed()

    def _changed(self) -> None:
        given, running = gpus_by_pod_uid(self.config_maps.values()), gpus_by_pod_uid(self.config_maps.values(), True)
        changed = {uid for now, before in ((given, self.by_uid), (running, self.running_by_uid))
                   for uid in now.keys() | before.keys() if now.get(uid) != before.get(uid)}
        self.by_uid, self.running_by_uid = given, running
        if changed:
            self.on_change(changed)

    # ---- in its thread

    def _follow(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._stop.is_set():
            try:
                items, version = self.kube.list_config_maps(self.namespace, ASSIGNMENTS_LABEL)
                loop.call_soon_threadsafe(self.replace_all, items)
                while not self._stop.is_set():
                    for kind, config_map in self.kube.watch_config_maps(self.namespace, ASSIGNMENTS_LABEL, version,
                                                                         WATCH_SECONDS):
                        version = config_map["metadata"]["resourceVersion"]
                        loop.call_soon_threadsafe(self.apply, kind, config_map)
            except Exception as error:  # the apiserver away, or the version expired (410): list again
                if loop.is_closed():  # the operator stopped
                    return
                log.warning("watching the GPU assignments in namespace %s: %s", self.namespace,
                            (str(error) or type(error).__name__).splitlines()[0])
                self._stop.wait(RETRY_SECONDS)
