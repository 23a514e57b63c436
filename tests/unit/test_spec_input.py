"""Anything the API server (or a manifest) can hand the operator gets a status, never an exception.

The API server validates SmtpOAuthConfigs with the CRD's schema, but JSON-schema formats and CEL leave
room (``9999-12-31T23:59:59-05:00`` is valid RFC 3339 and year 10000 in UTC), objects written before a
schema tightened stay, and ``check`` reads manifests nobody validated. So: the spec parser raises
nothing but SpecError, and a pass over any body yields a decision (InvalidSpec for what is unusable).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.domain import expiry
from smtp_oauth_operator.domain.objects import SourceObject
from smtp_oauth_operator.domain.spec import SpecError, parse_spec, parse_time
from smtp_oauth_operator.domain.status import timestamp
from smtp_oauth_operator.services.evaluation import evaluate

NOW = datetime(2027, 1, 1, tzinfo=UTC)
VALID: dict[str, Any] = {
    "username": "no-reply@contoso.com",
    "smtp": {"host": "smtp.office365.com", "port": 587, "tls": "StartTLS", "connectionTimeoutSeconds": 30},
    "identity": {
        "tenantId": "11111111-1111-4111-8111-111111111111",
        "clientId": "22222222-2222-4222-8222-222222222222",
        "timeoutSeconds": 30,
        "clientSecret": {
            "secretKeyRef": {"name": "exo-app", "key": "client-secret"},
            "expiresAt": "2027-05-31T00:00:00Z",
        },
    },
    "proxy": {"url": "http://proxy.corp:3128"},
    "testMessage": {"to": "ops@contoso.com"},
    "recheckInterval": "1h",
    "alarms": {"warnBeforeDays": [30, 7], "notify": {"to": ["admin@contoso.com"]}},
    "secretPolicy": "Warn",
}
PATHS = [
    "username", "smtp", "smtp.host", "smtp.port", "smtp.tls", "smtp.connectionTimeoutSeconds",
    "smtp.caBundle", "identity", "identity.tenantId", "identity.clientId", "identity.cloud",
    "identity.authorityHost", "identity.scope", "identity.timeoutSeconds", "identity.caBundle",
    "identity.clientSecret", "identity.clientSecret.secretKeyRef", "identity.clientSecret.secretKeyRef.name",
    "identity.clientSecret.expiresAt", "identity.clientSecret.expiresAtKey", "proxy", "proxy.url",
    "testMessage", "testMessage.to", "testMessage.from", "recheckInterval", "alarms",
    "alarms.warnBeforeDays", "alarms.notify", "alarms.notify.to", "secretPolicy",
]  # fmt: skip


# RFC 3339 allows any offset up to ±23:59; near the ends of the calendar it moves the year out of range,
# so those ends get their own share of the examples (hypothesis wants naive bounds: DTZ001 does not apply).
def _naive(*args: int) -> datetime:
    return datetime(*args)  # noqa: DTZ001 - hypothesis takes naive bounds and adds the zone itself


offsets = st.integers(min_value=-1439, max_value=1439).map(lambda m: timezone(timedelta(minutes=m)))
times = (
    st.datetimes(timezones=st.none() | offsets)
    | st.datetimes(min_value=_naive(9999, 12, 30), timezones=offsets)
    | st.datetimes(max_value=_naive(1, 1, 2), timezones=offsets)
    | st.datetimes(min_value=_naive(1969, 12, 30), max_value=_naive(1970, 1, 2), timezones=offsets)
)
rfc3339 = times.map(lambda d: d.isoformat())

# What JSON (the API server) and YAML (check's manifests) can hold: YAML adds dates and times.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | times
    | rfc3339
    | st.dates()
    | st.sampled_from(
        [
            "9999-12-31T23:59:59-05:00",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59.999999999Z",
            "2027-02-30T00:00:00Z",
            "2027-05-31T24:00:00Z",
            "2027-05-31T23:59:60Z",
            "1h99999999m",
            "http://user:p@ss@proxy:3128",
            "https://[::1]:99999",
            "",
            " ",
        ]
    )
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _set(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    spec = json.loads(json.dumps(spec))
    node = spec
    *parents, leaf = path.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value
    return spec


def _parse_and_use(spec: Any) -> None:
    """parse_spec, then what the operator does with a parsed spec's dates (expiry maths, status)."""
    try:
        parsed = parse_spec(spec)
    except SpecError:
        return
    state = expiry.evaluate(parsed.expires_at, NOW, parsed.warn_before_days)
    if state.expires_at is not None:
        timestamp(state.expires_at)
        expiry.format_date(state.expires_at)
    if state.remaining is not None:
        expiry.days_phrase(state.remaining)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=values)
def test_any_value_anywhere_is_a_spec_error_at_worst(path: str, value: Any) -> None:
    _parse_and_use(_set(VALID, path, value))


@settings(max_examples=300, deadline=None)
@given(value=times | rfc3339 | st.dates() | st.dates().map(str))
def test_any_expiry_date_is_a_spec_error_at_worst(value: Any) -> None:
    _parse_and_use(_set(VALID, "identity.clientSecret.expiresAt", value))


@settings(max_examples=200, deadline=None)
@given(spec=values)
def test_any_document_as_spec_is_a_spec_error_at_worst(spec: Any) -> None:
    _parse_and_use(spec)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40) | rfc3339)
def test_parse_time_raises_only_value_error(text: str) -> None:
    try:
        parsed = parse_time(text)
    except ValueError:
        return
    assert parsed.tzinfo is UTC
    assert timestamp(parsed)[:4].isdigit()


class NoObjects:
    async def read(
        self, kind: Literal["Secret", "ConfigMap"], namespace: str, name: str
    ) -> SourceObject | None:
        raise AssertionError("an unusable resource must not read anything")


def _body(metadata: Any, spec: Any) -> dict[str, Any]:
    return {"metadata": metadata, "spec": spec, "status": {}}


@pytest.mark.parametrize(
    ("metadata", "spec", "expected"),
    [
        (
            {"name": "x", "namespace": "mail", "generation": 1},
            _set(VALID, "identity.clientSecret.expiresAt", "9999-12-31T23:59:59-05:00"),
            "spec.identity.clientSecret.expiresAt",
        ),
        (
            {"name": "x", "namespace": "mail", "generation": 1},
            _set(VALID, "identity.clientSecret.expiresAt", "1969-12-31T23:59:59Z"),
            "outside 1970-01-01 to 9999-12-31",
        ),
        ({"name": "x", "namespace": "mail", "generation": "three"}, VALID, "metadata: generation must be"),
        ({"name": "x", "namespace": "mail", "generation": 1.5}, VALID, "metadata: generation must be"),
        (
            {"name": "x", "generation": 1, "annotations": ["not", "a", "map"]},
            "foo",
            "spec: must be an object",
        ),
        ("foo", VALID, "metadata: must be an object"),
        ({"name": "x", "generation": 1}, {"username": ["a"]}, "spec.username"),
    ],
    ids=[
        "expiry-year-10000",
        "expiry-before-1970",
        "generation-text",
        "generation-float",
        "spec-string",
        "metadata-string",
        "username-list",
    ],
)
async def test_a_pass_over_an_unusable_body_is_invalid_spec(metadata: Any, spec: Any, expected: str) -> None:
    result = await evaluate(_body(metadata, spec), NoObjects(), TokenProvider(), now=NOW)
    ready = result.decision.ready
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert expected in ready["message"], ready["message"]
    assert result.decision.status["conditions"]
