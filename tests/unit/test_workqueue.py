"""The work queue: one reconcile per key at a time, bursts coalesced, failures backed off."""

import asyncio

from slmpack.controller.workqueue import WorkQueue, work


class Recorder:
    """A reconcile that records overlaps per key and takes `seconds` per run."""

    def __init__(self, seconds=0.05, fail_first=0):
        self.seconds, self.fail_first = seconds, fail_first
        self.runs: list[str] = []
        self.active: set[str] = set()
        self.overlaps = 0

    async def __call__(self, key):
        if key in self.active:
            self.overlaps += 1
        self.active.add(key)
        try:
            await asyncio.sleep(self.seconds)
            self.runs.append(key)
            if self.fail_first:
                self.fail_first -= 1
                raise RuntimeError("apiserver unavailable")
        finally:
            self.active.discard(key)


async def run_workers(queue, reconcile, workers=4, seconds=0.5):
    tasks = [asyncio.create_task(work(queue, reconcile)) for _ in range(workers)]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_burst_of_events_is_one_reconcile():
    queue, reconcile = WorkQueue(), Recorder()
    for _ in range(100):
        queue.add("ns/a")
    queue.add("ns/b")
    await run_workers(queue, reconcile)
    assert sorted(reconcile.runs) == ["ns/a", "ns/b"]


async def test_a_key_never_runs_twice_at_once_and_an_event_during_a_run_runs_it_again():
    queue, reconcile = WorkQueue(), Recorder(seconds=0.4)
    queue.add("ns/a")

    async def events_during_the_run():
        await asyncio.sleep(0.03)
        for _ in range(10):
            queue.add("ns/a")  # 4 idle workers could take it: none may while it runs
            await asyncio.sleep(0.005)

    await asyncio.gather(run_workers(queue, reconcile, seconds=1.2), events_during_the_run())
    assert reconcile.overlaps == 0
    assert reconcile.runs == ["ns/a", "ns/a"], "the run that missed those events follows once"


async def test_different_keys_run_in_parallel():
    queue, reconcile = WorkQueue(), Recorder(seconds=0.2)
    for i in range(4):
        queue.add(f"ns/{i}")
    started = asyncio.get_running_loop().time()
    await run_workers(queue, reconcile, workers=4, seconds=0.3)
    assert len(reconcile.runs) == 4 and asyncio.get_running_loop().time() - started < 0.4


async def test_failures_are_retried_with_growing_backoff_then_forgotten():
    queue, reconcile = WorkQueue(base_delay=0.05), Recorder(seconds=0.0, fail_first=3)
    queue.add("ns/a")
    await run_workers(queue, reconcile, seconds=0.6)  # backoffs 0.05 + 0.1 + 0.2
    assert reconcile.runs == ["ns/a"] * 4
    assert queue.retry("ns/b") == 0.05 and queue.retry("ns/b") == 0.1
    queue.forget("ns/b")
    assert queue.retry("ns/b") == 0.05


async def test_a_requeue_after_a_delay_keeps_the_earliest():
    queue = WorkQueue()
    queue.add_after("ns/a", 0.05)
    queue.add_after("ns/a", 5)
    await asyncio.sleep(0.1)
    assert len(queue) == 1 and await queue.get() == "ns/a"
