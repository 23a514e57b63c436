"""Renewal's spec and the spec a switched resource is tested with (no I/O)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from smtp_oauth_operator.domain.reasons import Reason
from smtp_oauth_operator.domain.renewal import condition, owned_secret_name, renewed_spec
from smtp_oauth_operator.domain.spec import SpecError, parse_long_duration, parse_spec

CLIENT = "22222222-2222-4222-8222-222222222222"


def raw(renewal: Any, graph: bool = True) -> dict[str, Any]:
    return {
        "username": "no-reply@contoso.com",
        "identity": {
            "tenantId": "contoso.onmicrosoft.com",
            "clientId": CLIENT,
            "clientSecret": {
                "secretKeyRef": {"name": "exo-app", "key": "client-secret"},
                "expiresAt": "2030-01-01T00:00:00Z",
                "renewal": renewal,
            },
            "discovery": {"graph": graph},
        },
    }


def test_defaults_and_days() -> None:
    spec = parse_spec(raw({}))
    assert spec.renewal is not None
    assert (spec.renewal.renew_before, spec.renewal.validity, spec.renewal.grace_period) == (
        timedelta(days=30),
        timedelta(days=180),
        timedelta(hours=24),
    )
    assert parse_long_duration("1d12h") == timedelta(days=1, hours=12)
    assert parse_long_duration("90s") == timedelta(seconds=90)


@pytest.mark.parametrize(
    ("renewal", "graph", "field"),
    [
        ({}, False, "identity.clientSecret.renewal"),
        ({"renewBefore": "30 days"}, True, "identity.clientSecret.renewal.renewBefore"),
        ({"validity": "1000d"}, True, "identity.clientSecret.renewal.validity"),
        ({"renewBefore": "200d", "validity": "180d"}, True, "identity.clientSecret.renewal.renewBefore"),
    ],
)
def test_bad_renewal(renewal: dict[str, Any], graph: bool, field: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(raw(renewal, graph))
    assert caught.value.field == field


def test_switched_resource_reads_the_operators_secret() -> None:
    spec = parse_spec(raw({}))
    assert renewed_spec(spec, None) is spec
    assert renewed_spec(spec, {"phase": "Testing", "secretName": "mail-renewed"}) is spec
    for phase in ("Active", "Removing", "Done"):
        switched = renewed_spec(spec, {"phase": phase, "secretName": "mail-renewed"})
        assert switched.secret_ref is not None
        assert (switched.secret_ref.name, switched.secret_ref.key) == ("mail-renewed", "client-secret")
        assert switched.expires_at is None  # the typed date was the old secret's
    # Renewal turned off: back to the spec's Secret, whatever status says.
    off = parse_spec(
        {
            **raw({}),
            "identity": {**raw({})["identity"], "clientSecret": {"secretKeyRef": {"name": "a", "key": "b"}}},
        }
    )
    assert renewed_spec(off, {"phase": "Done", "secretName": "mail-renewed"}) is off


def test_a_second_renewal_keeps_the_secret_in_use_until_its_switch() -> None:
    spec = parse_spec(raw({}))
    state = {"phase": "Adding", "secretName": "mail-renewed-b", "fromSecret": "mail-renewed"}
    during = renewed_spec(spec, state)
    assert during.secret_ref is not None
    assert during.secret_ref.name == "mail-renewed"
    after = renewed_spec(spec, {**state, "phase": "Active"})
    assert after.secret_ref is not None
    assert after.secret_ref.name == "mail-renewed-b"
    assert owned_secret_name("mail", other_than="mail-renewed") == "mail-renewed-b"
    assert owned_secret_name("mail", other_than="mail-renewed-b") == "mail-renewed"


def test_owned_secret_name_fits() -> None:
    assert owned_secret_name("mail") == "mail-renewed"
    long = owned_secret_name("a" * 253)
    assert len(long) <= 253
    assert long.endswith("-renewed")
    assert long != owned_secret_name("a" * 252 + "b")
    assert owned_secret_name("mail", suffix="registered") == "mail-registered"
    assert len(owned_secret_name("a" * 253, suffix="registered")) <= 253


def test_the_renewal_condition_names_a_failing_step_and_clears_once_it_passes() -> None:
    failure = {"step": "addPassword", "reason": "GraphAccessDenied", "message": "Graph refused addPassword."}
    status, reason, message = condition({"phase": "Adding", "lastFailure": failure})
    assert (status, reason) == ("False", Reason.RENEWAL_FAILED)
    assert "addPassword" in message
    assert "GraphAccessDenied" in message
    assert condition({"phase": "Adding"})[:2] == ("Unknown", Reason.RENEWING)
    assert condition({"phase": "Active", "removeAfter": "2026-01-01T00:00:00Z"})[:2] == (
        "Unknown",
        Reason.RENEWING,
    )
    done = {"phase": "Done", "secretName": "mail-renewed", "switchedAt": "2026-01-01T00:00:00Z"}
    assert condition(done)[:2] == ("True", Reason.RENEWED)
    copied = {"kind": "ClientCertificate", "phase": "Done", "secretName": "mail-renewed", "thumbprint": "ab"}
    assert condition(copied)[:2] == ("True", Reason.RENEWAL_SCHEDULED)
    assert condition({**copied, "lastFailure": failure})[:2] == ("False", Reason.RENEWAL_FAILED)
    assert condition(None)[:2] == ("True", Reason.RENEWAL_SCHEDULED)


def cert_raw(renewal: Any, graph: bool = True) -> dict[str, Any]:
    spec = raw({}, graph)
    del spec["identity"]["clientSecret"]
    spec["identity"]["clientCertificate"] = {"secretRef": {"name": "exo-cert"}, "renewal": renewal}
    return spec


def test_certificate_renewal_spec() -> None:
    spec = parse_spec(cert_raw({"gracePeriod": "2h"}))
    assert spec.client_certificate is not None
    assert spec.client_certificate.renewal_grace == parse_long_duration("2h")
    assert spec.renews
    assert parse_spec(cert_raw({})).client_certificate.renewal_grace == parse_long_duration("24h")  # type: ignore[union-attr]
    with pytest.raises(SpecError, match=r"identity\.clientCertificate\.renewal"):
        parse_spec(cert_raw({}, graph=False))
    with pytest.raises(SpecError, match="gracePeriod"):
        parse_spec(cert_raw({"gracePeriod": "soon"}))


def test_a_certificate_under_renewal_authenticates_with_the_operators_copy() -> None:
    spec = parse_spec(cert_raw({}))
    assert renewed_spec(spec, None) is spec
    assert renewed_spec(spec, {"kind": "ClientCertificate", "phase": "Adding"}) is spec  # no copy yet
    state = {"kind": "ClientCertificate", "phase": "Adding", "secretName": "mail-renewed"}
    for phase in ("Done", "Adding", "Testing", "Active", "Removing"):
        used = renewed_spec(spec, {**state, "phase": phase})
        assert used.credential_secret == "mail-renewed"
        assert used.referenced_objects() == {("Secret", "mail-renewed")}
    # A secret renewal's state does not move a certificate, and renewal off ignores any state.
    assert renewed_spec(spec, {"phase": "Done", "secretName": "mail-renewed"}) is spec
    off = parse_spec(
        {
            **cert_raw({}),
            "identity": {
                **cert_raw({})["identity"],
                "clientCertificate": {"secretRef": {"name": "exo-cert"}},
            },
        }
    )
    assert renewed_spec(off, state) is off
