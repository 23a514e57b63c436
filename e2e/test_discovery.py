"""Expiry discovery from Microsoft Graph on the real control plane (issue 14): the operator process reads the
local Graph (over the local Entra ID's directory) with its own Graph token.

A typed expiresAt that disagrees → one ExpiryMismatch Event (also across a restart) and the alarm, the
e-mail and the metric follow Graph's date; a second secret added in the "portal" → listed, the one in use
marked; no permission / throttled → GraphAccessDenied / GraphThrottled while Ready stays True. Every
secret and token handed out, including addPassword's secretText, is a leak canary.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from e2e.fixtures import App, Dev, Namespace, OperatorProcess, wait_until
from e2e.test_expiry import EXPIRY_METRIC, _series

from smtp_oauth_operator.testing.graph import GRAPH_RESOURCE

pytestmark = pytest.mark.e2e

ADMIN = "admin@contoso.com"
PIECE = 24


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _spec(dev: Dev, app: App, **extra: Any) -> dict[str, Any]:
    spec = dev.spec(app, **extra)
    spec["identity"]["discovery"] = {"graph": True, "graphHost": dev.graph.base_url}
    return spec


def _no_leak(dev: Dev, ns: Namespace, operator: OperatorProcess, name: str) -> None:
    text = "\n".join([operator.log(), json.dumps(ns.config(name)), json.dumps(ns.events_for(name))])
    for secret in [*dev.secrets, *dev.graph.returned_secrets, *dev.idp.issued_tokens]:
        assert secret not in text
        leaked = [
            secret[i : i + PIECE] for i in range(len(secret) - PIECE + 1) if secret[i : i + PIECE] in text
        ]
        assert not leaked, f"a piece of a secret or token appears in the output: {leaked[:1]}"


def _recheck(ns: Namespace, name: str, value: str) -> None:
    ns.kubectl("annotate", "smtpoauthconfig", name, f"smtpoauth.dev/recheck={value}", "--overwrite")
    wait_until(
        lambda: ns.config(name)["status"].get("handledRecheck") == value,
        timeout=30,
        what=f"{name} to handle recheck {value}",
    )


def test_mismatch_once_alarm_follows_graph_and_second_secret_is_listed(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = dev.new_app()
    dev.idp.grant_api_roles(app.tenant_id, app.client_id, GRAPH_RESOURCE, "Application.Read.All")
    graph_end = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    dev.idp.set_secret_end(app.tenant_id, app.client_id, app.secret, graph_end)
    typed = "2036-01-01T00:00:00Z"
    ns.secret(app.secret)
    spec = _spec(dev, app, alarms={"notify": {"to": [ADMIN]}})
    spec["identity"]["clientSecret"]["expiresAt"] = typed
    ns.smtp_oauth_config("mail", spec)

    ns.wait_for_condition("mail", "ExpiryDiscovered", "True", "Discovered")
    obj = ns.wait_for_condition("mail", "CredentialExpiring", "True", "ExpiringSoon")
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    status = obj["status"]
    assert status["clientSecretExpiresAt"] == _rfc3339(graph_end)
    assert status["expirySource"] == "Graph"
    assert status["expiryMismatch"] == {"specExpiresAt": typed, "graphExpiresAt": _rfc3339(graph_end)}
    (listed,) = status["appCredentials"]
    assert listed["inUse"] is True
    assert listed["hint"] == app.secret[:3]
    wait_until(lambda: ns.count_events("mail", "ExpiryMismatch") == 1, timeout=30, what="ExpiryMismatch")
    (event,) = [e for e in ns.events_for("mail") if e["reason"] == "ExpiryMismatch"]
    assert event["type"] == "Warning"
    assert typed in event["message"]

    # The alarm and its e-mail carry Graph's date (3 days), not the typed one (10 years).
    wait_until(
        lambda: [m for m in dev.messages(app) if ADMIN in m.rcpt_tos], timeout=30, what="the alarm e-mail"
    )
    (mail,) = [m for m in dev.messages(app) if ADMIN in m.rcpt_tos]
    assert "expires in 2 days" in str(mail.message["Subject"])
    assert _rfc3339(graph_end)[:10] in mail.message.get_content()
    text = wait_until(
        lambda: (t := operator.metrics()) and _series(t, EXPIRY_METRIC, ns.name, "mail") and t,
        timeout=10,
        what="the expiry metric",
    )
    assert _series(text, EXPIRY_METRIC, ns.name, "mail") == [graph_end.timestamp()]

    # A colleague adds a second secret in the portal: after a manual recheck it is listed, not in use.
    dev.graph.add_password(app.tenant_id, app.client_id, display_name="colleague")
    _recheck(ns, "mail", "second-secret")
    wait_until(
        lambda: len(ns.config("mail")["status"].get("appCredentials") or []) == 2,
        timeout=30,
        what="two credentials listed",
    )
    credentials = ns.config("mail")["status"]["appCredentials"]
    in_use = [c for c in credentials if c["inUse"]]
    assert len(in_use) == 1
    assert in_use[0]["hint"] == app.secret[:3]
    assert {c.get("displayName") for c in credentials if not c["inUse"]} == {"colleague"}

    # A restart says nothing again: no second ExpiryMismatch, no second alarm e-mail.
    operator.restart()
    wait_until(lambda: operator.seen_since_start(ns.name, "mail"), timeout=30, what="the re-list")
    _recheck(ns, "mail", "after-restart")
    time.sleep(2)
    assert ns.count_events("mail", "ExpiryMismatch") == 1
    assert len([m for m in dev.messages(app) if ADMIN in m.rcpt_tos]) == 1
    _no_leak(dev, ns, operator, "mail")


def test_denied_and_throttled_graph_leave_ready_alone(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    denied = dev.new_app()  # no Graph permission: Entra issues a Graph token without roles, Graph says 403
    ns.secret(denied.secret, name="denied")
    ns.smtp_oauth_config("denied", _spec(dev, denied, secret_name="denied"))
    obj = ns.wait_for_condition("denied", "ExpiryDiscovered", "False", "GraphAccessDenied")
    assert "Application.Read.All" in (ns.condition(obj, "ExpiryDiscovered") or {})["message"]
    ns.wait_for_condition("denied", "Ready", "True", "ConnectionTested")
    wait_until(
        lambda: ns.count_events("denied", "ExpiryDiscoveryFailed") == 1,
        timeout=30,
        what="ExpiryDiscoveryFailed",
    )

    throttled = dev.new_app()
    dev.idp.grant_api_roles(throttled.tenant_id, throttled.client_id, GRAPH_RESOURCE, "Application.Read.All")
    dev.graph.throttle(retry_after=3600)
    try:
        ns.secret(throttled.secret, name="throttled")
        ns.smtp_oauth_config("throttled", _spec(dev, throttled, secret_name="throttled"))
        obj = ns.wait_for_condition("throttled", "ExpiryDiscovered", "False", "GraphThrottled")
        assert "3600 s" in (ns.condition(obj, "ExpiryDiscovered") or {})["message"]
        ns.wait_for_condition("throttled", "Ready", "True", "ConnectionTested")
        # Retry-After is honoured: further passes (a manual recheck) do not read Graph again... until it is due.
        received = dev.graph.received
        _recheck(ns, "throttled", "while-throttled")
        assert dev.graph.received == received
    finally:
        dev.graph.clear_faults()
    _no_leak(dev, ns, operator, "denied")
    _no_leak(dev, ns, operator, "throttled")
