"""Pod discovery for a Prometheus built without Kubernetes service discovery.

Debian's `prometheus` package leaves out `kubernetes_sd_configs`, but keeps `http_sd_configs`.
This server answers Prometheus' HTTP SD with the pods of the cluster, labelled exactly as
`kubernetes_sd_configs` with `role: pod` labels them (Prometheus' discovery/kubernetes/pod.go):
one target per container port, `__meta_kubernetes_pod_*` labels, annotations and labels with
their names sanitized, and no target for a pod without an IP. The same relabel_configs thus work
with either, and swapping this sidecar for `kubernetes_sd_configs: [{role: pod}]` on an upstream
Prometheus changes nothing else.

    python3 pod_sd.py --address 127.0.0.1 --port 8090       # in the Prometheus pod
"""

from __future__ import annotations

import argparse
import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

META = "__meta_kubernetes_"


def sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_target_groups(pod: dict) -> list[dict]:
    """The HTTP SD target groups of one pod, as the Kubernetes API returns it (JSON)."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    ip = status.get("podIP")
    if not ip:
        return []
    ready = next((c["status"].lower() for c in status.get("conditions") or [] if c["type"] == "Ready"), "unknown")
    labels = {
        f"{META}namespace": meta["namespace"], f"{META}pod_name": meta["name"], f"{META}pod_ip": ip,
        f"{META}pod_ready": ready, f"{META}pod_phase": status.get("phase", ""),
        f"{META}pod_node_name": spec.get("nodeName", ""), f"{META}pod_host_ip": status.get("hostIP", ""),
        f"{META}pod_uid": meta.get("uid", ""),
    }
    controller = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
    if controller:
        labels[f"{META}pod_controller_kind"] = controller["kind"]
        labels[f"{META}pod_controller_name"] = controller["name"]
    for kind, values in (("label", meta.get("labels")), ("annotation", meta.get("annotations"))):
        for key, value in (values or {}).items():
            labels[f"{META}pod_{kind}_{sanitize(key)}"] = value
            labels[f"{META}pod_{kind}present_{sanitize(key)}"] = "true"
    # Prometheus' HTTP SD gives each group one label set, so each container port is its own group.
    groups = []
    for container in spec["containers"]:
        ports = container.get("ports") or [None]
        for port in ports:
            target = {f"{META}pod_container_name": container["name"]}
            address = ip
            if port:
                address = f"[{ip}]:{port['containerPort']}" if ":" in ip else f"{ip}:{port['containerPort']}"
                target |= {f"{META}pod_container_port_number": str(port["containerPort"]),
                           f"{META}pod_container_port_name": port.get("name", ""),
                           f"{META}pod_container_port_protocol": port.get("protocol", "TCP")}
            groups.append({"targets": [address], "labels": labels | target})
    return groups


def target_groups(pods: list[dict]) -> list[dict]:
    return [group for pod in pods for group in pod_target_groups(pod)]


def serve(address: str, port: int) -> None:
    from kubernetes import client, config

    config.load_incluster_config()
    core = client.CoreV1Api()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            try:
                raw = core.list_pod_for_all_namespaces(_preload_content=False, _request_timeout=10)
                body, code = json.dumps(target_groups(json.loads(raw.data)["items"])).encode(), 200
            except Exception as error:  # Prometheus keeps the last good targets on an error answer
                body, code = str(error).encode(), 503
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    ThreadingHTTPServer((address, port), Handler).serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    serve(args.address, args.port)
