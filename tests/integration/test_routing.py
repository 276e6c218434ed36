"""The router on the real test bed, with stand-in engines: one keep-alive client reaches every replica, a
replica and a router that leave finish their streams while the traffic goes on without a failure, and a burst beyond
the engines' caps and the queue gets 429 with Retry-After. The deployment's Service keeps its name and port."""

from __future__ import annotations

import collections
import threading
import time

import httpx
import pytest
from kopf.testing import KopfRunner
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from slmpack.core.router import BACKEND, METRICS_PORT, router_selector
from tests.fixtures.cluster import local_image
from tests.fixtures.fake_engine import ENGINE_CPU, fake_engine_spec
from tests.integration.test_operator import (  # noqa: F401 (the module's cluster fixture)
    Cluster,
    Traffic,
    cluster,
    deployment,
    operator,
    ready_profile,
    wait,
)

pytestmark = [pytest.mark.cluster, pytest.mark.node]
ROUTER_IMAGES = ("slmpack/router:0.1.0", "slmpack/operator:0.1.0")


@pytest.fixture(scope="module")
def routable(cluster):  # noqa: F811
    """The router's images on the node, and the ClusterRole the chart gives routers (read Endpoints)."""
    for image in (ENGINE_CPU, *ROUTER_IMAGES):
        local_image(image)
    rbac = client.RbacAuthorizationV1Api(cluster)
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "slmpack-router"},
            "rules": [{"apiGroups": [""], "resources": ["endpoints"], "verbs": ["get", "list", "watch"]}]}
    created = False
    try:
        rbac.create_cluster_role(role)
        created = True
    except client.ApiException as error:
        if error.status != 409:
            raise
    yield cluster
    # The chart installs a ClusterRole of this name and refuses to adopt one it did not make: a later
    # `helm install` on this cluster (the chart tests, `make e2e`) must not find ours.
    if created:
        rbac.delete_cluster_role("slmpack-router")


@pytest.fixture
def k(routable, namespace):
    return Cluster(routable, namespace)


def router_total(k, name: str, metric: str, proxy: str = BACKEND) -> float:
    """One HAProxy series of one proxy, summed over the deployment's ready router pods (their metrics port)."""
    selector = ",".join(f"{key}={value}" for key, value in router_selector(name).items())
    pods = [pod for pod in k.core.list_namespaced_pod(k.ns, label_selector=selector).items
            if pod.status.pod_ip and any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])]
    texts = [httpx.get(f"http://{pod.status.pod_ip}:{METRICS_PORT}/metrics", timeout=10).text for pod in pods]
    return sum(sample.value for text in texts for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == metric and sample.labels.get("proxy") == proxy)


def routed(k, name: str, routers: int) -> str:
    """The Service's URL once it selects the deployment's ready routers and kube-proxy sends its traffic there:
    the Service reached the engines until a router was ready, and kube-proxy applies a new selector a little late."""
    def ready():
        service = k.core.read_namespaced_service(name, k.ns)
        router = k.apps.read_namespaced_deployment(f"{name}-router", k.ns)
        return service.spec.selector.get("app.kubernetes.io/name") == "slmpack-router" \
            and (router.status.ready_replicas or 0) >= routers and service
    service = wait(ready, 180, "the Service to select the ready routers")
    assert [p.port for p in service.spec.ports] == [8000]
    url = f"http://{service.spec.cluster_ip}:8000/v1/completions"

    def answered_by_a_router():
        before = router_total(k, name, "haproxy_frontend_http_requests_total", "api")
        try:
            httpx.post(url, json={"model": name, "prompt": "hi", "max_tokens": 1}, timeout=30).raise_for_status()
        except httpx.HTTPError:
            return False  # the switch is under way: ask again
        return router_total(k, name, "haproxy_frontend_http_requests_total", "api") > before
    wait(answered_by_a_router, 60, "a request to the Service to reach a router, not an engine")
    return url


def test_one_keep_alive_client_reaches_every_replica(k, fake_engines):
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment("chat", replicas=3, **fake_engine_spec(fake_engines)))
        wait(lambda: k.status("chat").get("readyReplicas") == 3, 180, "three replicas ready")
        url = routed(k, "chat", routers=2)
        answered = collections.Counter()
        with httpx.Client(timeout=30) as one:  # one pooled keep-alive connection, as the OpenAI client keeps
            for _ in range(60):
                reply = one.post(url, json={"model": "chat", "prompt": "hi", "max_tokens": 4})
                reply.raise_for_status()
                answered[reply.json()["engine"]] += 1
    assert runner.exception is None, runner.output
    assert sorted(answered) == ["chat-0", "chat-1", "chat-2"], answered
    assert max(answered.values()) <= 1.25 * min(answered.values()), answered


def stream(url: str, results: list, key: str = "Bearer sk-test", tokens: int = 8) -> None:
    """A streamed completion of `tokens` events, 0.5 s apart (the stand-in's pace), and [DONE]."""
    try:
        with httpx.stream("POST", url, json={"model": "chat", "prompt": "hi", "max_tokens": tokens, "stream": True},
                          headers={"Authorization": key}, timeout=60) as reply:
            events = [line for line in reply.iter_lines() if line.startswith("data:")]
        results.append((reply.status_code, events))
    except httpx.HTTPError as error:
        results.append((None, [repr(error)]))


def test_a_leaving_replica_and_a_leaving_router_finish_their_streams_and_no_request_fails(k, fake_engines):
    """Streams of 15 s, longer than the 10 s a leaving replica keeps serving before its engine's SIGTERM: the
    engine finishes them (vLLM's --shutdown-timeout), and so does the router pod deleted at the same time
    (HAProxy's soft stop, the router image's stop signal)."""
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment("chat", replicas=3, **fake_engine_spec(fake_engines)))
        wait(lambda: k.status("chat").get("readyReplicas") == 3, 180, "three replicas ready")
        url = routed(k, "chat", routers=2)
        traffic = Traffic(url)
        traffic.start()
        streams: list = []
        threads = [threading.Thread(target=stream, args=(url, streams), kwargs={"tokens": 30}) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1)
        k.patch("chat", {"replicas": 2})  # chat-2 leaves while it streams
        router = k.core.list_namespaced_pod(k.ns, label_selector="app.kubernetes.io/name=slmpack-router").items[0]
        k.core.delete_namespaced_pod(router.metadata.name, k.ns)  # and so does a router
        for t in threads:
            t.join()
        wait(lambda: len(k.core.list_namespaced_pod(k.ns, label_selector="slmpack.dev/deployment=chat").items) == 2,
             120, "the third replica gone")
        time.sleep(2)  # requests keep coming while the router is replaced
        traffic.stop.set()
        traffic.join()
    assert runner.exception is None, runner.output
    assert [code for code, _ in streams] == [200] * 6, streams
    assert all(len(events) == 31 for _, events in streams), streams  # every stream whole, [DONE] included
    assert traffic.failures == [] and traffic.ok > 10


def test_beyond_the_caps_and_the_queue_clients_get_429_with_retry_after(k, fake_engines):
    ready_profile(k, "knee-2", knee=2)
    spec = {**fake_engine_spec(fake_engines), "profiling": {"profileRef": "knee-2"},
            "routing": {"routerReplicas": 1, "queueLength": 1, "queueWaitSeconds": 20}}
    with KopfRunner(operator(k.ns)) as runner:
        k.create(deployment("chat", **spec))
        status = wait(lambda: (s := k.status("chat")).get("readyReplicas") and s["readyReplicas"] == s["replicas"]
                      and s, 180, "the replicas ready")
        url = routed(k, "chat", routers=1)
        held = status["replicas"] * status["plan"]["maxNumSeqs"]  # what the engines may hold, then 1 in the queue
        streams: list = []
        threads = [threading.Thread(target=stream, args=(url, streams), kwargs={"tokens": 20}) for _ in range(held + 1)]
        for t in threads:
            t.start()

        def engines_full_and_one_queued():
            return (router_total(k, "chat", "haproxy_server_current_sessions"),
                    router_total(k, "chat", "haproxy_backend_current_queue")) == (held, 1)
        wait(engines_full_and_one_queued, 10, f"the router to hold {held} streams on the engines and 1 in its queue")
        refused = httpx.post(url, json={"model": "chat", "prompt": "hi"}, timeout=30)
        for t in threads:
            t.join()
    assert runner.exception is None, runner.output
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1", refused.text
    assert [code for code, _ in streams] == [200] * (held + 1)  # the queued one was served once a slot freed
