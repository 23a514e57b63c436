"""kopf's peering decision (pause / resume), followed by our own watches and reconciler.

kopf pauses an operator when a peer of higher priority is alive (``--peering``) by turning on a
toggle in a ``ToggleSet`` named ``operator_paused`` that it creates in ``kopf._core.reactor.running``
and hands to its orchestrator and daemon killer; it offers handlers no public way to learn about it.
This module is the ONLY place that relies on that internal: :func:`find_operator_paused` looks for
that object among the locals of kopf's running coroutines (read-only, nothing of kopf is replaced),
and :func:`follow` uses two of its methods, ``is_on()`` and ``await wait_for(state)``, as kopf's own
daemon killer does. ``tests/unit/test_kopf_peering.py`` runs kopf for real and fails if kopf changes
any of this; with peering in use the operator refuses to start rather than run as a second active
replica.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

from kopf._cogs.aiokits.aiotoggles import ToggleSet

__all__ = ["Pausable", "PeeringUnavailable", "find_operator_paused", "follow"]

logger = logging.getLogger(__name__)
LOCAL = "operator_paused"
SETTLE_POLL = 0.1


class PeeringUnavailable(RuntimeError):
    """kopf's pause toggle was not found: this kopf version works differently."""


class Pausable(Protocol):
    def is_on(self) -> bool: ...
    def __len__(self) -> int: ...
    async def wait_for(self, state: bool, /) -> None: ...


def _frames(coro: Any, depth: int = 0) -> Iterator[types.FrameType]:
    """The frames of a coroutine, of the coroutines it awaits, and of those it holds (unstarted)."""
    if depth > 8:
        return
    frame = getattr(coro, "cr_frame", None)
    if frame is not None:
        yield frame
        for value in list(frame.f_locals.values()):
            if isinstance(value, types.CoroutineType) and value is not coro:
                yield from _frames(value, depth + 1)
    awaited = getattr(coro, "cr_await", None)
    if isinstance(awaited, types.CoroutineType):
        yield from _frames(awaited, depth + 1)


def find_operator_paused() -> ToggleSet:
    """kopf's ``operator_paused`` of the operator running on this event loop (call from a handler)."""
    found: dict[int, ToggleSet] = {}
    for task in asyncio.all_tasks():
        for frame in _frames(task.get_coro()):
            value = frame.f_locals.get(LOCAL)
            if isinstance(value, ToggleSet):
                found[id(value)] = value
    if len(found) != 1:
        raise PeeringUnavailable(
            f"found {len(found)} kopf pause toggle sets instead of one; this kopf version is not supported "
            "with --peering"
        )
    return next(iter(found.values()))


async def follow(
    paused: Pausable, on_pause: Callable[[], Awaitable[None]], on_resume: Callable[[], None]
) -> None:
    """Run ``on_resume`` whenever kopf lets the operator work and ``on_pause`` when it pauses it.

    Right after start-up the set holds only kopf's "peering CRD is missing" toggle (off); the toggle
    of the peering itself, created switched on until the first look at the peers, comes a moment
    later. Starting in between would let a standby test once next to the active replica.
    """
    while not paused.is_on() and len(paused) < 2:  # noqa: ASYNC110 - kopf notifies nothing here
        await asyncio.sleep(SETTLE_POLL)
    while True:
        await paused.wait_for(False)
        on_resume()
        await paused.wait_for(True)
        logger.info("Paused by peering: watches, timers and workers stopped, the cache dropped")
        await on_pause()
