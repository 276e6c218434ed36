"""`slmpack exporter`: GPU power and energy, attributed to pods, for Prometheus.

Serves `/metrics` and `/healthz`. Without a GPU it still serves: `slmpack_exporter_nvml_up 0`
and the NVML error, and `/healthz` answers 200 with `{"nvml": "down", "error": ...}` (the
process is healthy; the node has no usable GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=9400)
    parser.add_argument("--address", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""),
                        help="this node, for the pod lookup (default $NODE_NAME); empty: no pod attribution")
    parser.add_argument("--fake-devices", metavar="GPUS:PROCESSES",
                        help="development and tests: serve a fake node of GPUS GPUs with PROCESSES engine pods "
                             "each instead of NVML")
    parser.add_argument("--fake-deployment", default="demo", metavar="[NAMESPACE/]NAME",
                        help="the SLMDeployment the fake pods belong to")
    parser.add_argument("--pod-resources-socket", default="/var/lib/kubelet/pod-resources/kubelet.sock",
                        help="the kubelet's PodResources API, to publish which GPUs each engine pod got")
    parser.add_argument("--gpu-assignments-namespace", default=os.environ.get("POD_NAMESPACE", ""),
                        help="where the node's ConfigMap of engine pods' GPU UUIDs goes, the namespace the operator "
                             "reads (default $POD_NAMESPACE); empty: not published")
    parser.add_argument("--gpu-assignments-interval-seconds", type=float, default=15.0,
                        help="how often that ConfigMap is checked against the kubelet's answer; 0: never")
    parser.add_argument("--forget-after-seconds", type=float, default=600.0,
                        help="drop the energy series of a pod gone this long (keeps cardinality bounded; longer "
                             "than Prometheus' scrape interval and rate window)")


def build_collector(args: argparse.Namespace):
    from slmpack.exporter.collector import GpuCollector
    from slmpack.exporter.nvml import NvmlSource

    if args.fake_devices:
        from slmpack.exporter.fake import FakeNvml, FakePods, fake_node

        gpus, _, per_gpu = args.fake_devices.partition(":")
        namespace, _, name = args.fake_deployment.rpartition("/")
        node = fake_node(int(gpus), int(per_gpu or 1), namespace or "default", name)
        return GpuCollector(NvmlSource(FakeNvml(node)), FakePods(node), forget_after_s=args.forget_after_seconds)
    from slmpack.exporter.pods import PodDirectory, kubelet_pods

    pods = PodDirectory(kubelet_pods(args.node_name)) if args.node_name else None
    return GpuCollector(NvmlSource(), pods, forget_after_s=args.forget_after_seconds)


def start_publisher(args: argparse.Namespace) -> None:
    """Publish which GPUs this node's engine pods got, in the background (needs --node-name and a namespace)."""
    import threading
    from functools import partial
    from pathlib import Path

    from slmpack.exporter.gpu_assignments import (
        ConfigMapsApi,
        GpuPublisher,
        engine_pods_lister,
        pod_resources_lister,
        running_gpus,
    )
    from slmpack.exporter.nvml import NvmlSource
    from slmpack.exporter.pods import PodDirectory, kubelet_pods

    socket = Path(args.pod_resources_socket)
    # Also with --fake-devices: on a test bed the GPUs are emulated but the kubelet's answer is real.
    if not args.node_name or not args.gpu_assignments_namespace or args.gpu_assignments_interval_seconds <= 0:
        return
    if not socket.exists():
        log.warning("no PodResources socket at %s: the engine pods' GPUs are not published", socket)
        return
    try:
        # Where the engines' processes run comes from NVML; emulated GPUs have no processes of the real pods.
        list_running = None if args.fake_devices else partial(
            running_gpus, NvmlSource(), PodDirectory(kubelet_pods(args.node_name)))
        publisher = GpuPublisher(args.node_name, args.gpu_assignments_namespace, pod_resources_lister(socket),
                                 engine_pods_lister(args.node_name), ConfigMapsApi(args.gpu_assignments_namespace),
                                 list_running)
    except Exception as error:  # no compiled stubs, no API credentials: metrics still serve
        log.warning("the engine pods' GPUs are not published: %s", error)
        return
    threading.Thread(target=publisher.run, args=(args.gpu_assignments_interval_seconds, threading.Event()),
                     name="gpu-publisher", daemon=True).start()


def run(args: argparse.Namespace) -> int:
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    registry = CollectorRegistry()
    collector = build_collector(args)
    registry.register(collector)
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/healthz":
            body = json.dumps({"nvml": "up" if collector.nvml_up else "down", "error": collector.last_error})
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body.encode()]
        return metrics(environ, start_response)

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *_):  # one line per scrape is noise
            pass

    # One thread per connection: a slow client does not hold up the next scrape or /healthz.
    server = make_server(args.address, args.port, app, server_class=ThreadingWSGIServer, handler_class=QuietHandler)
    list(registry.collect())  # read once now, so a missing GPU is logged at start
    start_publisher(args)
    log.info("serving /metrics and /healthz on %s:%d (NVML %s)", args.address, args.port,
             "up" if collector.nvml_up else f"down: {collector.last_error}")
    # As a container's PID 1 the process ignores a SIGTERM it has no handler for, and every pod
    # deletion would wait out the grace period.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
