"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection package does it.

Every operator replica elects, even a single one: a Deployment's rolling update, or a pod left
running on a partitioned node while its replacement starts, briefly runs two. Only the holder of
the Lease reconciles. A candidate takes the Lease when its holder has not renewed it for
`lease_seconds`, measured on the candidate's own clock from when it last saw the Lease change (so
clocks need not agree). Every write carries the resourceVersion it read, so two candidates cannot
both win.

A leader that has not renewed within `renew_seconds` of its last successful renewal stops
leading, even while a renewal still hangs: each attempt is cut at that deadline, and every
request carries a timeout. The deadline counts from the start of the attempt that renewed, which
is no later than the renewTime other replicas saw, so the leader has stopped
`lease_seconds - renew_seconds` (5 s with client-go's 15 s and 10 s) before any of them may take
over. Stopping leading stops the process: a restart makes it a candidate again.

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
    # client-go's defaults: LeaseDuration 15 s, RenewDeadline 10 s, RetryPeriod 2 s.
    lease_seconds: int = 15
    renew_seconds: float = 10.0
    retry_seconds: float = 2.0
    clock: Callable[[], float] = time.monotonic
    leading: asyncio.Event = field(default_factory=asyncio.Event)
    _observed: tuple | None = None
    _observed_at: float = 0.0

    def __post_init__(self) -> None:
        if not self.retry_seconds < self.renew_seconds < self.lease_seconds:
            raise ValueError(f"leader election needs retry ({self.retry_seconds}s) < renew deadline "
                             f"({self.renew_seconds}s) < lease duration ({self.lease_seconds}s)")

    async def run(self) -> None:
        renewed = 0.0  # when the attempt that last renewed started
        while True:
            started = self.clock()
            # A leader's attempt may last until its renew deadline; a candidate's, one deadline.
            budget = renewed + self.renew_seconds - started if self.leading.is_set() else self.renew_seconds
            held = False
            if budget > 0:
                try:
                    held = await asyncio.wait_for(asyncio.to_thread(self.try_acquire_or_renew, budget), budget)
                except TimeoutError:
                    log.warning("Lease %s/%s: no answer within %.1fs", self.namespace, self.name, budget)
                except Exception as error:  # the apiserver may be briefly unreachable
                    log.warning("Lease %s/%s: %s", self.namespace, self.name, error)
            if held:
                renewed = started
                if not self.leading.is_set():
                    log.info("%s leads: it holds Lease %s/%s", self.identity, self.namespace, self.name)
                    self.leading.set()
            elif self.leading.is_set():
                left = renewed + self.renew_seconds - self.clock()
                if left <= 0:
                    log.error("%s could not renew Lease %s/%s within %gs: stopping", self.identity,
                              self.namespace, self.name, self.renew_seconds)
                    self.leading.clear()
                    self.on_lost()
                    return
                await asyncio.sleep(min(self.retry_seconds, left))
                continue
            await asyncio.sleep(self.retry_seconds)

    async def wait_to_lead(self) -> None:
        await self.leading.wait()

    def try_acquire_or_renew(self, timeout_seconds: float | None = None) -> bool:
        now = datetime.now(UTC)
        lease = self.kube.get_lease(self.namespace, self.name, timeout_seconds)
        if lease is None:
            lease = client.V1Lease(metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                                   spec=client.V1LeaseSpec(lease_transitions=0))
        spec = lease.spec
        record = (spec.holder_identity, spec.renew_time, spec.lease_transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()
        duration = spec.lease_duration_seconds or self.lease_seconds
        held_by_other = spec.holder_identity not in (None, "", self.identity)
        if held_by_other and self.clock() < self._observed_at + duration:
            return False
        if spec.holder_identity != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + (1 if spec.holder_identity else 0)
        spec.holder_identity, spec.renew_time, spec.lease_duration_seconds = self.identity, now, self.lease_seconds
        return self.kube.write_lease(lease, timeout_seconds)

    def release(self) -> None:
        """Hand the Lease over at once on a clean stop, instead of making the next leader wait."""
        lease = self.kube.get_lease(self.namespace, self.name, self.retry_seconds)
        if lease is not None and lease.spec.holder_identity == self.identity:
            lease.spec.holder_identity, lease.spec.lease_duration_seconds = "", 1
            self.kube.write_lease(lease, self.retry_seconds)
