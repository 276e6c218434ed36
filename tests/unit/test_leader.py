"""Leader election's deadlines (controller/leader.py) and the Kubernetes client's timeouts (adapters/kube.py).

The Lease store below keeps the apiserver's one rule that matters here: a write carries the
resourceVersion it read, and a stale one is refused. The two-operator test against the real
apiserver is tests/integration/test_operator_faults.py.
"""

import asyncio
import copy
import socket
import threading
import time

import pytest
from kubernetes import client

from slmpack.adapters.kube import CountingApiClient, Kube
from slmpack.controller.leader import LeaderElection


class LeaseStore:
    """One Lease, written conditionally on its resourceVersion."""

    def __init__(self):
        self.lease: client.V1Lease | None = None
        self.version = 0
        self.lock = threading.Lock()

    def get(self) -> client.V1Lease | None:
        with self.lock:
            return copy.deepcopy(self.lease)

    def write(self, lease: client.V1Lease) -> bool:
        with self.lock:
            if (lease.metadata.resource_version or None) != (self.lease.metadata.resource_version
                                                             if self.lease else None):
                return False
            self.version += 1
            self.lease = copy.deepcopy(lease)
            self.lease.metadata.resource_version = str(self.version)
            return True


class ApiserverView:
    """One operator's connection to the Lease store; `hang()` makes its requests hang, as over a broken link."""

    def __init__(self, store: LeaseStore):
        self.store, self.hanging, self.unblock = store, False, threading.Event()

    def hang(self) -> None:
        self.hanging = True

    def _wait(self) -> None:
        if self.hanging:
            self.unblock.wait(30)
            raise ConnectionError("the connection broke")

    def get_lease(self, namespace, name, timeout_seconds=None):
        self._wait()
        return self.store.get()

    def write_lease(self, lease, timeout_seconds=None):
        self._wait()
        return self.store.write(lease)


def elector(view: ApiserverView, identity: str, lost: list, **times) -> LeaderElection:
    return LeaderElection(view, "ops", "slmpack", identity, on_lost=lambda: lost.append(time.monotonic()), **times)


async def until(predicate, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
    return time.monotonic()


async def test_a_leader_whose_renewal_hangs_stops_before_another_replica_takes_the_lease():
    # client-go's 15 s / 10 s / 2 s, scaled down (a Lease counts whole seconds).
    times = {"lease_seconds": 2, "renew_seconds": 1.0, "retry_seconds": 0.2}
    store = LeaseStore()
    first_view, second_view = ApiserverView(store), ApiserverView(store)
    first_lost, second_lost = [], []
    first, second = elector(first_view, "first", first_lost, **times), elector(second_view, "second", second_lost,
                                                                                **times)
    tasks = [asyncio.create_task(first.run())]
    try:
        await until(first.leading.is_set, 5)
        tasks.append(asyncio.create_task(second.run()))
        await asyncio.sleep(0.5)
        assert not second.leading.is_set()
        hung_at = time.monotonic()
        first_view.hang()
        second_leads_at = await until(second.leading.is_set, 10)
        assert first_lost, "the leader whose renewal hangs never stopped leading"
        assert not first.leading.is_set()
        # It stopped within its renew deadline (plus one retry period it may have been sleeping),
        # and before the other replica could take the Lease.
        assert first_lost[0] - hung_at < times["renew_seconds"] + times["retry_seconds"] + 0.3
        assert first_lost[0] < second_leads_at
        assert store.get().spec.holder_identity == "second" and store.get().spec.lease_transitions == 1
        assert not second_lost
    finally:
        first_view.unblock.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_a_candidate_takes_the_lease_only_after_it_went_unrenewed_for_its_duration():
    now = [100.0]
    store = LeaseStore()
    holder = LeaderElection(ApiserverView(store), "ops", "slmpack", "holder", on_lost=lambda: None,
                            clock=lambda: now[0])
    candidate = LeaderElection(ApiserverView(store), "ops", "slmpack", "candidate", on_lost=lambda: None,
                               clock=lambda: now[0])
    assert holder.try_acquire_or_renew()
    assert not candidate.try_acquire_or_renew()
    now[0] += 14
    assert holder.try_acquire_or_renew()  # renewed: the candidate's 15 s start again
    now[0] += 14
    assert not candidate.try_acquire_or_renew()
    now[0] += 2
    assert not candidate.try_acquire_or_renew()  # 16 s on the holder's clock, but 2 s since it saw the renewal
    now[0] += 13.5
    assert candidate.try_acquire_or_renew()
    assert store.get().spec.holder_identity == "candidate"


def test_the_deadlines_must_nest_as_client_gos_do():
    with pytest.raises(ValueError, match="renew deadline"):
        LeaderElection(ApiserverView(LeaseStore()), "ops", "slmpack", "me", on_lost=lambda: None,
                       lease_seconds=10, renew_seconds=10)


@pytest.fixture
def silent_apiserver():
    """A TCP server on loopback that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.getsockname()[1]}"
    yield configuration
    server.close()
    for connection in accepted:
        connection.close()


def test_every_kubernetes_request_has_a_timeout(silent_apiserver):
    kube = Kube(CountingApiClient(silent_apiserver, request_timeout=(0.5, 0.5)))
    started = time.monotonic()
    with pytest.raises(Exception, match="timed out"):
        kube.patch_profile_status("team-a", "chat", {"phase": "Ready"})  # a call that names no timeout
    assert time.monotonic() - started < 1.5  # once, not retried four times
    started = time.monotonic()
    with pytest.raises(Exception, match="timed out"):
        kube.get_lease("ops", "slmpack", timeout_seconds=0.2)  # the renew deadline's rest
    assert time.monotonic() - started < 0.6
