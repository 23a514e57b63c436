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


class Nothing:
    """No Secret exists: the pass stops at SecretResolved without any network call."""

    async def read(
        self, kind: Literal["Secret", "ConfigMap"], namespace: str, name: str
    ) -> SourceObject | None:
        return None


def relayed(enabled: bool | None, status: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "username": "alerts@contoso.com",
        "identity": {
            "tenantId": "0d9b8c6e-1f2a-4b3c-9d8e-7f6a5b4c3d2e",
            "clientId": "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
            "clientSecret": {"secretKeyRef": {"name": "exo-app", "key": "client-secret"}},
        },
    }
    if enabled is not None:
        spec["relay"] = {"enabled": enabled, "credentialsSecretRef": {"name": "alerts-relay"}}
    return {
        "metadata": {"name": "alerts", "namespace": "mail", "generation": 1},
        "spec": spec,
        "status": status or {},
    }


ENDPOINT = "smtp-oauth-operator-relay.smtp-oauth-system.svc:587"


async def test_the_relay_endpoint_is_written_for_relayed_configurations_only(monkeypatch: Any) -> None:
    monkeypatch.delenv("SMTPOAUTH_RELAY_ENDPOINT", raising=False)
    tokens = TokenProvider()
    on = await evaluate(relayed(True), Nothing(), tokens, now=NOW, relay_endpoint=ENDPOINT)
    assert on.decision.status["relay"] == {"endpoint": ENDPOINT}
    # Also when the configuration is not Ready: where to send does not depend on it (Ready says whether).
    assert on.decision.ready["status"] == "False"
    for enabled in (False, None):
        off = await evaluate(
            relayed(enabled, on.decision.status), Nothing(), tokens, now=NOW, relay_endpoint=ENDPOINT
        )
        assert "relay" not in off.decision.status, enabled
    # The relay not installed (no endpoint): nothing to show, and a stale one goes.
    gone = await evaluate(relayed(True, on.decision.status), Nothing(), tokens, now=NOW, relay_endpoint="")
    assert "relay" not in gone.decision.status


async def test_the_operator_reads_the_relay_endpoint_from_its_environment(monkeypatch: Any) -> None:
    tokens = TokenProvider()
    monkeypatch.setenv("SMTPOAUTH_RELAY_ENDPOINT", ENDPOINT)
    found = await evaluate(relayed(True), Nothing(), tokens, now=NOW)
    assert found.decision.status["relay"] == {"endpoint": ENDPOINT}
    # Not host:port (a status write with it would be refused by the CRD schema): ignored.
    for bad in ("relay.svc", "relay.svc:587 extra", "relay.svc:99999", "x" * 300 + ":587", ""):
        monkeypatch.setenv("SMTPOAUTH_RELAY_ENDPOINT", bad)
        ignored = await evaluate(relayed(True), Nothing(), tokens, now=NOW)
        assert "relay" not in ignored.decision.status, bad
