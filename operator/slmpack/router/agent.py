"""`slmpack router-agent`: feed HAProxy the ready engines of one deployment, as its Endpoints list them.

It runs next to HAProxy in each router pod. A watch on the engines' Endpoints wakes it at once when a
replica becomes ready or leaves (the Endpoints drop a pod as soon as it is not ready or terminating), and
it also looks every `--resync-seconds`, so a missed event, an agent restart or a restarted HAProxy (which
forgets its run-time servers) converge too. Each look reads HAProxy's servers (`show stat`) and applies
the difference (core/router.py `runtime_commands`): level-triggered, never a replay of events.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

from slmpack.adapters.haproxy import HAProxyRuntime
from slmpack.core.router import ADMIN_SOCKET, BACKEND, parse_stat, ready_engines, runtime_commands

log = logging.getLogger(__name__)
# Runtime API answers that mean success (the others are logged).
DONE = ("", "New server registered.", "Server deleted.")
WATCH_SECONDS = 300


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", required=True, help="the deployment's namespace")
    parser.add_argument("--endpoints", required=True, help="the Endpoints of the engines' headless Service")
    parser.add_argument("--socket", default=ADMIN_SOCKET, help="HAProxy's admin socket")
    parser.add_argument("--backend", default=BACKEND, help="the HAProxy backend of the engines")
    parser.add_argument("--maxconn", type=int, required=True,
                        help="the requests this router sends one engine at most (its share of --max-num-seqs)")
    parser.add_argument("--port-name", action="append", dest="port_names",
                        help="an engine port, by name, in the Endpoints (again for each engine slot of a pack pod; "
                        "default http)")
    parser.add_argument("--health-check", action="store_true",
                        help="have HAProxy check each engine's /health (engines whose pod stays ready while one "
                        "of them restarts)")
    parser.add_argument("--resync-seconds", type=float, default=5.0, help="look again this often without events")


class Agent:
    """The latest Endpoints, and the loop that applies them to HAProxy."""

    def __init__(self, haproxy: HAProxyRuntime, backend: str, maxconn: int, port_names: tuple[str, ...],
                 resync_s: float, health_check: bool = False):
        self.haproxy, self.backend, self.maxconn, self.port_names = haproxy, backend, maxconn, port_names
        self.health_check = health_check
        self.resync_s = resync_s
        self.endpoints: dict | None = None
        self.known = False  # the Endpoints were read at least once: before, nothing is removed
        self.changed = threading.Event()

    def saw(self, endpoints: dict | None) -> None:
        self.endpoints, self.known = endpoints, True
        self.changed.set()

    def converge(self) -> list[str]:
        """One look: HAProxy's servers brought to the ready engines; the commands sent."""
        if not self.known:
            return []
        servers = parse_stat(self.haproxy.command("show stat"), self.backend)
        commands = runtime_commands(servers, ready_engines(self.endpoints, self.port_names), self.maxconn,
                                    self.backend, self.health_check)
        for command in commands:
            answer = self.haproxy.command(command).strip()
            if answer in DONE:
                log.info("%s", command)
            else:
                log.warning("%s: %s", command, answer)
        return commands

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.changed.wait(self.resync_s)
            self.changed.clear()
            try:
                self.converge()
            except OSError as error:  # HAProxy not up yet, or restarting: the next look retries
                log.warning("HAProxy's runtime API at %s: %s", self.haproxy.path, error)


def watch_endpoints(namespace: str, name: str, on_change, stop: threading.Event) -> None:
    """Call `on_change(endpoints or None)` with the named Endpoints now and at every change."""
    from kubernetes import client, watch
    from kubernetes.client.exceptions import ApiException

    from slmpack.adapters.kube import load_config

    api = load_config()
    core = client.CoreV1Api(api)
    selector = f"metadata.name={name}"
    while not stop.is_set():
        try:
            listed = core.list_namespaced_endpoints(namespace, field_selector=selector, _request_timeout=10)
            items = api.sanitize_for_serialization(listed).get("items") or []
            on_change(items[0] if items else None)
            for event in watch.Watch().stream(core.list_namespaced_endpoints, namespace, field_selector=selector,
                                              resource_version=listed.metadata.resource_version,
                                              timeout_seconds=WATCH_SECONDS, _request_timeout=WATCH_SECONDS + 10):
                endpoints = api.sanitize_for_serialization(event["object"])
                on_change(None if event["type"] == "DELETED" else endpoints)
        except (ApiException, OSError, ValueError) as error:
            log.warning("watching Endpoints %s/%s: %s; again in 1 s", namespace, name, error)
            time.sleep(1)
        except Exception as error:  # the client's own errors (urllib3's protocol errors): retried alike
            log.warning("watching Endpoints %s/%s: %r; again in 1 s", namespace, name, error)
            time.sleep(1)


def run(args: argparse.Namespace) -> int:
    agent = Agent(HAProxyRuntime(args.socket), args.backend, args.maxconn, tuple(args.port_names or ["http"]),
                  args.resync_seconds, args.health_check)
    stop = threading.Event()
    threading.Thread(target=watch_endpoints, args=(args.namespace, args.endpoints, agent.saw, stop),
                     name="endpoints", daemon=True).start()
    log.info("following Endpoints %s/%s into HAProxy backend %s (maxconn %d per engine)", args.namespace,
             args.endpoints, args.backend, args.maxconn)
    agent.run(stop)
    return 0
