"""Request routing in front of a deployment's engines, as configuration (pure).

Kubernetes Services balance connections, and HTTP clients keep theirs alive, so a plain Service
leaves a new replica idle until connections churn. With `spec.routing.mode: router` (the default)
the deployment's Service reaches HAProxy instead, which, per request:

- sends it to the engine with the fewest requests in flight (`balance leastconn`), across all packs;
- never sends an engine more than its share of the deployed `--max-num-seqs` (per-server `maxconn`):
  with R router pods each sends at most floor(max_num_seqs / R), at least 1, so together they stay
  within the engine's cap (when R > max_num_seqs the 1 per router may add up past it);
- keeps the rest in its queue, at most `queueLength` long and `queueWaitSeconds` long, and refuses beyond
  with 429 (queue full) or 503 (waited too long), both with Retry-After;
- passes the request and the answer through as they are: headers (Authorization included, which the
  engines check), streamed chunks unbuffered, every route.

Like an ingress controller, a small agent next to HAProxy (`slmpack router-agent`) follows the engines'
Endpoints and applies them through HAProxy's runtime API: a ready replica is added as a server named
after its pod, one that leaves the Endpoints (not ready, terminating) is put in maintenance at once, so
it gets no new request while its streams finish, and is deleted from HAProxy once idle. The
configuration below holds no server: it changes only with the spec, never with the replicas.

This module renders the HAProxy configuration, the router's Kubernetes objects, the agent's runtime
commands and, for `mode: inferencePool`, the InferencePool. HAProxy's manual for 2.6 (Debian bookworm's)
is the reference for every keyword used here.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass

from slmpack.api.models import Placement, Plan, SLMDeploymentSpec
from slmpack.core.manifests import (
    DEPLOYMENT_LABEL,
    FINISH_SECONDS,
    MANAGED_BY,
    Owner,
    allowed_peers,
    build_ingress_policy,
    dns_name,
    label_value,
    pod_security_context,
    restricted_security_context,
    selector_labels,
)
from slmpack.core.packpod import engine_port_name

DEFAULT_ROUTER_IMAGE = "slmpack/router:0.1.0"  # HAProxy from Debian (images/router.Dockerfile)
DEFAULT_AGENT_IMAGE = "slmpack/operator:0.1.0"  # `slmpack router-agent`
ROUTER_CLUSTER_ROLE = "slmpack-router"  # the chart's: get, list and watch Endpoints
ROUTER_SERVICE_ACCOUNT = "slmpack-router"
# The router images' own user. Routers use no GPU, so the engines' UID setting (an MPS matter) leaves them be.
ROUTER_UID = 10001
ROUTER_LABEL = "slmpack.dev/router"  # on router pods; never the deployment label, which marks engine pods
BACKEND = "engines"
ADMIN_SOCKET_DIR = "/run/haproxy"
ADMIN_SOCKET = f"{ADMIN_SOCKET_DIR}/admin.sock"
METRICS_PORT = 8404
HEALTH_PATH = "/healthz"
# How long a stopping router keeps taking requests while the Service drops it, before HAProxy's soft stop
# (which closes its listeners and lets the requests it holds finish).
ROUTER_DRAIN_SECONDS = 5
# A streamed generation may pause between tokens for a long time under load; HAProxy's inactivity
# timeouts must not end it.
STREAM_IDLE_SECONDS = 600
RETRY_AFTER_SECONDS = 1
# A pack pod's engine is checked on its own port (vLLM's /health, `option httpchk` below): down after one failed
# check, up after two good ones.
HEALTH_CHECK = "check inter 1s fall 1 rise 2 observe layer4 error-limit 1 on-error mark-down"


@dataclass(frozen=True)
class RouterImages:
    """The images of the router pod: HAProxy, and the agent that feeds it the engines."""

    haproxy: str = DEFAULT_ROUTER_IMAGE
    agent: str = DEFAULT_AGENT_IMAGE


DEFAULT_IMAGES = RouterImages()


# ---------------------------------------------------------------- names


def router_name(deployment: str) -> str:
    """The router's Deployment, ConfigMap and PodDisruptionBudget."""
    return dns_name(deployment, "router")


def engines_service_name(deployment: str) -> str:
    """The headless Service over the engine pods, whose Endpoints the router follows."""
    return dns_name(deployment, "engines")


def router_selector(deployment: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "slmpack-router", ROUTER_LABEL: label_value(deployment)}


def per_router_cap(max_num_seqs: int, routers: int) -> int:
    """The requests one router sends one engine at most: its share of the engine's cap, at least one."""
    return max(1, max_num_seqs // routers)


# ---------------------------------------------------------------- HAProxy's configuration


def error_body(message: str, kind: str) -> str:
    """An OpenAI-shaped error, so clients show why; inside single quotes in HAProxy's configuration."""
    if "'" in message or "\\" in message:
        raise ValueError(f"no quote or backslash in a router error message: {message}")
    return '{"error":{"message":"' + message + '","type":"' + kind + '","code":null}}'


def haproxy_config(spec: SLMDeploymentSpec) -> str:
    """HAProxy's configuration for one deployment's router; its servers come from the agent."""
    routing = spec.routing
    full = error_body(f"the router queue is full ({routing.queue_length} requests wait for a free engine)",
                      "overloaded")
    late = error_body(f"no engine was free within {routing.queue_wait_seconds} s, or none is ready", "overloaded")
    retry = f"hdr Retry-After {RETRY_AFTER_SECONDS}"
    return f"""\
# Rendered by slmpack from SLMDeployment spec.routing; servers are added at run time by slmpack router-agent.
global
    stats socket {ADMIN_SOCKET} mode 600 level admin
    # A soft stop lets the requests in flight finish, up to the pod's grace period.
    hard-stop-after {STREAM_IDLE_SECONDS}s

defaults
    mode http
    log stdout format raw local0 err
    option dontlognull
    option httplog
    # Tokens go out as the engine writes them: by default HAProxy asks the kernel to hold small writes for more
    # (MSG_MORE), up to 200 ms, which a token stream pays on its first token and after every pause.
    option http-no-delay
    timeout connect 5s
    timeout http-request 30s
    timeout client {STREAM_IDLE_SECONDS}s
    timeout server {STREAM_IDLE_SECONDS}s
    timeout http-keep-alive 60s
    # The bounded wait for a free engine: past it the request is refused with 503.
    timeout queue {routing.queue_wait_seconds}s

frontend api
    bind :{spec.port}
    # Every request is balanced on its own, whatever connection it came on (no prefer-last-server).
    option http-keep-alive
    # The bounded queue: one more request than it holds is refused at once.
    http-request return status 429 content-type application/json {retry} string '{full}' \
if {{ queue({BACKEND}) ge {max(routing.queue_length, 1)} }}
    default_backend {BACKEND}

backend {BACKEND}
    balance leastconn
    # A request that found no connection (an engine gone between two Endpoints updates), or whose engine
    # closed it before answering a byte (it died), goes to another engine: nothing reached the client yet.
    retries 2
    retry-on conn-failure empty-response
    # The whole request is read before an engine is chosen, so that a retry can send it again.
    option http-buffer-request
    option redispatch 1
    # Used only for servers added with `check` (a pack pod's engines).
    option httpchk GET /health
    http-reuse safe
    http-error status 503 content-type application/json {retry} string '{late}'

frontend stats
    bind :{METRICS_PORT}
    # Ready while HAProxy runs and knows an engine that takes requests.
    monitor-uri {HEALTH_PATH}
    monitor fail if {{ nbsrv({BACKEND}) lt 1 }}
    http-request use-service prometheus-exporter if {{ path /metrics }}
"""


# ---------------------------------------------------------------- the router's objects


def router_meta(owner: Owner, name: str) -> dict:
    labels = {"app.kubernetes.io/name": "slmpack-router", "app.kubernetes.io/instance": label_value(owner.name),
              DEPLOYMENT_LABEL: label_value(owner.name), **MANAGED_BY}
    return {"name": name, "namespace": owner.namespace, "labels": labels, "ownerReferences": [owner.reference()]}


def engine_port_names(pack_pod_engines: int | None) -> list[str]:
    """The engines' ports by name: one per replica pod, or one per engine slot of a pack pod."""
    if pack_pod_engines is None:
        return ["http"]
    return [engine_port_name(i) for i in range(pack_pod_engines)]


def build_engines_service(owner: Owner, spec: SLMDeploymentSpec, pack_pod_engines: int | None = None) -> dict:
    """Headless: its Endpoints list the ready engines for the router; no virtual IP, no kube-proxy rules.
    For pack pods (`pack_pod_engines` engines each) it lists one named port per engine slot, so the router
    sends each request to an engine, not to the pod."""
    meta = router_meta(owner, engines_service_name(owner.name))
    meta["labels"]["app.kubernetes.io/name"] = "slmpack-engine"
    ports = [{"name": name, "port": spec.port + i, "targetPort": name, "protocol": "TCP"}
             for i, name in enumerate(engine_port_names(pack_pod_engines))]
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"clusterIP": "None", "selector": selector_labels(owner.name), "ports": ports}}


def build_router_config(owner: Owner, spec: SLMDeploymentSpec) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": router_meta(owner, router_name(owner.name)),
            "data": {"haproxy.cfg": haproxy_config(spec)}}


def build_router(owner: Owner, spec: SLMDeploymentSpec, plan: Plan, images: RouterImages) -> dict:
    """The router pods: HAProxy, and the agent that feeds it the engines' endpoints."""
    routing = spec.routing
    name = router_name(owner.name)
    config = haproxy_config(spec)
    pack_pod_args = []
    if spec.placement == Placement.pack_pod:
        # One server per engine port; the pod stays ready while one engine restarts, so HAProxy checks each.
        pack_pod_args = [arg for port in engine_port_names(plan.replicas) for arg in ("--port-name", port)]
        pack_pod_args.append("--health-check")
    labels = {**router_selector(owner.name), "app.kubernetes.io/instance": label_value(owner.name), **MANAGED_BY}
    health = {"httpGet": {"path": HEALTH_PATH, "port": "metrics"}}
    resources = {"requests": {"cpu": "100m", "memory": "64Mi", "ephemeral-storage": "16Mi"},
                 "limits": {"memory": "256Mi"}}
    haproxy = {
        "name": "haproxy",
        "image": images.haproxy,
        "imagePullPolicy": "IfNotPresent",
        "command": ["haproxy", "-db", "-f", "/etc/haproxy/haproxy.cfg"],
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "readinessProbe": {**health, "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 6, "initialDelaySeconds": 60},
        # Keep taking requests until the Service has dropped this pod. Then the kubelet sends the image's stop
        # signal, SIGUSR1 (images/router.Dockerfile, as HAProxy's own image does), HAProxy's soft stop: it
        # closes its listeners and exits once the requests it holds have finished. SIGTERM would cut them.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(ROUTER_DRAIN_SECONDS)]}}},
        "resources": resources,
        "volumeMounts": [{"name": "config", "mountPath": "/etc/haproxy", "readOnly": True},
                         {"name": "admin", "mountPath": ADMIN_SOCKET_DIR}],
        "securityContext": restricted_security_context(),
    }
    agent = {
        "name": "agent",
        "image": images.agent,
        "imagePullPolicy": "IfNotPresent",
        "args": ["router-agent", "--namespace", owner.namespace, "--endpoints", engines_service_name(owner.name),
                 "--socket", ADMIN_SOCKET, "--backend", BACKEND,
                 "--maxconn", str(per_router_cap(plan.max_num_seqs, routing.router_replicas)), *pack_pod_args],
        # Its resident memory is about 135 MB (Python, the Kubernetes client, one Endpoints watch).
        "resources": {"requests": {"cpu": "20m", "memory": "160Mi", "ephemeral-storage": "16Mi"},
                      "limits": {"memory": "256Mi"}},
        "volumeMounts": [{"name": "admin", "mountPath": ADMIN_SOCKET_DIR}],
        "securityContext": restricted_security_context(),
    }
    pod_spec = {
        "serviceAccountName": ROUTER_SERVICE_ACCOUNT,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(ROUTER_UID),
        # A stream in flight may take minutes; HAProxy's soft stop waits for it as long as an engine finishes
        # its requests when it stops.
        "terminationGracePeriodSeconds": ROUTER_DRAIN_SECONDS + FINISH_SECONDS + 10,
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                               "labelSelector": {"matchLabels": router_selector(owner.name)}}}]}},
        "containers": [haproxy, agent],
        "volumes": [{"name": "config", "configMap": {"name": name}},
                    {"name": "admin", "emptyDir": {"sizeLimit": "1Mi"}}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": router_meta(owner, name),
        "spec": {
            "replicas": routing.router_replicas,
            "selector": {"matchLabels": router_selector(owner.name)},
            # A new router is ready before an old one goes: clients always find one.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels, "annotations": {
                    # A new configuration rolls the routers (a mounted ConfigMap changes late, and HAProxy
                    # reads it only at start).
                    "slmpack.dev/config-hash": hashlib.sha256(config.encode()).hexdigest()[:16],
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                    "prometheus.io/path": "/metrics"}},
                "spec": pod_spec,
            },
        },
    }


def build_router_disruption_budget(owner: Owner, api_version: str = "policy/v1") -> dict:
    """Voluntary disruptions (a node drain) take one router at a time, so another keeps serving.
    `api_version`: policy/v1 (Kubernetes >= 1.21), or policy/v1beta1 before."""
    return {"apiVersion": api_version, "kind": "PodDisruptionBudget",
            "metadata": router_meta(owner, router_name(owner.name)),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": router_selector(owner.name)}}}


def build_router_network_policy(owner: Owner, spec: SLMDeploymentSpec, operator_peer: dict | None) -> dict:
    """With spec.networkPolicy the routers admit whom the engines would: the listed peers on the clients' port,
    and the operator on HAProxy's metrics port (the queue, for the autoscaler). The engines' policy admits the
    routers, so without this one anyone could reach the engines through them."""
    ingress = []
    if peers := allowed_peers(spec):
        ingress.append({"from": peers, "ports": [{"protocol": "TCP", "port": spec.port}]})
    if operator_peer is not None:
        ingress.append({"from": [operator_peer], "ports": [{"protocol": "TCP", "port": METRICS_PORT}]})
    return build_ingress_policy(router_meta(owner, router_name(owner.name)), router_selector(owner.name), ingress)


def build_router_access(namespace: str, cluster_role: str = ROUTER_CLUSTER_ROLE) -> list[dict]:
    """The router's ServiceAccount in the namespace, bound there to the ClusterRole that may only read
    Endpoints: the agent sees the namespace's endpoints and nothing else."""
    meta = {"namespace": namespace, "labels": dict(MANAGED_BY)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": ROUTER_SERVICE_ACCOUNT, **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": ROUTER_SERVICE_ACCOUNT, **meta},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
         "subjects": [{"kind": "ServiceAccount", "name": ROUTER_SERVICE_ACCOUNT, "namespace": namespace}]},
    ]


# ---------------------------------------------------------------- InferencePool (opt-in)

INFERENCE_POOL_API = "inference.networking.k8s.io/v1"


def build_inference_pool(owner: Owner, spec: SLMDeploymentSpec) -> dict:
    """An InferencePool over the engine pods, for a cluster whose gateway routes with an endpoint picker
    (Gateway API Inference Extension v1). The picker scrapes each pod's /metrics on the target port,
    where vLLM serves `vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc`, the names it reads
    for vLLM."""
    picker = spec.routing.endpoint_picker_ref
    if picker is None:
        raise ValueError("spec.routing.endpointPickerRef is required with mode inferencePool")
    meta = router_meta(owner, dns_name(owner.name))
    meta["labels"]["app.kubernetes.io/name"] = "slmpack-engine"
    return {"apiVersion": INFERENCE_POOL_API, "kind": "InferencePool", "metadata": meta,
            "spec": {"selector": {"matchLabels": selector_labels(owner.name)},
                     "targetPorts": [{"number": spec.port}],
                     "endpointPickerRef": {"kind": "Service", "name": picker.name, "port": {"number": picker.port},
                                           "failureMode": picker.failure_mode}}}


# ---------------------------------------------------------------- the agent's runtime commands


@dataclass(frozen=True)
class Server:
    """An engine as HAProxy holds it (a row of `show stat`)."""

    name: str
    address: str  # ip:port
    in_maintenance: bool
    sessions: int  # requests in flight


def parse_stat(text: str, backend: str = BACKEND) -> list[Server]:
    """The servers of `backend` from the runtime API's `show stat` (CSV with a `# ` header)."""
    rows = csv.DictReader(text.removeprefix("# ").splitlines())
    return [Server(name=row["svname"], address=row.get("addr") or "", in_maintenance=row["status"].startswith("MAINT"),
                   sessions=int(row["scur"] or 0))
            for row in rows if row.get("pxname") == backend and row["svname"] not in ("FRONTEND", "BACKEND")]


def ready_engines(endpoints: dict | None, port_names: tuple[str, ...] = ("http",)) -> dict[str, str]:
    """Server name -> ip:port of the ready addresses of an Endpoints object (as the API returns it): not-ready
    and terminating pods are not among them. With one port name a server is named after its pod; with
    several (a pack pod's engine slots) after its pod and port, one server per engine."""
    found = {}
    for subset in (endpoints or {}).get("subsets") or []:
        ports = {p.get("name"): p["port"] for p in subset.get("ports") or []
                 if p.get("name") in port_names or (p.get("name") is None and len(port_names) == 1)}
        for address in subset.get("addresses") or []:
            pod = (address.get("targetRef") or {}).get("name") or address["ip"].replace(".", "-").replace(":", "-")
            for port_name, port in ports.items():
                name = pod if len(port_names) == 1 else f"{pod}-{port_name}"
                found[name] = f"{address['ip']}:{port}"
    return found


def runtime_commands(servers: list[Server], wanted: dict[str, str], maxconn: int,
                     backend: str = BACKEND, health_check: bool = False) -> list[str]:
    """The runtime API commands that bring HAProxy's servers to `wanted` (server -> ip:port).

    A new engine is added with the per-router cap, then enabled (dynamic servers start in maintenance);
    with `health_check` HAProxy also asks its /health every second and sends it nothing while that fails
    (a pack pod's engine that restarts while its pod stays ready);
    one whose pod got another address moves there; one no longer wanted is put in maintenance (no new
    request; the ones it holds go on) and deleted once it holds none."""
    commands = []
    held = {s.name: s for s in servers}
    for name, address in sorted(wanted.items()):
        server = held.get(name)
        if server is None:
            if health_check:  # dynamic servers inherit no default-server settings: all are given here
                commands += [f"add server {backend}/{name} {address} maxconn {maxconn} {HEALTH_CHECK}",
                             f"enable health {backend}/{name}"]
            else:
                commands.append(f"add server {backend}/{name} {address} maxconn {maxconn}")
            commands.append(f"enable server {backend}/{name}")
            continue
        if server.address != address:
            ip, _, port = address.rpartition(":")
            commands.append(f"set server {backend}/{name} addr {ip} port {port}")
        if server.in_maintenance:
            commands.append(f"enable server {backend}/{name}")
    for server in sorted(servers, key=lambda s: s.name):
        if server.name in wanted:
            continue
        if not server.in_maintenance:
            commands.append(f"disable server {backend}/{server.name}")
        elif server.sessions == 0:
            commands.append(f"del server {backend}/{server.name}")
    return commands
