"""Identifying the credential in use among those Graph lists, and what status says about it (pure)."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from smtp_oauth_operator.domain.discovery import (
    Discovery,
    GraphApplication,
    failed,
    identify,
    mismatch,
    parse_application,
)
from smtp_oauth_operator.domain.expiry import evaluate as expiry_state
from smtp_oauth_operator.domain.reasons import CheckFailed, Reason
from smtp_oauth_operator.domain.spec import SpecError, parse_spec
from smtp_oauth_operator.domain.status import Observation, decide

NOW = datetime(2027, 1, 10, 12, 0, tzinfo=UTC)
CLIENT = "22222222-2222-4222-8222-222222222222"
SECRET = "abc8Q~the-value-of-the-secret-0123456789"
DER = b"not really a certificate"
SHA1 = hashlib.sha1(DER).hexdigest()


def password(key_id: str, hint: str, end: str, name: str | None = None) -> dict[str, Any]:
    return {
        "customKeyIdentifier": None,
        "displayName": name,
        "endDateTime": end,
        "hint": hint,
        "keyId": key_id,
        "secretText": None,
        "startDateTime": "2026-01-01T00:00:00Z",
    }


def key(key_id: str, custom: str | None, end: str) -> dict[str, Any]:
    return {
        "customKeyIdentifier": custom,
        "displayName": "CN=exo-app",
        "endDateTime": end,
        "key": None,
        "keyId": key_id,
        "type": "AsymmetricX509Cert",
        "usage": "Verify",
    }


def app(*passwords: dict[str, Any], keys: tuple[dict[str, Any], ...] = ()) -> GraphApplication:
    return parse_application(
        {"id": "obj", "passwordCredentials": list(passwords), "keyCredentials": list(keys)}
    )


def test_graph_dates_with_seven_digits_become_whole_seconds() -> None:
    found = app(password("k1", "abc", "2027-05-29T16:49:53.3086381Z"))
    assert found.credentials[0].end == datetime(2027, 5, 29, 16, 49, 53, tzinfo=UTC)


def test_unique_hint_is_the_secret_in_use() -> None:
    result = identify(
        app(
            password("k1", "abc", "2027-06-01T00:00:00Z", "ci"), password("k2", "xyz", "2028-01-01T00:00:00Z")
        ),
        client_id=CLIENT,
        secret=SECRET,
        now=NOW,
    )
    assert (result.status, result.reason) == ("True", Reason.DISCOVERED)
    assert result.expires_at == datetime(2027, 6, 1, tzinfo=UTC)
    assert result.credentials is not None
    assert [c["inUse"] for c in result.credentials] == [True, False]
    assert "k1" in result.message
    assert SECRET not in repr(result)


def test_same_hint_is_ambiguous_earliest_date_but_an_ended_one_is_not_a_candidate() -> None:
    two = app(password("k1", "abc", "2027-06-01T00:00:00Z"), password("k2", "abc", "2027-03-01T00:00:00Z"))
    result = identify(two, client_id=CLIENT, secret=SECRET, now=NOW)
    assert result.reason is Reason.CREDENTIAL_AMBIGUOUS
    assert result.expires_at == datetime(2027, 3, 1, tzinfo=UTC)
    assert "k1" in result.message
    assert "k2" in result.message
    # An ended secret could not have been used: Entra ID refuses it (AADSTS7000222).
    ended = app(password("k1", "abc", "2027-06-01T00:00:00Z"), password("k2", "abc", "2026-12-01T00:00:00Z"))
    result = identify(ended, client_id=CLIENT, secret=SECRET, now=NOW)
    assert result.reason is Reason.DISCOVERED
    assert result.in_use == ("k1",)


def test_no_match_is_not_listed() -> None:
    result = identify(
        app(password("k1", "zzz", "2027-06-01T00:00:00Z")), client_id=CLIENT, secret=SECRET, now=NOW
    )
    assert result.reason is Reason.CREDENTIAL_NOT_LISTED
    assert result.expires_at is None


@pytest.mark.parametrize(
    "custom",
    [
        base64.b64encode(bytes.fromhex(SHA1)).decode(),  # what Graph returns for an uploaded certificate
        SHA1.upper(),  # hex text, as some tools write it
        base64.b64encode(SHA1.upper().encode()).decode(),  # the hex text as Binary
    ],
    ids=["digest", "hex", "hex-as-binary"],
)
def test_certificate_by_thumbprint(custom: str) -> None:
    found = app(keys=(key("c1", custom, "2027-08-01T00:00:00Z"), key("c2", None, "2027-09-01T00:00:00Z")))
    result = identify(found, client_id=CLIENT, sha1=SHA1, now=NOW)
    assert result.reason is Reason.DISCOVERED
    assert result.in_use == ("c1",)


def test_bad_payload() -> None:
    with pytest.raises(ValueError, match="passwordCredentials"):
        parse_application({"error": {"code": "x"}})


def test_mismatch_tolerates_the_portal_showing_a_date_only() -> None:
    graph = datetime(2027, 5, 29, 16, 49, 53, tzinfo=UTC)
    assert mismatch(datetime(2027, 5, 29, tzinfo=UTC), graph) is None
    assert mismatch(datetime(2027, 6, 29, tzinfo=UTC), graph) == {
        "specExpiresAt": "2027-06-29T00:00:00Z",
        "graphExpiresAt": "2027-05-29T16:49:53Z",
    }
    assert mismatch(None, graph) is None


def observation(found: Discovery | None, typed: datetime | None, expires: datetime | None) -> Observation:
    return Observation(
        generation=1,
        now=NOW,
        client_id=CLIENT,
        secret_name="mail/exo-app",
        test=None,
        expiry=expiry_state(expires, NOW, (30, 14, 7, 1)),
        protection=None,
        policy="Warn",
        handled_recheck=None,
        next_test_time=None,
        consecutive_failures=0,
        discovery_enabled=True,
        discovery=found,
        typed_expires_at=typed,
    )


def test_status_says_mismatch_once_and_keeps_graph_listing_on_a_failed_read() -> None:
    graph_date = NOW + timedelta(days=5)
    typed = NOW + timedelta(days=300)
    found = identify(
        app(password("k1", "abc", graph_date.strftime("%Y-%m-%dT%H:%M:%SZ"))),
        client_id=CLIENT,
        secret=SECRET,
        now=NOW,
    )
    first = decide({}, observation(found, typed, found.expires_at))
    assert [e.reason for e in first.events].count("ExpiryMismatch") == 1
    assert "ClientSecretRotated" not in [e.reason for e in first.events]
    assert first.status["expirySource"] == "Graph"
    assert first.status["appCredentials"][0]["inUse"] is True
    cond = next(c for c in first.status["conditions"] if c["type"] == "ExpiryDiscovered")
    assert (cond["status"], cond["reason"]) == ("True", "Discovered")
    assert first.alarm is not None
    second = decide(first.status, observation(found, typed, found.expires_at))
    assert "ExpiryMismatch" not in [e.reason for e in second.events]
    assert second.alarm is None
    # Throttled: the condition says so (one Event), the listing, the mismatch record and the source stay.
    throttled = failed(
        CheckFailed(Reason.GRAPH_THROTTLED, "throttled", retry_after=30), NOW, timedelta(seconds=30)
    )
    third = decide(second.status, observation(throttled, typed, graph_date))
    assert [e.reason for e in third.events] == ["ExpiryDiscoveryFailed"]
    assert third.status["appCredentials"] == first.status["appCredentials"]
    assert third.status["expiryMismatch"] == first.status["expiryMismatch"]
    assert third.status["expirySource"] == "Graph"
    ready = next(c for c in third.status["conditions"] if c["type"] == "Ready")
    assert ready == next(c for c in second.status["conditions"] if c["type"] == "Ready")
    # Graph back, with the same dates: no second ExpiryMismatch.
    fourth = decide(third.status, observation(found, typed, found.expires_at))
    assert "ExpiryMismatch" not in [e.reason for e in fourth.events]


def test_discovery_off_leaves_no_trace() -> None:
    obs = observation(None, None, None)
    plain = Observation(**{**{f: getattr(obs, f) for f in obs.__slots__}, "discovery_enabled": False})  # type: ignore[attr-defined]
    status = decide({"appCredentials": [], "expirySource": "Graph", "expiryMismatch": {}}, plain).status
    assert not {"appCredentials", "expirySource", "expiryMismatch"} & set(status)
    assert all(c["type"] != "ExpiryDiscovered" for c in status["conditions"])


@pytest.mark.parametrize(
    ("cloud", "host"),
    [
        ("AzurePublic", "https://graph.microsoft.com"),
        ("AzureUSGovernment", "https://graph.microsoft.us"),
        ("AzureChina", "https://microsoftgraph.chinacloudapi.cn"),
    ],
)
def test_graph_host_and_scope_follow_the_cloud(cloud: str, host: str) -> None:
    raw: dict[str, Any] = {
        "username": "no-reply@contoso.com",
        "identity": {
            "tenantId": "contoso.onmicrosoft.com",
            "clientId": CLIENT,
            "cloud": cloud,
            "clientSecret": {"secretKeyRef": {"name": "s", "key": "k"}},
            "discovery": {"graph": True},
        },
    }
    spec = parse_spec(raw)
    assert spec.discover_graph is True
    assert spec.graph_host == host
    assert spec.graph_scope == f"{host}/.default"
    # A test host overrides where Graph is reached, never the token's audience.
    raw["identity"]["discovery"]["graphHost"] = "https://127.0.0.1:8443/"
    spec = parse_spec(raw)
    assert spec.graph_host == "https://127.0.0.1:8443"
    assert spec.graph_scope == f"{host}/.default"
    raw["identity"]["discovery"] = {"graph": "yes"}
    with pytest.raises(SpecError, match=r"identity\.discovery\.graph"):
        parse_spec(raw)
    raw["identity"]["discovery"] = {"graph": True, "graphHost": "http://graph"}
    with pytest.raises(SpecError, match="graphHost"):
        parse_spec(raw)
    raw["identity"].pop("discovery")
    assert parse_spec(raw).discover_graph is False
