"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection package does it.

Several operator replicas may run; only the holder of the Lease reconciles. A candidate takes
the Lease when its holder has not renewed it for `lease_seconds`, measured on the candidate's
own clock from when it last saw the Lease change (so clocks need not agree). Every write
carries the resourceVersion it read, so two candidates cannot both win. A leader that cannot
renew within `renew_seconds` stops the process: it may no longer act, and a restart makes it
a candidate again.

kopf's peering is not used for this: it has no per-object locks and pauses every operator
when two share a priority, which replicas of one Deployment do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kubernetes import client

from slmpack.adapters.kube import Kube

log = logging.getLogger(__name__)


@dataclass
class LeaderElection:
    kube: Kube
    namespace: str
    name: str
    identity: str
    on_lost: Callable[[], None]
    lease_seconds: int = 15
    renew_seconds: float = 10.0
    retry_seconds: float = 2.0
    leading: asyncio.Event = field(default_factory=asyncio.Event)
    _observed: tuple | None = None
    _observed_at: float = 0.0

    async def run(self) -> None:
        renewed = time.monotonic()
        while True:
            try:
                held = await asyncio.to_thread(self.try_acquire_or_renew)
            except Exception as error:  # the apiserver may be briefly unreachable
                log.warning("Lease %s/%s: %s", self.namespace, self.name, error)
                held = False
            if held:
                renewed = time.monotonic()
                if not self.leading.is_set():
                    log.info("%s leads: it holds Lease %s/%s", self.identity, self.namespace, self.name)
                    self.leading.set()
            elif self.leading.is_set() and time.monotonic() - renewed > self.renew_seconds:
                log.error("%s lost Lease %s/%s: stopping", self.identity, self.namespace, self.name)
                self.on_lost()
                return
            await asyncio.sleep(self.retry_seconds)

    async def wait_to_lead(self) -> None:
        await self.leading.wait()

    def try_acquire_or_renew(self) -> bool:
        now = datetime.now(UTC)
        lease = self.kube.get_lease(self.namespace, self.name)
        if lease is None:
            lease = client.V1Lease(metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                                   spec=client.V1LeaseSpec(lease_transitions=0))
        spec = lease.spec
        record = (spec.holder_identity, spec.renew_time, spec.lease_transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        duration = spec.lease_duration_seconds or self.lease_seconds
        held_by_other = spec.holder_identity not in (None, "", self.identity)
        if held_by_other and time.monotonic() < self._observed_at + duration:
            return False
        if spec.holder_identity != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + (1 if spec.holder_identity else 0)
        spec.holder_identity, spec.renew_time, spec.lease_duration_seconds = self.identity, now, self.lease_seconds
        return self.kube.write_lease(lease)

    def release(self) -> None:
        """Hand the Lease over at once on a clean stop, instead of making the next leader wait."""
        lease = self.kube.get_lease(self.namespace, self.name)
        if lease is not None and lease.spec.holder_identity == self.identity:
            lease.spec.holder_identity, lease.spec.lease_duration_seconds = "", 1
            self.kube.write_lease(lease)
