"""Expiry discovery from Microsoft Graph, for real: the check CLI and one evaluation pass against the local
Entra ID, the local Graph over the same directory, and the local Exchange.

Every Graph reason is produced by the stand-in answering as Graph does (no role → 403, a multi-tenant
guest app → 404, throttling → 429 with Retry-After); Ready never depends on it. Every secret the local
Graph hands out, and every token, is a leak canary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.integration.conftest import CANARY, CLIENT, TENANT, Peers
from tests.integration.test_check_credentials import assert_no_leak, conditions, run_check

from smtp_oauth_operator import cli
from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.services.discovery import GraphDiscovery
from smtp_oauth_operator.services.evaluation import evaluate
from smtp_oauth_operator.testing.graph import GRAPH_RESOURCE, FakeGraph
from smtp_oauth_operator.testing.peers import closed_port
from smtp_oauth_operator.testing.pki import CertificateAuthority

GRAPH_END = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)


@pytest.fixture
def graph(peers: Peers) -> Iterator[FakeGraph]:
    with FakeGraph(peers.idp, peers.cert) as server:
        peers.idp.set_secret_end(TENANT, CLIENT, CANARY, GRAPH_END)
        yield server


def discovery_spec(peers: Peers, graph: FakeGraph, **overrides: Any) -> dict[str, Any]:
    return peers.spec(**{"identity.discovery": {"graph": True, "graphHost": graph.base_url}, **overrides})


def check(
    peers: Peers,
    graph: FakeGraph,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    **overrides: Any,
) -> tuple[int, dict[str, Any]]:
    path = peers.manifests(discovery_spec(peers, graph, **overrides))
    return run_check(peers, capsys, caplog, path, secrets=[CANARY, *graph.returned_secrets])


def test_discovered_expiry_and_listing(peers: Peers, graph: FakeGraph, capsys, caplog) -> None:  # type: ignore[no-untyped-def]
    peers.idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.Read.All")
    code, result = check(peers, graph, capsys, caplog)
    assert code == 0, result
    assert conditions(result)["ExpiryDiscovered"] == ("True", "Discovered")
    assert result["expiresAt"] == "2031-03-04T05:06:07Z"
    (only,) = result["appCredentials"]
    assert only["inUse"] is True
    assert only["hint"] == CANARY[:3]
    # A colleague adds a second secret in the portal: listed, and the one in use is still the right one.
    added = graph.add_password(TENANT, CLIENT, display_name="colleague", end=GRAPH_END + timedelta(days=90))
    code, result = check(peers, graph, capsys, caplog)
    assert code == 0
    listed = {c.get("displayName", "-"): c for c in result["appCredentials"]}
    assert len(result["appCredentials"]) == 2
    assert listed["colleague"]["inUse"] is False
    assert listed["colleague"]["hint"] == added[:3]
    assert [c["inUse"] for c in result["appCredentials"]].count(True) == 1
    assert result["expiresAt"] == "2031-03-04T05:06:07Z"
    assert graph.requests["read"] == 4  # each check run (JSON and text form) reads once


def test_same_hint_is_ambiguous_and_uses_the_earliest(peers: Peers, graph: FakeGraph, capsys, caplog) -> None:  # type: ignore[no-untyped-def]
    peers.idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.Read.All")
    twin = CANARY[:3] + "-another-secret-value-0123456789"
    earlier = GRAPH_END - timedelta(days=30)
    peers.idp.add_secret(TENANT, CLIENT, twin, end=earlier, display_name="twin")
    code, result = check(peers, graph, capsys, caplog)
    assert code == 0
    assert conditions(result)["ExpiryDiscovered"] == ("False", "CredentialAmbiguous")
    assert result["expiresAt"] == earlier.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert twin not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("grant", "setup", "reason"),
    [
        (False, lambda p, g: None, "GraphAccessDenied"),  # no Graph permission granted: 403
        (True, lambda p, g: p.idp.make_guest(TENANT, CLIENT), "GraphApplicationNotFound"),
        (True, lambda p, g: g.throttle(retry_after=120), "GraphThrottled"),
        (True, lambda p, g: g.deny(), "GraphAccessDenied"),
    ],
    ids=["no-role", "guest-app", "throttled", "denied"],
)
def test_graph_failures_never_block_ready(  # type: ignore[no-untyped-def]
    peers: Peers, graph: FakeGraph, capsys, caplog, grant, setup, reason
) -> None:
    if grant:
        peers.idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.Read.All")
    setup(peers, graph)
    code, result = check(
        peers, graph, capsys, caplog, **{"identity.clientSecret.expiresAt": "2030-01-01T00:00:00Z"}
    )
    assert code == 0, result
    assert result["ready"] is True
    status, found = conditions(result)["ExpiryDiscovered"]
    assert (status, found) == ("False", reason)
    message = next(c["message"] for c in result["conditions"] if c["type"] == "ExpiryDiscovered")
    if reason == "GraphAccessDenied":
        assert "Application.Read.All" in message
    if reason == "GraphThrottled":
        assert "120 s" in message
    assert result["expiresAt"] == "2030-01-01T00:00:00Z"  # the typed date, Graph being unread


async def test_mismatch_is_said_once_and_the_alarm_follows_graph(peers: Peers, graph: FakeGraph) -> None:
    peers.idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.Read.All")
    now = datetime.now(UTC)
    soon = now + timedelta(days=5, hours=1)
    peers.idp.set_secret_end(TENANT, CLIENT, CANARY, soon)
    path = peers.manifests(
        discovery_spec(peers, graph, **{"identity.clientSecret.expiresAt": "2035-01-01T00:00:00Z"})
    )
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    source = cli.ManifestSource(docs)
    (config,) = [d for d in docs if d["kind"] == "SmtpOAuthConfig"]
    body: dict[str, Any] = {**config, "metadata": {**config["metadata"], "generation": 1}, "status": {}}
    finder = GraphDiscovery()
    tokens = TokenProvider()
    try:
        first = await evaluate(body, source, tokens, now=now, discovery=finder)
        mismatches = [e for e in first.decision.events if e.reason == "ExpiryMismatch"]
        assert len(mismatches) == 1
        assert "2035-01-01T00:00:00Z" in mismatches[0].message
        assert first.decision.status["expirySource"] == "Graph"
        assert first.decision.alarm is not None
        assert first.decision.alarm.kind == "ClientSecretExpiringSoon"
        assert first.decision.alarm.subject.endswith("expires in 5 days")
        assert first.expires_at == soon.replace(microsecond=0)
        body["status"] = first.decision.status
        second = await evaluate(body, source, tokens, now=now + timedelta(minutes=1), discovery=finder)
        assert [e for e in second.decision.events if e.reason == "ExpiryMismatch"] == []
        assert second.decision.alarm is None
        assert graph.requests["read"] == 1  # within the recheck interval: one read
        # Throttled later and restarted (a fresh cache): Graph's last date stays, no flip to the typed one.
        graph.throttle(retry_after=60)
        body["status"] = second.decision.status
        later = now + timedelta(hours=2)
        third = await evaluate(body, source, tokens, now=later, discovery=GraphDiscovery())
        assert third.expires_at is not None
        assert abs(third.expires_at - soon) < timedelta(seconds=1)
        assert third.decision.status["expirySource"] == "Graph"
        assert [e.reason for e in third.decision.events] == ["ExpiryDiscoveryFailed"]
        assert third.next_due is not None
        assert third.next_due <= later + timedelta(seconds=61)
        texts = " ".join(e.message for p in (first, second, third) for e in p.decision.events)
        assert_no_leak(texts + repr(third.decision.status), [CANARY, *peers.idp.issued_tokens])
    finally:
        tokens.close()


async def test_graph_is_read_once_per_app_for_many_resources(
    peers: Peers, graph: FakeGraph, tmp_path: Path
) -> None:
    peers.idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.Read.All")
    path = peers.manifests(discovery_spec(peers, graph))
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    source = cli.ManifestSource(docs)
    (config,) = [d for d in docs if d["kind"] == "SmtpOAuthConfig"]
    finder = GraphDiscovery()
    tokens = TokenProvider()
    now = datetime.now(UTC)
    try:
        for index in range(5):
            body = {**config, "metadata": {**config["metadata"], "name": f"mail-{index}", "generation": 1}}
            result = await evaluate({**body, "status": {}}, source, tokens, now=now, discovery=finder)
            assert result.decision.status["clientSecretExpiresAt"] == "2031-03-04T05:06:07Z"
        assert graph.requests["read"] == 1
        assert finder.reads == 1
        # After the recheck interval (default 1 h), the next pass reads again.
        await evaluate(
            {**config, "status": {}},
            source,
            tokens,
            now=now + timedelta(hours=1, seconds=1),
            discovery=finder,
        )
        assert graph.requests["read"] == 2
    finally:
        tokens.close()


def test_discovery_off_reads_nothing(peers: Peers, graph: FakeGraph, capsys, caplog) -> None:  # type: ignore[no-untyped-def]
    peers.idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.Read.All")
    caplog.set_level(logging.DEBUG)
    code, result = run_check(peers, capsys, caplog, peers.manifests(), secrets=[CANARY])
    assert code == 0
    assert "ExpiryDiscovered" not in conditions(result)
    assert "appCredentials" not in result
    assert graph.requests["read"] == 0


def test_a_secret_older_than_hints_is_not_listed(peers: Peers, graph: FakeGraph, capsys, caplog) -> None:  # type: ignore[no-untyped-def]
    peers.idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.Read.All")
    peers.idp.remove_secret(TENANT, CLIENT, CANARY)
    peers.idp.add_secret(TENANT, CLIENT, CANARY, end=GRAPH_END, legacy=True)  # Graph lists "hint": null
    code, result = check(
        peers, graph, capsys, caplog, **{"identity.clientSecret.expiresAt": "2030-01-01T00:00:00Z"}
    )
    assert code == 0
    assert conditions(result)["ExpiryDiscovered"] == ("False", "CredentialNotListed")
    assert result["expiresAt"] == "2030-01-01T00:00:00Z"
    (listed,) = result["appCredentials"]
    assert listed["inUse"] is False
    assert "hint" not in listed


@pytest.mark.parametrize("where", ["closed", "untrusted"])
def test_unreachable_or_untrusted_graph(  # type: ignore[no-untyped-def]
    peers: Peers, graph: FakeGraph, capsys, caplog, where: str
) -> None:
    peers.idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.Read.All")
    if where == "closed":
        host = f"https://127.0.0.1:{closed_port()}"
        with_host = {"identity.discovery": {"graph": True, "graphHost": host}}
        code, result = run_check(
            peers, capsys, caplog, peers.manifests(peers.spec(**with_host)), secrets=[CANARY]
        )
    else:
        other = CertificateAuthority.create("not trusted").issue("127.0.0.1")
        with FakeGraph(peers.idp, other) as untrusted:
            code, result = check(peers, untrusted, capsys, caplog)
    assert code == 0
    assert result["ready"] is True
    status, reason = conditions(result)["ExpiryDiscovered"]
    assert (status, reason) == ("False", "GraphUnavailable")
    message = next(c["message"] for c in result["conditions"] if c["type"] == "ExpiryDiscovered")
    assert ("not trusted" in message) == (where == "untrusted")
