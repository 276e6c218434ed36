"""The router in front of a pack pod: one HAProxy server per engine port of the pod, each checked on its own
/health, so an engine that dies while its pod stays ready gets no request, and one that dies holding a request
it has not answered has that request sent to another engine. Run by Debian's HAProxy with the agent."""

from __future__ import annotations

import collections
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from slmpack.adapters.haproxy import HAProxyRuntime
from slmpack.api.models import SLMDeploymentSpec
from slmpack.core.router import ADMIN_SOCKET, HEALTH_CHECK, METRICS_PORT, haproxy_config, ready_engines
from slmpack.router.agent import Agent
from tests.unit.test_router import HAPROXY, QuietServer, free_port, needs_haproxy

POD_IP = "127.0.0.1"


class PackEngine:
    """One engine of a pack pod on its own port: /health, and completions naming it. `die_on_next` makes it close
    the next request's connection without answering, and stop, as a killed process does."""

    def __init__(self, name: str, port: int = 0):
        self.name, self.served, self.die_on_next = name, 0, False
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                self.reply(b"{}")

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if engine.die_on_next:
                    self.connection.shutdown(socket.SHUT_RDWR)  # the request reached it; no byte comes back
                    threading.Thread(target=engine.kill).start()
                    return
                time.sleep(0.02)
                engine.served += 1
                self.reply(f'{{"engine": "{engine.name}"}}'.encode())

            def reply(self, body: bytes):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_):
                pass

        self.server = QuietServer((POD_IP, port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kill(self):
        self.server.shutdown()
        self.server.server_close()


def pack_pod_endpoints(pod: str, engines: list[PackEngine]) -> dict:
    """The engines' headless Service's Endpoints: one ready pod, one named port per engine slot."""
    return {"subsets": [{"addresses": [{"ip": POD_IP, "targetRef": {"name": pod}}],
                         "ports": [{"name": f"engine-{i}", "port": e.port} for i, e in enumerate(engines)]}]}


@pytest.fixture
def pack_router(tmp_path):
    deployment = SLMDeploymentSpec.model_validate({"model": {"name": "m"}, "replicas": 3, "placement": "pack-pod"})
    port, metrics = free_port(), free_port()
    socket_path = str(tmp_path / "admin.sock")
    config = haproxy_config(deployment).replace(f"bind :{deployment.port}", f"bind 127.0.0.1:{port}")
    config = config.replace(f"bind :{METRICS_PORT}", f"bind 127.0.0.1:{metrics}").replace(ADMIN_SOCKET, socket_path)
    (tmp_path / "haproxy.cfg").write_text(config)
    log = (tmp_path / "haproxy.log").open("w")
    process = subprocess.Popen([str(HAPROXY), "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=log, stderr=log)
    for _ in range(100):
        if (tmp_path / "admin.sock").exists():
            break
        time.sleep(0.05)
    agent = Agent(HAProxyRuntime(socket_path), "engines", 4, ("engine-0", "engine-1", "engine-2"), resync_s=5,
                  health_check=True)
    yield agent, f"http://127.0.0.1:{port}/v1/completions"
    process.terminate()
    process.wait(5)


def test_each_engine_port_of_a_pack_pod_is_its_own_server():
    engines = {"chat-0-engine-0": f"{POD_IP}:8000", "chat-0-engine-1": f"{POD_IP}:8001"}
    endpoints = {"subsets": [{"addresses": [{"ip": POD_IP, "targetRef": {"name": "chat-0"}}],
                              "ports": [{"name": "engine-0", "port": 8000}, {"name": "engine-1", "port": 8001},
                                        {"name": "supervisor", "port": 8090}]}]}
    assert ready_engines(endpoints, ("engine-0", "engine-1")) == engines


@needs_haproxy
def test_a_killed_engine_of_a_pack_pod_loses_no_request_while_the_others_answer(pack_router):
    agent, url = pack_router
    engines = [PackEngine(f"e{i}") for i in range(3)]
    agent.saw(pack_pod_endpoints("chat-0", engines))
    commands = agent.converge()
    assert f"add server engines/chat-0-engine-1 127.0.0.1:{engines[1].port} maxconn 4 {HEALTH_CHECK}" in commands
    time.sleep(2.5)  # two good checks bring each server up
    answered, failed = collections.Counter(), []
    stop = threading.Event()

    def clients():
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    reply = client.post(url, json={"model": "m", "prompt": "hi"})
                except httpx.HTTPError as error:
                    failed.append(repr(error))
                    continue
                if reply.status_code == 200:
                    answered[reply.json()["engine"]] += 1
                else:
                    failed.append(reply.status_code)

    threads = [threading.Thread(target=clients) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    engines[1].die_on_next = True  # its pod stays ready: the Endpoints do not change
    time.sleep(3)
    before_restart = dict(answered)
    engines[1] = PackEngine("e1-restarted", engines[1].port)  # the supervisor restarts it on its port
    time.sleep(4)  # two good checks, and the agent changes nothing
    assert agent.converge() == []
    stop.set()
    for thread in threads:
        thread.join()
    assert failed == []
    assert before_restart["e0"] > 0 and before_restart["e2"] > 0
    assert answered["e1-restarted"] > 0, answered
