"""Objects the API server accepts that once broke the operator (issue 10, defects 10 and 12).

- A resource named with the full 253 characters gets its Events (an Event named ``<name>.<16 hex>``
  is longer than a name may be: the API server answered 422 and the Event was lost).
- ``expiresAt: 9999-12-31T23:59:59-05:00`` passes the CRD (RFC 3339) but is in the year 10000 in UTC:
  the resource gets InvalidSpec instead of no status at all.
"""

from __future__ import annotations

import pytest
from e2e.fixtures import Dev, Namespace, OperatorProcess

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
