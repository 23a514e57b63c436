"""services/workqueue.py: client-go's workqueue rules, step by step on a fake clock (no sleeps)."""

from __future__ import annotations

import asyncio

import pytest

from smtp_oauth_operator.services.workqueue import AsyncWorkQueue, ShutDown, WorkQueue


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(**kwargs: float) -> tuple[WorkQueue[str], FakeClock]:
    clock = FakeClock()
    return WorkQueue(clock, **kwargs), clock


def test_a_key_is_queued_once_and_handed_out_in_order() -> None:
    q, _ = make()
    for key in ("a", "b", "a", "c", "b"):
        q.add(key)
    assert [q.get(), q.get(), q.get(), q.get()] == ["a", "b", "c", None]


def test_a_key_is_never_handed_to_two_workers() -> None:
    q, _ = make()
    q.add("a")
    assert q.get() == "a"
    q.add("a")  # changed while worker 1 processes it
    assert q.get() is None, "worker 2 must not get a key that worker 1 is processing"
    q.done("a")
    assert q.get() == "a"
    q.done("a")
    assert q.get() is None


def test_adds_during_processing_mean_exactly_one_more_pass() -> None:
    q, _ = make()
    q.add("a")
    assert q.get() == "a"
    for _ in range(5):
        q.add("a")
    q.done("a")
    assert q.get() == "a"
    q.done("a")
    assert q.get() is None


def test_delayed_add_fires_at_its_due_time_and_the_earliest_wins() -> None:
    q, clock = make()
    q.add_after("a", 30)
    q.add_after("a", 10)
    q.add_after("a", 60)
    assert q.due("a") == 1010.0
    clock.advance(9.9)
    assert q.get() is None
    clock.advance(0.1)
    assert q.get() == "a"
    q.done("a")
    clock.advance(100)
    assert q.get() is None, "the later due times were superseded, not kept"


def test_handing_a_key_out_clears_its_due_time() -> None:
    q, clock = make()
    q.add_after("a", 10)
    q.add("a")  # a change before the timer
    assert q.due("a") is None
    assert q.get() == "a"
    q.done("a")
    clock.advance(20)
    assert q.get() is None


def test_a_due_time_set_during_processing_survives_done() -> None:
    q, clock = make()
    q.add("a")
    assert q.get() == "a"
    q.add_after("a", 5)  # the pass decides its next due time before done()
    q.done("a")
    assert q.get() is None
    clock.advance(5)
    assert q.get() == "a"


def test_rate_limited_requeue_backs_off_exponentially_with_a_cap_and_resets() -> None:
    q, clock = make(base_delay=15, max_delay=300)
    delays = []
    for _ in range(7):
        delays.append(q.add_rate_limited("a"))
        clock.advance(delays[-1] - 0.001)
        assert q.get() is None
        clock.advance(0.001)
        assert q.get() == "a"
        q.done("a")
    assert delays == [15, 30, 60, 120, 240, 300, 300]
    assert q.failures("a") == 7
    q.forget("a")
    assert q.add_rate_limited("a") == 15


def test_rate_limits_are_per_key() -> None:
    q, _ = make(base_delay=1, max_delay=100)
    for _ in range(4):
        q.add_rate_limited("slow")
    assert q.add_rate_limited("healthy") == 1


def test_remove_drops_queued_due_and_failures() -> None:
    q, clock = make()
    q.add("a")
    q.add_after("b", 5)
    q.add_rate_limited("c")
    for key in "abc":
        q.remove(key)
    clock.advance(1000)
    assert q.get() is None
    assert len(q) == 0
    assert q.failures("c") == 0


def test_remove_while_processing_does_not_requeue() -> None:
    q, _ = make()
    q.add("a")
    assert q.get() == "a"
    q.add("a")
    q.remove("a")
    q.done("a")
    assert q.get() is None


def test_shutdown_refuses_adds_and_stops_workers() -> None:
    q, clock = make()
    q.add("a")
    q.add_after("b", 1)
    q.shutdown()
    q.add("c")
    clock.advance(5)
    with pytest.raises(ShutDown):
        q.get()
    assert len(q) == 0


def test_next_due_skips_superseded_times() -> None:
    q, _ = make()
    q.add_after("a", 50)
    q.add_after("a", 20)
    q.add_after("b", 30)
    assert q.next_due() == 1020.0
    q.remove("a")
    assert q.next_due() == 1030.0


async def test_async_queue_wakes_a_waiting_worker_and_fires_timers() -> None:
    loop = asyncio.get_running_loop()
    q: AsyncWorkQueue[str] = AsyncWorkQueue(WorkQueue(loop.time), loop)
    worker = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    assert not worker.done()
    q.add("a")
    assert await asyncio.wait_for(worker, 1) == "a"
    q.done("a")
    q.add_after("b", 0.01)
    assert await asyncio.wait_for(q.get(), 1) == "b"


async def test_async_queue_shutdown_releases_waiting_workers() -> None:
    loop = asyncio.get_running_loop()
    q: AsyncWorkQueue[str] = AsyncWorkQueue(WorkQueue(loop.time), loop)
    workers = [asyncio.create_task(q.get()) for _ in range(3)]
    await asyncio.sleep(0)
    q.shutdown()
    for worker in workers:
        with pytest.raises(ShutDown):
            await worker


async def test_async_queue_with_a_fake_clock_does_not_spin() -> None:
    clock = FakeClock()
    loop = asyncio.get_running_loop()
    q: AsyncWorkQueue[str] = AsyncWorkQueue(WorkQueue(clock), loop)
    q.add_after("a", 3600)
    timer = q._timer
    assert timer is not None
    assert timer.when() - loop.time() > 3000, "a fake-clock due time must not fire at once"
    await asyncio.sleep(0.01)
    assert q._timer is timer
    clock.advance(3600)
    assert q.queue.get() == "a"


async def test_a_woken_worker_that_is_cancelled_passes_the_key_on() -> None:
    loop = asyncio.get_running_loop()
    q: AsyncWorkQueue[str] = AsyncWorkQueue(WorkQueue(loop.time), loop)
    first, second = asyncio.create_task(q.get()), asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.add("a")  # wakes the first waiter ...
    first.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 1) == "a"
