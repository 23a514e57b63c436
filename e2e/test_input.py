"""Objects the API server accepts that once broke the operator (issue 10, defects 10, 11 and 12).

- A resource named with the full 253 characters gets its Events (an Event named ``<name>.<16 hex>``
  is longer than a name may be: the API server answered 422 and the Event was lost).
- ``expiresAt: 9999-12-31T23:59:59-05:00`` passes the CRD (RFC 3339) but is in the year 10000 in UTC:
  the resource gets InvalidSpec instead of no status at all.
- SMTP through a proxy that wants credentials works, and the credentials appear nowhere.
"""

from __future__ import annotations

import base64
import json
import uuid

import pytest
from e2e.fixtures import Dev, Namespace, OperatorProcess

from smtp_oauth_operator.testing.peers import HttpConnectProxy

pytestmark = pytest.mark.e2e


def test_a_resource_with_a_253_character_name_gets_its_events(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    # Cut at 236 characters (253 minus ".<16 hex>") this name would end in a dot: not a valid name.
    name = ("a" * 63 + ".") * 3 + "a" * 43 + "." + "b" * 17
    assert name[235] == "."
    assert len(name) == 253
    app = dev.new_app()
    ns.secret(app.secret)
    ns.smtp_oauth_config(name, dev.spec(app))
    ns.wait_for_condition(name, "Ready", "True", "ConnectionTested")
    events = [e for e in ns.events_for(name) if e["reason"] == "ConnectionTestSucceeded"]
    assert len(events) == 1, ns.events_for(name)
    event = events[0]
    assert event["involvedObject"]["name"] == name
    assert len(event["metadata"]["name"]) <= 253
    assert "Could not post Event" not in operator.current_log()


def test_an_expiry_in_the_year_10000_utc_is_invalid_spec(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = dev.new_app()
    ns.secret(app.secret)
    spec = dev.spec(app)
    spec["identity"]["clientSecret"]["expiresAt"] = "9999-12-31T23:59:59-05:00"
    ns.smtp_oauth_config("mail", spec)  # the API server accepts it
    obj = ns.wait_for_condition("mail", "Ready", "False", "InvalidSpec")
    message = ns.condition(obj, "Ready")["message"]  # type: ignore[index]
    assert "spec.identity.clientSecret.expiresAt" in message
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert ns.count_events("mail", "ConnectionTestFailed") == 1
    assert "OverflowError" not in operator.current_log()
    assert dev.auth_attempts(app) == []  # an unusable spec is not tested


def test_smtp_through_an_authenticating_proxy_and_its_password_stays_secret(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    """Issue 10 defect 11 on the real operator: both tunnels authenticate to the proxy, and neither the
    operator's debug log nor status, Events or metrics carry the credentials."""
    password = "e2e-PROXY~pa55." + uuid.uuid4().hex
    basic = base64.b64encode(f"proxy-user:{password}".encode()).decode()
    with HttpConnectProxy(credentials=("proxy-user", password)) as proxy:
        app = dev.new_app()
        ns.secret(app.secret)
        spec = dev.spec(app)
        spec["proxy"] = {"url": f"http://proxy-user:{password}@127.0.0.1:{proxy.port}"}
        ns.smtp_oauth_config("mail", spec)
        ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
        assert proxy.tunnels == 2
        assert set(proxy.authorizations) == {f"Basic {basic}"}
        # A wrong password: the token request is refused by the proxy (407), and nothing leaks either.
        spec["proxy"] = {"url": f"http://proxy-user:{password[::-1]}@127.0.0.1:{proxy.port}"}
        ns.smtp_oauth_config("mail", spec)
        obj = ns.wait_for_condition("mail", "Ready", "False", "IdentityProviderUnreachable")
        assert f"127.0.0.1:{proxy.port}" in ns.condition(obj, "Ready")["message"]  # type: ignore[index]
    output = "\n".join(
        [
            operator.log(),
            json.dumps(ns.config("mail")["status"]),
            ns.kubectl("get", "events", "-o", "json").stdout,
            operator.metrics(),
        ]
    )
    for form in (password, password[::-1], basic, "proxy-user:"):
        assert form not in output, form
