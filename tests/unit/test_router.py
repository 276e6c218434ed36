"""The router: its rendered HAProxy configuration run by a real HAProxy (Debian's 2.6) in front of stand-in
engines, fed by the agent as the router pod runs it; the objects the operator writes for it; the
InferencePool against the upstream CRD's own schema."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from slmpack.adapters.haproxy import HAProxyRuntime
from slmpack.api.models import Plan, SLMDeploymentSpec
from slmpack.core.decide import ClusterSnapshot, decide
from slmpack.core.manifests import Owner, selector_labels
from slmpack.core.router import (
    ADMIN_SOCKET,
    METRICS_PORT,
    RouterImages,
    Server,
    build_inference_pool,
    build_router,
    haproxy_config,
    parse_stat,
    per_router_cap,
    ready_engines,
    router_selector,
    runtime_commands,
)
from slmpack.router.agent import Agent
from tests.unit.test_decide import H100

ROOT = Path(__file__).resolve().parents[2]
POOL_CRD = ROOT / "tests/data/gateway-api-inference-extension/v1.6.0/inference.networking.k8s.io_inferencepools.yaml"
OWNER = Owner(kind="SLMDeployment", name="chat", uid="u-1", namespace="team")
HAPROXY = shutil.which("haproxy") or (Path("/usr/sbin/haproxy") if Path("/usr/sbin/haproxy").exists() else None)
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (make system-deps)")


def spec(**routing) -> SLMDeploymentSpec:
    return SLMDeploymentSpec.model_validate({"model": {"name": "m"}, "replicas": 2, "routing": routing})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- stand-in engines


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # HAProxy closing an idle keep-alive connection is no error


class Engine:
    """An OpenAI-like engine that streams `chunks` SSE events `gap_s` apart, counting what it takes and serves and
    the most requests it held at once. With `dies_after`, it drops each request as a killed engine process
    does: after that many chunks, none (0) being before it answers a byte."""

    def __init__(self, name: str, chunks: int = 3, gap_s: float = 0.05, dies_after: int | None = None):
        self.name, self.taken, self.served, self.in_flight, self.most, self.auth = name, 0, 0, 0, 0, set()
        self.sent: list[float] = []  # when each chunk left the engine (perf_counter)
        self.lock = threading.Lock()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with engine.lock:
                    engine.taken += 1
                    engine.in_flight += 1
                    engine.most = max(engine.most, engine.in_flight)
                    engine.auth.add(self.headers.get("Authorization"))
                done = False

                def finished(served: bool = True):
                    nonlocal done
                    if not done:
                        done = True
                        with engine.lock:
                            engine.in_flight -= 1
                            engine.served += served

                def die():
                    finished(served=False)
                    self.close_connection = True  # gone, with no end of the stream

                try:
                    if dies_after == 0:
                        return die()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(chunks):
                        data = f"data: {{\"engine\": \"{engine.name}\", \"i\": {i}}}\n\n".encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                        engine.sent.append(time.perf_counter())
                        if dies_after == i + 1:
                            return die()
                        time.sleep(gap_s)
                    # Counted out before the last chunk: once HAProxy has it, it may send the next request at
                    # once, and that one must not be counted beside this one.
                    finished()
                    self.wfile.write(b"0\r\n\r\n")
                finally:
                    finished()

            def log_message(self, *_):
                pass

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def endpoints(*engines: Engine) -> dict:
    """The Endpoints object the engines' headless Service would have, with these ready."""
    return {"subsets": [{"addresses": [{"ip": e.address.split(":")[0], "targetRef": {"name": e.name}}],
                         "ports": [{"name": "http", "port": int(e.address.split(":")[1])}]} for e in engines]}


class Router:
    """HAProxy started on the rendered configuration (ports and socket moved to free ones), and the agent."""

    def __init__(self, tmp: Path, deployment: SLMDeploymentSpec, maxconn: int):
        self.port, metrics = free_port(), free_port()
        socket_path = str(tmp / "admin.sock")
        config = haproxy_config(deployment).replace(f"bind :{deployment.port}", f"bind 127.0.0.1:{self.port}")
        config = config.replace(f"bind :{METRICS_PORT}", f"bind 127.0.0.1:{metrics}").replace(ADMIN_SOCKET,
                                                                                              socket_path)
        (tmp / "haproxy.cfg").write_text(config)
        self.process = subprocess.Popen([str(HAPROXY), "-db", "-f", str(tmp / "haproxy.cfg")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url, self.metrics = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{metrics}"
        for _ in range(100):
            if Path(socket_path).exists():
                break
            time.sleep(0.05)
        self.runtime = HAProxyRuntime(socket_path)
        self.agent = Agent(self.runtime, "engines", maxconn, ("http",), resync_s=5)

    def follow(self, *engines: Engine) -> list[str]:
        self.agent.saw(endpoints(*engines))
        return self.agent.converge()

    def close(self):
        self.process.terminate()
        self.process.wait(5)


@pytest.fixture
def router(tmp_path):
    made = []

    def start(deployment: SLMDeploymentSpec, maxconn: int) -> Router:
        made.append(Router(tmp_path, deployment, maxconn))
        return made[-1]

    yield start
    for r in made:
        r.close()


def complete(url: str, client: httpx.Client | None = None, key: str = "Bearer sk-test") -> httpx.Response:
    send = client.post if client else httpx.post
    return send(f"{url}/v1/completions", json={"model": "m", "prompt": "hi", "stream": True},
                headers={"Authorization": key}, timeout=30)


# ---------------------------------------------------------------- the configuration, run


@needs_haproxy
def test_the_rendered_configuration_is_valid_for_haproxy(tmp_path):
    path = tmp_path / "haproxy.cfg"
    path.write_text(haproxy_config(spec(queueLength=5, queueWaitSeconds=2)).replace(ADMIN_SOCKET,
                                                                                    str(tmp_path / "a.sock")))
    checked = subprocess.run([str(HAPROXY), "-c", "-f", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


@needs_haproxy
def test_one_keep_alive_client_reaches_every_engine_and_none_holds_more_than_its_cap(router):
    engines = [Engine(f"chat-{i}") for i in range(3)]
    r = router(spec(), maxconn=2)
    r.follow(*engines)
    with httpx.Client() as client:  # one pooled client, as the OpenAI client is
        threads = [threading.Thread(target=lambda: [complete(r.url, client) for _ in range(5)]) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    served = [e.served for e in engines]
    assert sum(served) == 30 and min(served) >= 6, served  # by load, not by connection
    assert max(e.most for e in engines) <= 2  # the per-router cap
    # Authorization reaches the engines as the client sent it: they enforce the key, not the router.
    assert set().union(*(e.auth for e in engines)) == {"Bearer sk-test"}
    for e in engines:
        e.close()


@needs_haproxy
def test_streams_pass_through_as_they_are_generated(router):
    engine = Engine("chat-0", chunks=3, gap_s=0.4)
    r = router(spec(), maxconn=4)
    r.follow(engine)
    arrivals = []
    with httpx.stream("POST", f"{r.url}/v1/chat/completions", json={"stream": True}, timeout=30) as reply:
        for line in reply.iter_lines():
            if line:
                arrivals.append(time.perf_counter())
    assert len(arrivals) == 3
    # Each chunk as the engine wrote it, 0.4 s apart, not all at once when the stream ends.
    assert arrivals[1] - arrivals[0] > 0.3 and arrivals[2] - arrivals[1] > 0.3
    # And at once: by default HAProxy asks the kernel to hold small writes for more (MSG_MORE), up to 200 ms,
    # which a token stream pays on its first token and on every one after a pause. Timed from the engine's
    # write, so a busy machine's slower connection set-up does not count.
    assert arrivals[0] - engine.sent[0] < 0.12, (arrivals, engine.sent)
    engine.close()


@needs_haproxy
@pytest.mark.parametrize("signal_name", ["SIGUSR1", "SIGTERM"])
def test_the_router_images_stop_signal_lets_a_stream_in_flight_finish(router, signal_name):
    """The kubelet stops a router with its image's stop signal. SIGUSR1, HAProxy's soft stop, lets a stream in
    flight finish and then exits; SIGTERM, the default, cuts it: so the image must say SIGUSR1."""
    stop_signal = re.search(r"^STOPSIGNAL (\w+)$", (ROOT / "images/router.Dockerfile").read_text(), re.M)
    assert stop_signal and stop_signal.group(1) == "SIGUSR1"
    engine = Engine("chat-0", chunks=6, gap_s=0.3)
    r = router(spec(), maxconn=4)
    r.follow(engine)
    events, cut = [], False
    try:
        with httpx.stream("POST", f"{r.url}/v1/completions", json={"stream": True}, timeout=30) as reply:
            for line in filter(None, reply.iter_lines()):
                if not events:
                    r.process.send_signal(getattr(signal, signal_name))
                events.append(line)
    except httpx.RemoteProtocolError:
        cut = True
    r.process.wait(10)  # HAProxy has exited either way
    if signal_name == "SIGUSR1":
        assert len(events) == 6 and not cut, events
    else:
        assert len(events) < 6 and cut, events
    engine.close()


@needs_haproxy
def test_beyond_the_queue_clients_get_429_and_after_the_wait_503_both_with_retry_after(router):
    engine = Engine("chat-0", chunks=1, gap_s=3.0)
    r = router(spec(queueLength=1, queueWaitSeconds=1), maxconn=1)
    r.follow(engine)
    results: dict[str, httpx.Response] = {}

    def send(label):
        results[label] = complete(r.url)

    first = threading.Thread(target=send, args=("served",))
    first.start()
    time.sleep(0.3)
    queued = threading.Thread(target=send, args=("queued",))
    queued.start()
    time.sleep(0.3)
    refused = complete(r.url)  # the queue holds one already
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "queue is full" in refused.json()["error"]["message"]
    queued.join()
    first.join()
    assert results["queued"].status_code == 503 and results["queued"].headers["Retry-After"] == "1"
    assert results["served"].status_code == 200
    assert engine.served == 1  # the engine never held more than its cap
    engine.close()


@needs_haproxy
def test_a_leaving_engine_finishes_its_streams_and_gets_no_new_request(router):
    staying, leaving = Engine("chat-0", chunks=4, gap_s=0.3), Engine("chat-1", chunks=4, gap_s=0.3)
    r = router(spec(), maxconn=1)
    r.follow(staying, leaving)
    replies: list[httpx.Response] = []
    streams = [threading.Thread(target=lambda: replies.append(complete(r.url))) for _ in range(2)]
    for t in streams:
        t.start()
    deadline = time.monotonic() + 1.0  # both streams start well within one (1.2 s long)
    while (staying.in_flight, leaving.in_flight) != (1, 1) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert leaving.in_flight == 1
    commands = r.follow(staying)  # chat-1 left the Endpoints (terminating) while streaming
    assert commands == ["disable server engines/chat-1"]
    before = leaving.served + leaving.in_flight
    for _ in range(3):
        assert complete(r.url).status_code == 200
    for t in streams:
        t.join()
    assert [reply.status_code for reply in replies] == [200, 200]
    assert all(reply.text.count("data:") == 4 for reply in replies)  # the leaving engine's stream finished
    assert leaving.served == before  # and it got nothing new
    assert r.agent.converge() == ["del server engines/chat-1"]  # idle now: removed
    assert [s.name for s in parse_stat(r.runtime.command("show stat"))] == ["chat-0"]
    staying.close()
    leaving.close()


def backend_counter(metrics_url: str, name: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(httpx.get(metrics_url).text)
               for sample in family.samples if sample.name == name and sample.labels.get("proxy") == "engines")


@needs_haproxy
def test_a_request_its_engine_dropped_unanswered_is_retried_and_a_cut_stream_is_counted(router):
    dying, serving = Engine("chat-0", dies_after=0), Engine("chat-1")
    r = router(spec(), maxconn=4)
    r.follow(dying, serving)
    with httpx.Client() as client:
        replies = [complete(r.url, client) for _ in range(8)]
    # Nothing had reached the client from the dying engine, so every request it took went to the other.
    assert [reply.status_code for reply in replies] == [200] * 8 and serving.served == 8
    assert dying.taken >= 1
    assert backend_counter(f"{r.metrics}/metrics", "haproxy_backend_retry_warnings_total") >= dying.taken
    # A stream its engine cut cannot be retried (the client has its first tokens): it fails, and is counted.
    cutting = Engine("chat-2", dies_after=1)
    r.follow(cutting)
    with pytest.raises(httpx.RemoteProtocolError):
        complete(r.url)
    assert cutting.taken == 1
    assert backend_counter(f"{r.metrics}/metrics", "haproxy_backend_server_aborts_total") == 1
    for engine in (dying, serving, cutting):
        engine.close()


@needs_haproxy
def test_the_exporter_shows_each_engine_in_flight_and_the_queue(router):
    engine = Engine("chat-0")
    r = router(spec(), maxconn=3)
    r.follow(engine)
    assert complete(r.url).status_code == 200
    metrics = httpx.get(f"{r.metrics}/metrics").text
    assert 'haproxy_server_current_sessions{proxy="engines",server="chat-0"}' in metrics
    assert 'haproxy_backend_current_queue{proxy="engines"}' in metrics
    assert 'haproxy_server_max_sessions{proxy="engines",server="chat-0"}' in metrics
    # Every series the dashboard's routing panels select is one this HAProxy exports.
    series = [(sample.name, sample.labels) for family in text_string_to_metric_families(metrics)
              for sample in family.samples]
    for name, matchers in dashboard_router_selectors():
        assert any(n == name and all(re.fullmatch(value, labels.get(label, "")) if op == "=~"
                                     else labels.get(label) == value for label, op, value in matchers)
                   for n, labels in series), f"no {name}{matchers} in the router's /metrics"
    assert httpx.get(f"{r.metrics}/healthz").status_code == 200
    r.follow()  # no engine ready: the router reports itself not ready
    assert httpx.get(f"{r.metrics}/healthz").status_code == 503
    engine.close()


def dashboard_router_selectors() -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, operator, value)]) of every HAProxy series the dashboard queries."""
    dashboard = json.loads((ROOT / "deploy/grafana/slmpack-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    selectors = [(name, re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', body))
                 for expr in exprs for name, body in re.findall(r"(haproxy_\w+)\{([^}]*)\}", expr)]
    assert len(selectors) >= 4, "the dashboard's routing row is gone"
    return selectors


# ---------------------------------------------------------------- the agent's decisions


def test_runtime_commands_add_move_drain_and_remove():
    held = [Server("a", "10.0.0.1:8000", False, 0), Server("b", "10.0.0.2:8000", False, 2),
            Server("c", "10.0.0.3:8000", True, 0), Server("d", "10.0.0.4:8000", True, 1),
            Server("e", "10.0.0.5:8000", True, 0)]
    wanted = {"a": "10.0.0.9:8000", "e": "10.0.0.5:8000", "f": "10.0.0.6:8000"}
    assert runtime_commands(held, wanted, maxconn=4) == [
        "set server engines/a addr 10.0.0.9 port 8000",
        "enable server engines/e",
        "add server engines/f 10.0.0.6:8000 maxconn 4", "enable server engines/f",
        "disable server engines/b",  # still streaming: no new request, its own go on
        "del server engines/c",  # idle and gone
        # d: in maintenance with a request in flight, kept until it ends
    ]
    assert runtime_commands([Server("a", "10.0.0.1:8000", False, 3)], {"a": "10.0.0.1:8000"}, 4) == []


def test_only_ready_addresses_of_the_engines_port_are_followed():
    found = ready_engines({"subsets": [{
        "addresses": [{"ip": "10.0.0.1", "targetRef": {"kind": "Pod", "name": "chat-0"}}],
        "notReadyAddresses": [{"ip": "10.0.0.2", "targetRef": {"kind": "Pod", "name": "chat-1"}}],
        "ports": [{"name": "http", "port": 8000}]}]})
    assert found == {"chat-0": "10.0.0.1:8000"}
    assert ready_engines(None) == {}


# ---------------------------------------------------------------- the objects the operator writes


def test_each_router_sends_an_engine_its_share_of_max_num_seqs():
    assert [per_router_cap(8, 2), per_router_cap(7, 2), per_router_cap(1, 2), per_router_cap(8, 1)] == [4, 3, 1, 8]
    plan = Plan(replicas=2, max_num_seqs=8)
    router = build_router(OWNER, spec(routerReplicas=2), plan, RouterImages())
    agent = next(c for c in router["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
    assert agent["args"][agent["args"].index("--maxconn") + 1] == "4"
    assert router["spec"]["replicas"] == 2


def deployment_body(**routing) -> dict:
    return {"apiVersion": "slmpack.dev/v1alpha1", "kind": "SLMDeployment",
            "metadata": {"name": "chat", "namespace": "team", "uid": "u-1", "generation": 1},
            "spec": {"model": {"name": "m"}, "replicas": 1, "routing": routing}}


NODE = H100


def service_of(decision) -> dict:
    return next(o for o in decision.apply if o["kind"] == "Service" and o["metadata"]["name"] == "chat")


def test_routing_is_on_by_default_and_the_service_moves_to_the_routers_once_one_is_ready():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    before = decide(deployment_body(), ClusterSnapshot(nodes=(NODE,)), now)
    kinds = [o["kind"] for o in before.apply]
    assert {"Deployment", "ConfigMap", "PodDisruptionBudget", "ServiceAccount", "RoleBinding"} <= set(kinds)
    # No router ready yet (a new deployment, or one from before the router): the engines answer directly.
    assert service_of(before)["spec"]["selector"] == selector_labels("chat")
    after = decide(deployment_body(), ClusterSnapshot(nodes=(NODE,), routers_ready=1), now)
    service = service_of(after)
    assert service["spec"]["selector"] == router_selector("chat")
    assert service["spec"]["ports"] == service_of(before)["spec"]["ports"]  # same name, same port for clients
    statefulset = next(o for o in after.apply if o["kind"] == "StatefulSet")
    assert statefulset["spec"]["serviceName"] == "chat"  # immutable, unchanged: no pack is rolled
    engines = next(o for o in after.apply if o["kind"] == "Service" and o["metadata"]["name"] == "chat-engines")
    assert engines["spec"]["clusterIP"] == "None" and engines["spec"]["selector"] == selector_labels("chat")


def test_mode_service_keeps_the_plain_service_and_writes_no_router():
    decision = decide(deployment_body(mode="service"), ClusterSnapshot(nodes=(NODE,), routers_ready=2),
                      datetime(2026, 1, 1, tzinfo=UTC))
    assert [o["kind"] for o in decision.apply] == ["Service", "PodDisruptionBudget", "StatefulSet"]
    assert service_of(decision)["spec"]["selector"] == selector_labels("chat")


def test_leaving_router_mode_deletes_the_deployments_own_routers_only():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    routed = decide(deployment_body(), ClusterSnapshot(nodes=(NODE,), routers_ready=2), now)
    router = next(o for o in routed.apply if o["kind"] == "Deployment")
    ours = {**router, "metadata": {**router["metadata"], "uid": "r-1"}}
    copied = {**router, "metadata": {**router["metadata"], "name": "copy", "uid": "r-2", "ownerReferences": []}}
    assert routed.delete == []
    for mode in ("service", "inferencePool"):
        left = decide(deployment_body(mode=mode, endpointPickerRef={"name": "chat-epp"}),
                      ClusterSnapshot(nodes=(NODE,), routers_ready=2, routers=(ours, copied)), now)
        assert [o["metadata"]["uid"] for o in left.delete] == ["r-1"]
        assert "Deployment" not in [o["kind"] for o in left.apply]
        assert service_of(left)["spec"]["selector"] == selector_labels("chat")
        assert any(e.reason == "RouterRemoved" for e in left.events)
    kept = decide(deployment_body(), ClusterSnapshot(nodes=(NODE,), routers_ready=2, routers=(ours,)), now)
    assert kept.delete == []


def test_mode_inference_pool_without_a_picker_is_refused_naming_the_field():
    decision = decide(deployment_body(mode="inferencePool"), ClusterSnapshot(nodes=(NODE,)),
                      datetime(2026, 1, 1, tzinfo=UTC))
    refused = next(c for c in decision.status.conditions if c.type == "InvalidSpec")
    assert refused.status == "True" and "spec.routing.endpointPickerRef" in refused.message


def test_the_inference_pool_is_valid_against_the_upstream_crd_schema():
    crd = yaml.safe_load(POOL_CRD.read_text())
    assert crd["metadata"]["annotations"]["inference.networking.k8s.io/bundle-version"] == "v1.6.0"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    decision = decide(deployment_body(mode="inferencePool", endpointPickerRef={"name": "chat-epp"}),
                      ClusterSnapshot(nodes=(NODE,)), datetime(2026, 1, 1, tzinfo=UTC))
    pool = next(o for o in decision.apply if o["kind"] == "InferencePool")
    assert pool["apiVersion"] == f"{crd['spec']['group']}/v1"
    jsonschema.validate(pool, openapi_to_json_schema(version["schema"]["openAPIV3Schema"]))
    # The CRD's CEL rule (an apiserver >= 1.25 checks it): a Service picker needs its port.
    picker = pool["spec"]["endpointPickerRef"]
    assert picker["kind"] != "Service" or "port" in picker
    # What the endpoint picker scrapes: the engines' pods on the port vLLM serves /metrics on.
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["selector"]["matchLabels"] == selector_labels("chat")
    # The pool never takes the clients' Service: it still reaches the engines.
    assert service_of(decision)["spec"]["selector"] == selector_labels("chat")
    for broken in ({"targetPorts": [{"number": 0}]}, {"selector": {}}, {"endpointPickerRef": {"name": "x", "port": 1}}):
        wrong = build_inference_pool(OWNER, spec(mode="inferencePool", endpointPickerRef={"name": "x"}))
        wrong["spec"].update(broken)
        with pytest.raises(jsonschema.ValidationError):  # the check can fail
            jsonschema.validate(wrong, openapi_to_json_schema(version["schema"]["openAPIV3Schema"]))


def openapi_to_json_schema(node):
    """The CRD's structural schema as JSON Schema: Kubernetes' extensions dropped, objects closed as the
    apiserver prunes unknown fields (so an unknown field fails here rather than vanishing)."""
    if isinstance(node, list):
        return [openapi_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("type") == "object" and "properties" in node:
        out.setdefault("additionalProperties", False)
    if "metadata" in out.get("properties", {}):
        out["properties"]["metadata"] = {"type": "object"}
    return out
