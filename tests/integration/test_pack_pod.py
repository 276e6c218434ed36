"""Placement pack-pod on the real test bed: the emulated device plugin shares nothing and hands out whole GPUs,
one pod is admitted with one GPU and runs three stand-in engines under `slmpack supervise`, the router reaches
each engine's port, and an engine process killed on the node is restarted by the supervisor while the others
answer: no request fails."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from kopf.testing import KopfRunner

from tests.fixtures.fake_engine import fake_engine_spec
from tests.integration.test_operator import (  # noqa: F401 (the module's cluster fixture)
    Cluster,
    cluster,
    deployment,
    operator,
    wait,
)
from tests.integration.test_routing import routable, routed  # noqa: F401 (the router's images and role)

pytestmark = [pytest.mark.cluster, pytest.mark.node]


@pytest.fixture
def k(routable, namespace):  # noqa: F811
    return Cluster(routable, namespace)


def engine_pids(name: str, port: int) -> list[int]:
    """The node's processes of the deployment's engine on `port` (the node is this machine)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in argv]
        if "vllm.entrypoints.openai.api_server" in words and name in words and "--port" in words \
                and words[words.index("--port") + 1] == str(port):
            found.append(int(proc.name))
    return found


def test_one_pod_with_one_gpu_serves_its_engines_through_the_router_and_outlives_a_killed_engine(
        k, gpu_node, fake_engines):
    gpu_node(gpus=2, sharing="none", replicas=1)
    spec = fake_engine_spec(fake_engines)
    spec["engine"]["device"] = "gpu"  # the whole-GPU path; the stand-in ignores GPU flags
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment("packed", replicas=3, placement="pack-pod", sharing="time-slicing", **spec))
        wait(lambda: k.status("packed").get("readyReplicas") == 3, 240, "three engines ready")
        pods = k.core.list_namespaced_pod(k.ns, label_selector="slmpack.dev/deployment=packed").items
        assert [p.metadata.name for p in pods] == ["packed-0"]
        [container] = pods[0].spec.containers
        assert container.resources.limits["nvidia.com/gpu"] == "1" and pods[0].status.phase == "Running"
        one_gpu = next(c for c in k.status("packed")["conditions"] if c["type"] == "OneGPU")
        assert one_gpu["reason"] == "OnePodOneGPU"

        url = routed(k, "packed", routers=2)
        ports = collections.Counter()
        with httpx.Client(timeout=30) as one:
            for _ in range(60):
                reply = one.post(url, json={"model": "packed", "prompt": "hi", "max_tokens": 4})
                reply.raise_for_status()
                ports[reply.json()["port"]] += 1
        assert sorted(ports) == [8000, 8001, 8002], ports

        answered, failed, after_kill = collections.Counter(), [], collections.Counter()
        killed = threading.Event()
        stop = threading.Event()

        def traffic():
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    try:
                        reply = client.post(url, json={"model": "packed", "prompt": "hi", "max_tokens": 4})
                        reply.raise_for_status()
                    except httpx.HTTPError as error:
                        failed.append(repr(error))
                        continue
                    port = reply.json()["port"]
                    answered[port] += 1
                    if killed.is_set():
                        after_kill[port] += 1

        clients = [threading.Thread(target=traffic) for _ in range(4)]
        for thread in clients:
            thread.start()
        try:
            time.sleep(2)
            victims = engine_pids("packed", 8001)
            assert victims, "the engine on port 8001 runs on the node"
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            killed.set()
            wait(lambda: engine_pids("packed", 8001) and after_kill[8001] > 0, 120,
                 "the supervisor to restart the killed engine and the router to send it requests again")
            time.sleep(2)
        finally:
            stop.set()
            for thread in clients:
                thread.join()
        assert failed == [], failed
        assert after_kill[8000] > 0 and after_kill[8002] > 0
        pod = k.core.read_namespaced_pod("packed-0", k.ns)
        assert pod.status.container_statuses[0].restart_count == 0  # the supervisor restarted it, not the kubelet
    assert runner.exception is None, runner.output
