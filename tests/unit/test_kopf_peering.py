"""The one reliance on kopf internals (handlers/peering.py) checked against the installed kopf.

kopf runs for real, in-process, with a registry holding only a start-up handler: that handler finds
kopf's pause toggle set the way the operator's does and drives it the way kopf's peering does
(``make_toggle`` / ``turn_to``). No API server is needed: the operator is stopped before kopf's
first request. If a kopf release renames, moves or stops sharing the toggle set, this fails.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
import pytest

from smtp_oauth_operator.handlers import peering


def _run_kopf(scenario: Any) -> list[str]:
    """Run kopf with ``scenario(log)`` as its only start-up handler; return what the scenario logged."""
    log: list[str] = []
    registry = kopf.OperatorRegistry()
    stop = asyncio.Event()

    @kopf.on.startup(registry=registry)
    async def startup(**_: Any) -> None:
        try:
            await scenario(log)
        finally:
            stop.set()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server="https://127.0.0.1:9", insecure=True)

    async def main() -> None:
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True
        settings.posting.enabled = False
        await asyncio.wait_for(
            kopf.operator(
                registry=registry,
                settings=settings,
                clusterwide=True,
                peering_name="unit-test",
                priority=10,
                stop_flag=stop,
            ),
            timeout=30,
        )

    asyncio.run(main())
    return log


def test_the_pause_toggle_set_is_found_and_followed() -> None:
    async def scenario(log: list[str]) -> None:
        paused = peering.find_operator_paused()
        assert paused.is_off()

        async def on_pause() -> None:
            log.append("pause")

        follower = asyncio.create_task(peering.follow(paused, on_pause, lambda: log.append("resume")))
        await asyncio.sleep(0.3)
        assert log == [], "followed before kopf's peering toggle existed"

        # What kopf's orchestrator does for a peering: a toggle, on until the peers are known.
        conflicts = await paused.make_toggle(True, name="unit-test@None")
        await asyncio.sleep(0.3)
        assert log == []
        await conflicts.turn_to(False)  # no peer of higher priority
        await asyncio.sleep(0.1)
        assert log == ["resume"]
        await conflicts.turn_to(True)  # "Pausing operations in favour of …"
        await asyncio.sleep(0.1)
        assert log == ["resume", "pause"]
        await conflicts.turn_to(False)  # "Resuming operations after the pause"
        await asyncio.sleep(0.1)
        assert log == ["resume", "pause", "resume"]
        follower.cancel()

    assert _run_kopf(scenario) == ["resume", "pause", "resume"]


def test_no_toggle_set_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    async def outside_kopf() -> None:
        with pytest.raises(peering.PeeringUnavailable, match="found 0 kopf pause toggle sets"):
            peering.find_operator_paused()

    caplog.set_level(logging.DEBUG)
    asyncio.run(outside_kopf())
