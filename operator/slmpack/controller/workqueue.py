"""A work queue of deployment keys, with client-go's workqueue guarantees (util/workqueue).

- Events only `add` a key. A key added while it waits is not added twice, so a burst of
  events coalesces into one reconcile.
- A key is never worked on by two workers at once. A key added while it is being worked on
  waits until that run is `done`, then runs once more, so the latest state is always seen.
- A failed run is retried with exponential backoff per key; a success forgets its failures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable

log = logging.getLogger(__name__)


class WorkQueue:
    def __init__(self, base_delay: float = 0.5, max_delay: float = 300.0) -> None:
        self.base_delay, self.max_delay = base_delay, max_delay
        self._ready: asyncio.Queue[Hashable] = asyncio.Queue()
        self._dirty: set[Hashable] = set()  # waiting for a worker, or to run again after the current run
        self._running: set[Hashable] = set()
        self._later: dict[Hashable, asyncio.TimerHandle] = {}
        self._failures: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._dirty)

    def add(self, key: Hashable) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._running:
            self._ready.put_nowait(key)

    def add_after(self, key: Hashable, delay: float) -> None:
        """Add the key after `delay` seconds; an earlier pending add wins."""
        loop = asyncio.get_running_loop()
        pending = self._later.get(key)
        if pending is not None and pending.when() <= loop.time() + delay:
            return
        if pending is not None:
            pending.cancel()
        self._later[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: Hashable) -> None:
        self._later.pop(key, None)
        self.add(key)

    async def get(self) -> Hashable:
        key = await self._ready.get()
        self._dirty.discard(key)
        self._running.add(key)
        return key

    def done(self, key: Hashable) -> None:
        self._running.discard(key)
        if key in self._dirty:
            self._ready.put_nowait(key)

    def retry(self, key: Hashable) -> float:
        """Add the key again after a backoff that doubles with each failure in a row."""
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(self.base_delay * 2 ** (failures - 1), self.max_delay)
        self.add_after(key, delay)
        return delay

    def forget(self, key: Hashable) -> None:
        self._failures.pop(key, None)


async def work(queue: WorkQueue, reconcile: Callable[[Hashable], Awaitable[float | None]],
               may_work: Callable[[], Awaitable[None]] | None = None) -> None:
    """One worker: take a key, reconcile it, requeue as it asks (seconds) or back off on errors."""
    while True:
        if may_work is not None:
            await may_work()
        key = await queue.get()
        try:
            again = await reconcile(key)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            delay = queue.retry(key)
            log.warning("reconcile of %s failed (retry in %.1fs): %s", key, delay, error,
                        exc_info=not isinstance(error, Retry))
        else:
            queue.forget(key)
            if again is not None:
                queue.add_after(key, again)
        finally:
            queue.done(key)


class Retry(Exception):
    """An expected, transient failure (a conflict, a stale cache): retried with backoff, logged briefly."""
