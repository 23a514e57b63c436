"""A work queue with client-go's semantics (k8s.io/client-go/util/workqueue), pure and clock-driven.

:class:`WorkQueue` holds the rules and no I/O: time comes from an injected clock, and nothing in it
sleeps, so its races are unit-tested step by step with a fake clock.

- A *dirty* set and a *processing* set: a key is queued at most once, a key is never handed to two
  workers at once, and a key added while it is processed is handed out exactly once more after
  :meth:`WorkQueue.done`.
- Delayed adds: one due time per key, the earliest wins; handing a key out clears its due time (the
  pass that runs decides the next one).
- Per-key rate limiting: :meth:`WorkQueue.add_rate_limited` waits ``base * 2**failures`` (capped), and
  :meth:`WorkQueue.forget` resets the count after a success.
- :meth:`WorkQueue.shutdown`: nothing is accepted or handed out any more.

:class:`AsyncWorkQueue` drives it from an asyncio event loop (loop-only: no thread may call it): one
``TimerHandle`` for the earliest due time, and futures that wake waiting workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["AsyncWorkQueue", "ShutDown", "WorkQueue"]

K = TypeVar("K", bound=Hashable)


class ShutDown(Exception):
    """The queue was shut down: the worker asking for a key should stop."""


class WorkQueue(Generic[K]):
    def __init__(
        self,
        clock: Callable[[], float],
        *,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        jitter: Callable[[], float] = lambda: 1.0,
    ) -> None:
        self.clock = clock
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.jitter = jitter
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._due: dict[K, float] = {}
        # Lazy deletion: an entry is live only while _due[key] still equals its time.
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._failures: dict[K, int] = {}
        self._shut = False

    # -- adding ----------------------------------------------------------------------------------

    def add(self, key: K) -> None:
        if self._shut or key in self._dirty:
            return
        self._dirty.add(key)
        # Queued now: a later due time for it is moot (the pass decides the next one).
        self._due.pop(key, None)
        if key not in self._processing:
            self._queue.append(key)

    def add_after(self, key: K, delay: float) -> None:
        if self._shut:
            return
        if delay <= 0:
            self.add(key)
            return
        if key in self._dirty:
            return  # it runs sooner anyway
        due = self.clock() + delay
        current = self._due.get(key)
        if current is not None and current <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._seq), key))

    def add_rate_limited(self, key: K) -> float:
        """Requeue after a failure: base * 2**(failures so far), capped; returns the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = min(self.base_delay * 2.0 ** min(failures, 64), self.max_delay) * self.jitter()
        self.add_after(key, delay)
        return delay

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def forget(self, key: K) -> None:
        """A success: the next failure starts from the base delay again."""
        self._failures.pop(key, None)

    def remove(self, key: K) -> None:
        """Drop everything about the key (deleted): queued, due and failure count. A pass already
        running for it finishes, and is not repeated unless the key is added again."""
        self._due.pop(key, None)
        self._failures.pop(key, None)
        if key in self._dirty:
            self._dirty.discard(key)
            if key not in self._processing:
                self._queue.remove(key)

    # -- handing out -----------------------------------------------------------------------------

    def advance(self) -> None:
        """Queue every key whose due time has come."""
        now = self.clock()
        while self._heap and self._heap[0][0] <= now:
            due, _, key = heapq.heappop(self._heap)
            if self._due.get(key) == due:
                del self._due[key]
                self.add(key)

    def next_due(self) -> float | None:
        """The earliest pending due time, if any."""
        while self._heap:
            due, _, key = self._heap[0]
            if self._due.get(key) == due:
                return due
            heapq.heappop(self._heap)
        return None

    def get(self) -> K | None:
        """The next key to process (now processing), or None when none is ready; raises ShutDown."""
        if self._shut:
            raise ShutDown
        self.advance()
        if not self._queue:
            return None
        key = self._queue.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        self._due.pop(key, None)
        return key

    def done(self, key: K) -> None:
        """The pass for ``key`` ended; if it was added meanwhile, it is queued once more."""
        self._processing.discard(key)
        if key in self._dirty and not self._shut:
            self._queue.append(key)

    # -- state -----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        self._shut = True
        self._queue.clear()
        self._dirty.clear()
        self._due.clear()
        self._heap.clear()
        self._failures.clear()

    @property
    def is_shut_down(self) -> bool:
        return self._shut

    def ready(self) -> int:
        """Keys that can be handed out now."""
        return len(self._queue)

    def processing(self, key: K) -> bool:
        return key in self._processing

    def queued(self, key: K) -> bool:
        return key in self._dirty

    def due(self, key: K) -> float | None:
        return self._due.get(key)

    def __len__(self) -> int:
        """Keys queued or waiting for a due time (not those only being processed)."""
        return len(self._dirty | self._due.keys())


class AsyncWorkQueue(Generic[K]):
    """:class:`WorkQueue` on an event loop, for workers that ``await get()``. Loop-only."""

    def __init__(self, queue: WorkQueue[K], loop: asyncio.AbstractEventLoop) -> None:
        self.queue = queue
        self._loop = loop
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def add(self, key: K) -> None:
        self.queue.add(key)
        self._changed()

    def add_after(self, key: K, delay: float) -> None:
        self.queue.add_after(key, delay)
        self._changed()

    def add_rate_limited(self, key: K) -> float:
        delay = self.queue.add_rate_limited(key)
        self._changed()
        return delay

    def forget(self, key: K) -> None:
        self.queue.forget(key)

    def remove(self, key: K) -> None:
        self.queue.remove(key)
        self._changed()

    def done(self, key: K) -> None:
        self.queue.done(key)
        self._changed()

    async def get(self) -> K:
        while True:
            key = self.queue.get()  # raises ShutDown
            if key is not None:
                self._changed()
                return key
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                # Pass a wake-up we consumed on to another worker.
                if waiter.done() and not waiter.cancelled():
                    self._wake()
                raise

    def shutdown(self) -> None:
        self.queue.shutdown()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ShutDown())

    def _changed(self) -> None:
        self._wake()
        due = self.queue.next_due()
        if due == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, due
        if due is not None:
            # A delay, not loop.call_at(due): the queue's clock need not be the loop's (a fake
            # clock in tests must not make the timer spin).
            self._timer = self._loop.call_later(max(due - self.queue.clock(), 0.0), self._fire)

    def _fire(self) -> None:
        self._timer = self._timer_at = None
        self.queue.advance()
        self._changed()

    def _wake(self) -> None:
        ready = self.queue.ready()
        while ready > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                ready -= 1
