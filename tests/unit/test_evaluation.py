"""services/evaluation.py on an invalid spec: reported once per generation, no rewrite on a re-list."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.domain.objects import SourceObject
from smtp_oauth_operator.services.evaluation import evaluate

NOW = datetime(2027, 1, 1, tzinfo=UTC)


class NoObjects:
    async def read(
        self, kind: Literal["Secret", "ConfigMap"], namespace: str, name: str
    ) -> SourceObject | None:
        raise AssertionError("an invalid spec must not read anything")


def body(generation: int, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "x", "namespace": "mail", "generation": generation},
        "spec": {"username": "not-an-address"},
        "status": status or {},
    }


async def test_invalid_spec_is_reported_once_per_generation() -> None:
    tokens = TokenProvider()
    first = await evaluate(body(1), NoObjects(), tokens, now=NOW)
    ready = first.decision.ready
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.username" in ready["message"]
    assert first.decision.status["consecutiveFailures"] == 1
    assert [e.reason for e in first.decision.events] == ["ConnectionTestFailed"]

    again = await evaluate(body(1, first.decision.status), NoObjects(), tokens, now=NOW + timedelta(hours=1))
    assert again.decision.status == first.decision.status
    assert again.decision.events == []

    changed = await evaluate(
        body(2, first.decision.status), NoObjects(), tokens, now=NOW + timedelta(hours=2)
    )
    assert changed.decision.status["observedGeneration"] == 2
    assert changed.decision.status["consecutiveFailures"] == 2
