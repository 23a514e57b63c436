"""Certificate and workload identity credentials, for real, through ``smtp-oauth-operator check``.

The local Entra ID verifies private_key_jwt assertions against the certificates uploaded to the app
(x5t#S256 / x5t, signature, aud, exp/nbf, iss/sub) and federated assertions against a local OIDC
issuer (discovery, JWKS, signature, issuer, subject, audience, lifetime). Every run also proves that
no private key and no ServiceAccount token reaches any output: whole, base64-encoded, or any
24-character piece.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from tests.integration.conftest import CANARY, CLIENT, Peers

from smtp_oauth_operator import cli
from smtp_oauth_operator.testing.idp import FederatedCredential
from smtp_oauth_operator.testing.issuer import OidcIssuer
from smtp_oauth_operator.testing.pki import ClientCredentialCert, client_credential_cert

TENANT = "11111111-1111-4111-8111-111111111111"
SUBJECT = "system:serviceaccount:mail:mail-sender"
AUDIENCE = "api://AzureADTokenExchange"
CERT_SPEC = {
    "identity.clientSecret": None,
    "identity.clientCertificate": {"secretRef": {"name": "exo-app-cert"}},
}
WI_SPEC = {"identity.clientSecret": None, "identity.workloadIdentity": {"serviceAccountName": "mail-sender"}}
PIECE = 24


def pieces(value: str) -> set[str]:
    """Every ``PIECE``-character window of ``value`` (for a PEM: of its base64 body)."""
    if "-----BEGIN" in value:
        value = "".join(line for line in value.splitlines() if not line.startswith("-----"))
    return {value[i : i + PIECE] for i in range(max(len(value) - PIECE + 1, 1))}


def assert_no_leak(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text
        assert base64.b64encode(secret.encode()).decode() not in text
        leaked = [p for p in pieces(secret) if p in text]
        assert not leaked, f"a {PIECE}-character piece of a secret appears in the output: {leaked[:1]}"


def run_check(
    peers: Peers,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    path: Path,
    *extra: str,
    secrets: list[str],
) -> tuple[int, dict[str, Any]]:
    caplog.set_level(logging.DEBUG)
    code = cli.main(["check", "-f", str(path), "-o", "json", *extra])
    out, err = capsys.readouterr()
    ours = [r for r in caplog.records if not r.name.startswith(("mail.log", "smtp_oauth_operator.testing"))]
    everything = out + err + "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in ours)
    # And the text form, which prints the same conditions differently.
    assert cli.main(["check", "-f", str(path), *extra]) == code
    everything += "".join(capsys.readouterr())
    assert CANARY not in everything
    assert_no_leak(everything, [*secrets, *peers.idp.issued_tokens, *peers.idp.received_assertions])
    (result,) = json.loads(out)
    return code, result


def conditions(result: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in result["conditions"]}


@pytest.fixture(scope="session")
def credential() -> ClientCredentialCert:
    return client_credential_cert("exo-app")


def with_cert(peers: Peers, cert: ClientCredentialCert, **spec: Any) -> Path:
    peers.extra_docs.append(cert.secret("exo-app-cert", "mail"))
    return peers.manifests(peers.spec(**{**CERT_SPEC, **spec}), secret=False)


# ---------------------------------------------------------------------------------------------------- certificates


@pytest.mark.parametrize("chain", [False, True], ids=["leaf", "chain"])
def test_certificate_ready(
    peers: Peers,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    credential: ClientCredentialCert,
    chain: bool,
) -> None:
    peers.idp.add_certificate(TENANT, CLIENT, credential.cert_pem)
    path = with_cert(
        peers,
        credential,
        **{
            "identity.clientCertificate": {
                "secretRef": {"name": "exo-app-cert"},
                "sendCertificateChain": chain,
            }
        },
    )
    code, result = run_check(peers, capsys, caplog, path, secrets=[credential.key_pem])
    assert code == 0, result["message"]
    assert conditions(result)["TokenAcquired"] == ("True", "TokenIssued")
    assert result["clientCertificate"]["thumbprintSHA256"] == credential.thumbprint_sha256
    expiring = next(c for c in result["conditions"] if c["type"] == "CredentialExpiring")
    assert expiring["reason"] == "NotExpiring"
    assert "certificate expires" in expiring["message"]
    (assertion,) = peers.idp.received_assertions[-1:]
    header = jwt.get_unverified_header(assertion)
    # The modern form: PS256 with the SHA-256 thumbprint, as MSAL >= 1.35 does with public_certificate.
    assert header["alg"] == "PS256"
    assert base64.urlsafe_b64decode(header["x5t#S256"] + "==").hex() == credential.thumbprint_sha256
    assert "x5t" not in header
    assert len(header["x5c"]) == 1


def test_certificate_pkcs1_key(
    peers: Peers, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    cert = client_credential_cert("pkcs1", key_format="pkcs1")
    assert "BEGIN RSA PRIVATE KEY" in cert.key_pem
    peers.idp.add_certificate(TENANT, CLIENT, cert.cert_pem)
    code, result = run_check(peers, capsys, caplog, with_cert(peers, cert), secrets=[cert.key_pem])
    assert code == 0, result["message"]


def _cert_case(peers: Peers, credential: ClientCredentialCert, case: str) -> tuple[Path, list[str]]:
    if case == "not-found":
        return peers.manifests(peers.spec(**CERT_SPEC), secret=False), [credential.key_pem]
    if case == "not-tls":
        secret = credential.secret("exo-app-cert", "mail")
        secret["type"] = "Opaque"
        peers.extra_docs.append(secret)
        return peers.manifests(peers.spec(**CERT_SPEC), secret=False), [credential.key_pem]
    if case == "key-mismatch":
        other = client_credential_cert("other")
        mixed = ClientCredentialCert(credential.cert_pem, other.key_pem, credential.not_after)
        return with_cert(peers, mixed), [other.key_pem]
    if case == "unparsable":
        broken = ClientCredentialCert(
            "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
            credential.key_pem,
            credential.not_after,
        )
        return with_cert(peers, broken), [credential.key_pem]
    if case == "ec-key":
        ec = client_credential_cert("ec", key_type="ec")
        return with_cert(peers, ec), [ec.key_pem]
    if case == "expired":
        old = client_credential_cert("old", not_after=datetime.now(UTC) - timedelta(days=1))
        peers.idp.add_certificate(TENANT, CLIENT, old.cert_pem)
        return with_cert(peers, old), [old.key_pem]
    assert case == "not-registered"
    return with_cert(peers, credential), [credential.key_pem]


@pytest.mark.parametrize(
    ("case", "reason", "step"),
    [
        ("not-found", "CertificateNotFound", "SecretResolved"),
        ("not-tls", "CertificateInvalid", "SecretResolved"),
        ("key-mismatch", "CertificateInvalid", "SecretResolved"),
        ("unparsable", "CertificateInvalid", "SecretResolved"),
        ("ec-key", "CertificateInvalid", "SecretResolved"),
        ("expired", "CertificateExpired", "SecretResolved"),
        ("not-registered", "CertificateNotRegistered", "TokenAcquired"),
    ],
)
def test_certificate_reasons(
    peers: Peers,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    credential: ClientCredentialCert,
    case: str,
    reason: str,
    step: str,
) -> None:
    path, secrets = _cert_case(peers, credential, case)
    code, result = run_check(peers, capsys, caplog, path, secrets=secrets)
    assert code == 1
    assert result["reason"] == reason, result["message"]
    assert conditions(result)[step] == ("False", reason)
    if step == "SecretResolved":
        # Decided before any network call.
        assert peers.idp.token_requests == 0
    if reason == "CertificateNotRegistered":
        assert credential.thumbprint_sha256 in result["message"]


# ---------------------------------------------------------------------------------------------------- workload identity


@pytest.fixture
def issuer(peers: Peers) -> Iterator[OidcIssuer]:
    with OidcIssuer(peers.cert) as issuer:
        peers.idp.trust_issuers(peers.ca.cert_pem)
        yield issuer


def federate(peers: Peers, issuer: OidcIssuer, *, subject: str = SUBJECT, audience: str = AUDIENCE) -> None:
    peers.idp.add_federated_credential(
        TENANT, CLIENT, FederatedCredential(issuer.issuer, subject, (audience,))
    )


def token_file(tmp_path: Path, token: str) -> str:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    return str(path)


def test_workload_identity_ready(
    peers: Peers,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    issuer: OidcIssuer,
    tmp_path: Path,
) -> None:
    federate(peers, issuer)
    path = peers.manifests(peers.spec(**WI_SPEC), secret=False)
    token = issuer.mint(SUBJECT)
    code, result = run_check(
        peers, capsys, caplog, path, "--token-file", token_file(tmp_path, token), secrets=[token]
    )
    assert code == 0, result["message"]
    conds = {c["type"]: c for c in result["conditions"]}
    assert conds["CredentialExpiring"]["reason"] == "NotExpiring"
    assert "Nothing expires" in conds["CredentialExpiring"]["message"]
    assert conds["SecretProtected"]["status"] == "True"
    # Entra ID fetched the issuer's discovery document and keys.
    assert "/.well-known/openid-configuration" in issuer.requests
    assert "/openid/v1/jwks" in issuer.requests
    assert token in peers.idp.received_assertions


def _wi_case(peers: Peers, issuer: OidcIssuer, case: str) -> str | None:
    """Set up the federation for ``case``; returns the token to present (None: no --token-file)."""
    if case == "wrong-subject":
        federate(peers, issuer, subject="system:serviceaccount:mail:Mail-Sender")
    elif case == "wrong-audience":
        federate(peers, issuer, audience="api://AzureADTokenExchangeUSGov")
    elif case == "wrong-issuer":
        federate(peers, issuer)
        return issuer.mint(SUBJECT, issuer=issuer.issuer + "/other")
    elif case == "issuer-down":
        federate(peers, issuer)
        issuer.down = True
    elif case == "expired-token":
        federate(peers, issuer)
        return issuer.mint(SUBJECT, lifetime=600, not_before=time.time() - 3600)
    elif case == "no-token":
        federate(peers, issuer)
        return None
    return issuer.mint(SUBJECT)


@pytest.mark.parametrize(
    ("case", "reason", "step", "quoted"),
    [
        (
            "wrong-subject",
            "FederatedCredentialMismatch",
            "TokenAcquired",
            f"subject the operator presented, '{SUBJECT}'",
        ),
        (
            "wrong-audience",
            "FederatedCredentialMismatch",
            "TokenAcquired",
            f"audience the operator presented, '{AUDIENCE}'",
        ),
        ("wrong-issuer", "FederatedCredentialMismatch", "TokenAcquired", "issuer the operator presented"),
        ("issuer-down", "IssuerUnreachable", "TokenAcquired", "OIDC"),
        ("expired-token", "ClockSkew", "TokenAcquired", "valid time range"),
        ("no-token", "ServiceAccountNotFound", "SecretResolved", "--token-file"),
    ],
)
def test_workload_identity_reasons(
    peers: Peers,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    issuer: OidcIssuer,
    tmp_path: Path,
    case: str,
    reason: str,
    step: str,
    quoted: str,
) -> None:
    token = _wi_case(peers, issuer, case)
    path = peers.manifests(peers.spec(**WI_SPEC), secret=False)
    extra = ("--token-file", token_file(tmp_path, token)) if token else ()
    code, result = run_check(peers, capsys, caplog, path, *extra, secrets=[*issuer.minted])
    assert code == 1
    assert result["reason"] == reason, result["message"]
    assert conditions(result)[step] == ("False", reason)
    assert quoted in result["message"]


def test_leak_check_detects_a_piece() -> None:
    """The canary can fail: a 24-character piece of a key inside other text is found."""
    key = client_credential_cert("canary").key_pem
    body = "".join(key.splitlines()[1:-1])
    with pytest.raises(AssertionError):
        assert_no_leak(f"error near ...{body[100:124]}... in tls.key", [key])
    assert_no_leak("tls.key is not a readable PEM private key", [key])


# ---------------------------------------------------------------------------------------------------- the operator's own identity


OWN_SPEC = {"identity.clientSecret": None, "identity.workloadIdentity": {"useOperatorIdentity": True}}


def test_operator_identity_from_azure_workload_identity_variables(
    peers: Peers,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    issuer: OidcIssuer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the Azure Workload Identity webhook injects: the token file (re-read per request) and the IDs."""
    subject = "system:serviceaccount:smtp-oauth:smtp-oauth-operator"
    federate(peers, issuer, subject=subject)
    token = issuer.mint(subject)
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", token_file(tmp_path, token))
    monkeypatch.setenv("AZURE_CLIENT_ID", CLIENT)
    monkeypatch.setenv("AZURE_TENANT_ID", TENANT)
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", peers.idp.authority_host + "/")
    path = peers.manifests(peers.spec(**OWN_SPEC), secret=False)
    code, result = run_check(peers, capsys, caplog, path, secrets=[token])
    assert code == 0, result["message"]

    # Another app injected than the spec names: said plainly, nothing is sent.
    monkeypatch.setenv("AZURE_CLIENT_ID", "44444444-4444-4444-8444-444444444444")
    before = peers.idp.token_requests
    code, result = run_check(peers, capsys, caplog, path, secrets=[token])
    assert code == 2  # InvalidSpec is unusable input for check
    assert result["reason"] == "InvalidSpec"
    assert "AZURE_CLIENT_ID" in result["message"]
    assert peers.idp.token_requests == before

    monkeypatch.delenv("AZURE_CLIENT_ID")
    monkeypatch.delenv("AZURE_FEDERATED_TOKEN_FILE")
    code, result = run_check(peers, capsys, caplog, path, secrets=[token])
    assert result["reason"] == "ServiceAccountNotFound"
    assert "AZURE_FEDERATED_TOKEN_FILE" in result["message"]
