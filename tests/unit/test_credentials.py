"""Certificate credentials (domain/credentials.py), their status and alarms (domain/status.py), and how
clients/identity.py names a credential and explains a federated mismatch, without any network."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from tests.unit.test_status import T0, cond, observe, reasons

from smtp_oauth_operator.clients.identity import (
    FederatedAssertion,
    TokenRequest,
    _claims,
    _for_credential,
    _mismatch,
)
from smtp_oauth_operator.domain.credentials import CertificateError, parse_certificate
from smtp_oauth_operator.domain.expiry import evaluate
from smtp_oauth_operator.domain.reasons import ConditionType, Reason
from smtp_oauth_operator.domain.status import decide
from smtp_oauth_operator.testing.pki import client_credential_cert

CERT = client_credential_cert("unit")


def test_parse_certificate_facts_and_no_key_in_repr_or_status() -> None:
    parsed = parse_certificate(CERT.cert_pem, CERT.key_pem)
    leaf = x509.load_pem_x509_certificate(CERT.cert_pem.encode())
    assert parsed.thumbprint_sha256 == leaf.fingerprint(hashes.SHA256()).hex()
    assert parsed.not_after == leaf.not_valid_after_utc
    assert parsed.subject == "CN=unit"
    body = "".join(CERT.key_pem.splitlines()[1:-1])
    assert body[:40] not in repr(parsed)
    assert body[:40] not in json.dumps(parsed.status())
    assert set(parsed.status()) == {"thumbprintSHA256", "thumbprintSHA1", "subject", "notAfter"}


def _ca_signed() -> tuple[str, str, str]:
    """(ca pem, leaf pem, leaf key pem): an RSA leaf issued by a CA."""
    ca_key = rsa.generate_private_key(65537, 2048)
    key = rsa.generate_private_key(65537, 2048)
    now = datetime.now(UTC)

    def build(subject: str, public: rsa.RSAPublicKey, issuer: str) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .sign(ca_key, hashes.SHA256())
        )

    pem = serialization.Encoding.PEM
    ca = build("ca", ca_key.public_key(), "ca").public_bytes(pem).decode()
    leaf = build("leaf", key.public_key(), "ca").public_bytes(pem).decode()
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    return ca, leaf, key_pem


def test_chain_leaf_first_and_wrong_order_is_refused() -> None:
    ca, leaf, key = _ca_signed()
    parsed = parse_certificate(leaf + ca, key)
    assert parsed.chain_pem.count("BEGIN CERTIFICATE") == 2
    assert parsed.leaf_pem.count("BEGIN CERTIFICATE") == 1
    assert parsed.subject == "CN=leaf"
    with pytest.raises(CertificateError, match="leaf must come first"):
        parse_certificate(ca + leaf, key)


def test_encrypted_and_ec_keys_are_refused_with_a_reason() -> None:
    key = serialization.load_pem_private_key(CERT.key_pem.encode(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    ).decode()
    with pytest.raises(CertificateError, match="encrypted"):
        parse_certificate(CERT.cert_pem, encrypted)
    ec = client_credential_cert("ec", key_type="ec")
    with pytest.raises(CertificateError, match="RSA"):
        parse_certificate(ec.cert_pem, ec.key_pem)


# ---------------------------------------------------------------------------------------------------- status


def _cert_obs(now: datetime, not_after: datetime) -> object:
    parsed = parse_certificate(CERT.cert_pem, CERT.key_pem)
    return replace(
        observe(now, expires=not_after),
        credential="ClientCertificate",
        certificate={**parsed.status(), "notAfter": not_after.strftime("%Y-%m-%dT%H:%M:%SZ")},
        expiry=evaluate(not_after, now, (30, 14, 7, 1)),
    )


def test_certificate_status_alarm_once_and_rotation() -> None:
    not_after = T0 + timedelta(days=3)
    d1 = decide(None, _cert_obs(T0, not_after))  # type: ignore[arg-type]
    assert d1.status["clientCertificate"]["notAfter"] == not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "clientSecretExpiresAt" not in d1.status
    assert cond(d1, ConditionType.CREDENTIAL_EXPIRING)["reason"] == Reason.EXPIRING_SOON
    assert "certificate" in cond(d1, ConditionType.CREDENTIAL_EXPIRING)["message"]
    assert d1.alarm is not None
    assert d1.alarm.kind == "ClientCertificateExpiringSoon"
    assert d1.alarm.subject.startswith("[smtp-oauth-operator] Certificate of app")
    assert "ClientCertificateExpiringSoon" in reasons(d1)

    d2 = decide(d1.status, _cert_obs(T0 + timedelta(hours=1), not_after))  # type: ignore[arg-type]
    assert d2.alarm is None  # the same threshold is not announced twice
    assert "ClientCertificateExpiringSoon" not in reasons(d2)

    renewed = T0 + timedelta(days=90)
    d3 = decide(d2.status, _cert_obs(T0 + timedelta(hours=2), renewed))  # type: ignore[arg-type]
    assert "ClientCertificateRotated" in reasons(d3)
    assert cond(d3, ConditionType.CREDENTIAL_EXPIRING)["reason"] == Reason.NOT_EXPIRING


def test_expired_certificate_makes_ready_false_with_certificate_expired() -> None:
    d = decide(None, _cert_obs(T0, T0 - timedelta(days=1)))  # type: ignore[arg-type]
    assert cond(d, ConditionType.READY)["reason"] == Reason.CERTIFICATE_EXPIRED
    assert d.alarm is not None
    assert d.alarm.kind == "ClientCertificateExpired"


def test_workload_identity_expires_nothing() -> None:
    d = decide(None, replace(observe(T0, expires=None), credential="WorkloadIdentity"))
    expiring = cond(d, ConditionType.CREDENTIAL_EXPIRING)
    assert (expiring["status"], expiring["reason"]) == ("False", Reason.NOT_EXPIRING)
    assert "Nothing expires" in expiring["message"]
    assert d.alarm is None
    assert cond(d, ConditionType.READY)["status"] == "True"


# ---------------------------------------------------------------------------------------------------- identity


def _request(**kwargs: object) -> TokenRequest:
    kwargs.setdefault("client_secret", "")
    return TokenRequest("https://idp", "t", "c", "s/.default", **kwargs)  # type: ignore[arg-type]


def test_credential_id_names_the_credential_without_holding_it() -> None:
    parsed = parse_certificate(CERT.cert_pem, CERT.key_pem)
    cert = _request(certificate=parsed)
    assert cert.credential_id() == f"cert:{parsed.thumbprint_sha256}"
    assert _request(certificate=parsed, send_certificate_chain=True).cache_key() != cert.cache_key()
    assert CERT.key_pem[40:80] not in repr(cert.cache_key())
    assert CERT.key_pem[40:80] not in repr(cert)
    credential = cert.msal_credential({})
    assert isinstance(credential, dict)
    assert credential["public_certificate"] == parsed.leaf_pem
    assert "thumbprint" not in credential  # SHA-1 "thumbprint" would make MSAL sign RS256 with x5t
    federated = _request(assertion=FederatedAssertion("serviceaccount:mail/sender aud=x", lambda: "t.o.k"))
    assert federated.credential_id() == "federated:serviceaccount:mail/sender aud=x"
    assert _request(client_secret="abc").credential_id().startswith("secret:")


def _jwt(claims: dict[str, object]) -> str:
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{part}.c2ln"


def test_presented_claims_and_mismatch_messages() -> None:
    presented = _claims(
        _jwt({"iss": "https://issuer", "sub": "system:serviceaccount:a:b", "aud": ["api://X"]})
    )
    assert presented == {"iss": "https://issuer", "sub": "system:serviceaccount:a:b", "aud": "api://X"}
    assert _claims("not-a-jwt") == {}
    subject = _mismatch(700213, presented, "AADSTS700213: …")
    assert "subject the operator presented, 'system:serviceaccount:a:b'" in subject
    assert "issuer the operator presented, 'https://issuer'" in _mismatch(700211, presented, "x")
    assert "audience the operator presented, 'api://X'" in _mismatch(700212, presented, "x")
    generic = _mismatch(70021, presented, "x")
    assert "issuer 'https://issuer'" in generic
    assert "subject 'system:serviceaccount:a:b'" in generic


def test_the_same_entra_error_means_different_things_per_credential() -> None:
    parsed = parse_certificate(CERT.cert_pem, CERT.key_pem)
    cert = _request(certificate=parsed)
    federated = _request(assertion=FederatedAssertion("f", lambda: ""))
    secret = _request(client_secret="x")
    assert _for_credential(Reason.INVALID_CLIENT_SECRET, None, cert) is Reason.CERTIFICATE_NOT_REGISTERED
    assert _for_credential(Reason.CERTIFICATE_NOT_REGISTERED, 700027, federated) is (
        Reason.FEDERATED_CREDENTIAL_MISMATCH
    )
    assert _for_credential(Reason.INVALID_CLIENT_SECRET, 7000215, secret) is Reason.INVALID_CLIENT_SECRET


def test_unreadable_certificate_has_unknown_expiry_without_secret_advice() -> None:
    obs = replace(observe(T0, expires=None), credential="ClientCertificate", certificate=None)
    expiring = cond(decide(None, obs), ConditionType.CREDENTIAL_EXPIRING)
    assert expiring["reason"] == Reason.EXPIRY_UNKNOWN
    assert "clientSecret" not in expiring["message"]
