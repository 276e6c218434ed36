"""From a process ID to its pod: /proc/<pid>/cgroup gives the pod UID and container ID, the
API's list of this node's pods gives the pod. The list is cached for a few seconds; a list
that fails or times out keeps the previous one and counts an error, so a scrape never waits
longer than the timeout and never fails for it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slmpack.core.packpod import ENGINE_PORT_PREFIX

log = logging.getLogger(__name__)
MAX_ANCESTORS = 8  # an engine's GPU process is its server's child (vLLM's engine core) or the server itself

DEPLOYMENT_LABEL = "slmpack.dev/deployment"
# cgroup v1 and v2, cgroupfs and systemd drivers, containerd / CRI-O / Docker:
#   .../kubepods/burstable/pod<uid>/<container-id>
#   .../kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<container-id>.scope
POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
CONTAINER_ID = re.compile(r"(?:cri-containerd-|crio-|docker-)?([0-9a-f]{64})(?:\.scope)?$")


@dataclass(frozen=True)
class PodRef:
    namespace: str
    pod: str
    container: str
    slmdeployment: str
    engine: str = ""  # a pack pod's engine (the name of its port); empty for a pod that runs one


UNKNOWN = PodRef("", "", "", "")


def parse_cgroup(text: str) -> tuple[str | None, str | None]:
    """The pod UID and container ID in a /proc/<pid>/cgroup file, or None where absent."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        match = POD_UID.search(path)
        if match:
            container = CONTAINER_ID.search(path.rstrip("/"))
            return match.group(1).replace("_", "-"), container.group(1) if container else None
    return None, None


def pods_by_uid(pod_list: dict) -> dict[str, dict]:
    return {p["metadata"]["uid"]: p for p in pod_list.get("items", [])}


def container_name(pod: dict, container_id: str | None) -> str:
    for status in pod.get("status", {}).get("containerStatuses", []) or []:
        if container_id and (status.get("containerID") or "").endswith(container_id):
            return status["name"]
    containers = pod.get("spec", {}).get("containers", [])
    return containers[0]["name"] if len(containers) == 1 else ""


class PodDirectory:
    """pid → PodRef, with the pod list fetched at most every `ttl_s` seconds."""

    def __init__(self, fetch_pods: Callable[[], dict], proc: Path = Path("/proc"), ttl_s: float = 10) -> None:
        self.fetch_pods, self.proc, self.ttl_s = fetch_pods, proc, ttl_s
        self._pods: dict[str, dict] = {}
        self._fetched_at = float("-inf")
        self.errors = 0  # failed pod lists, for slmpack_exporter_pod_lookup_errors_total

    def _pod_list(self) -> dict[str, dict]:
        if time.monotonic() - self._fetched_at > self.ttl_s:
            # The API being away must not fail a scrape: keep the last list, count the error.
            try:
                self._pods = pods_by_uid(self.fetch_pods())
            except Exception as error:  # any client, TLS or network error
                self.errors += 1
                log.warning("listing this node's pods failed (%d so far), keeping the last list: %s",
                            self.errors, str(error).splitlines()[0] if str(error) else type(error).__name__)
            self._fetched_at = time.monotonic()
        return self._pods

    def lookup(self, pid: int) -> PodRef:
        try:
            text = (self.proc / str(pid) / "cgroup").read_text()
        except OSError:
            return UNKNOWN  # the process exited between the NVML read and now
        uid, container_id = parse_cgroup(text)
        pod = self._pod_list().get(uid) if uid else None
        if pod is None:
            return UNKNOWN
        meta = pod["metadata"]
        return PodRef(meta.get("namespace", ""), meta.get("name", ""), container_name(pod, container_id),
                      (meta.get("labels") or {}).get(DEPLOYMENT_LABEL, ""), self.engine(pid, pod))

    def engine(self, pid: int, pod: dict) -> str:
        """The pack-pod engine a process belongs to: up its parents to the engine's server, whose `--port` is
        the pod's port named engine-<i>. Only world-readable files are read (cmdline, stat): the exporter has
        no capability to read another user's environment."""
        ports = {str(port["containerPort"]): port["name"]
                 for container in (pod.get("spec") or {}).get("containers") or []
                 for port in container.get("ports") or [] if port.get("name", "").startswith(ENGINE_PORT_PREFIX)}
        for _ in range(MAX_ANCESTORS if ports else 0):
            try:
                argv = (self.proc / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
                stat = (self.proc / str(pid) / "stat").read_text()
            except OSError:
                return ""
            port = next((a.split("=", 1)[1] for a in argv if a.startswith("--port=")), None) or next(
                (argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--port"), None)
            if port is not None:
                return ports.get(port, "")
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent: the field after the state
            if pid <= 1:
                return ""
        return ""


LIST_TIMEOUT_S = (3.0, 5.0)  # connect, read


def kubelet_pods(node_name: str, timeout_s: tuple[float, float] = LIST_TIMEOUT_S) -> Callable[[], dict]:
    """The pods on this node, through the API (field selector on the node), with a timeout."""
    from kubernetes import client

    from slmpack.adapters.kube import load_config

    api = client.CoreV1Api(load_config())

    def fetch() -> dict:
        pods = api.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node_name}",
                                               _request_timeout=timeout_s)
        return api.api_client.sanitize_for_serialization(pods)

    return fetch
