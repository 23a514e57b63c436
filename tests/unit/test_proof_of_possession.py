"""The proof of possession for Graph's addKey/removeKey: what Graph checks, and nothing of the key in errors."""

from __future__ import annotations

import base64
import datetime as dt

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from tests.integration.test_check_credentials import assert_no_leak

from smtp_oauth_operator.domain.credentials import (
    POP_AUDIENCE,
    POP_LIFETIME,
    CertificateError,
    proof_of_possession,
)
from smtp_oauth_operator.testing.pki import ClientCredentialCert, client_credential_cert

OBJECT_ID = "0b7c1e2a-5d4f-4c3b-9a8e-7f6d5c4b3a21"
NOW = dt.datetime(2026, 11, 29, 19, 0, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def credential() -> ClientCredentialCert:
    return client_credential_cert("exo-app")


def der(credential: ClientCredentialCert) -> bytes:
    return credential.certificate.public_bytes(serialization.Encoding.DER)


def test_signed_rs256_by_the_certificate_with_graphs_claims(credential: ClientCredentialCert) -> None:
    proof = proof_of_possession(
        object_id=OBJECT_ID,
        private_key_pem=credential.key_pem.encode(),
        certificate_der=der(credential),
        now=NOW,
    )
    header = jwt.get_unverified_header(proof)
    assert header["alg"] == "RS256"
    sha1 = credential.certificate.fingerprint(hashes.SHA1())
    assert base64.urlsafe_b64decode(header["x5t"] + "=" * (-len(header["x5t"]) % 4)) == sha1
    assert "=" not in header["x5t"]
    claims = jwt.decode(
        proof,
        credential.certificate.public_key(),  # type: ignore[arg-type]
        algorithms=["RS256"],
        audience=POP_AUDIENCE,
        issuer=OBJECT_ID,
        options={"verify_exp": False, "verify_nbf": False},
    )
    start = int(NOW.timestamp())
    assert claims == {"aud": POP_AUDIENCE, "iss": OBJECT_ID, "nbf": start, "exp": start + 600}
    assert dt.timedelta(minutes=10) == POP_LIFETIME
    assert POP_AUDIENCE == "00000002-0000-0000-c000-000000000000"
    # Another certificate's public key does not verify it.
    other = client_credential_cert("other")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            proof,
            other.certificate.public_key(),  # type: ignore[arg-type]
            algorithms=["RS256"],
            options={"verify_aud": False, "verify_exp": False, "verify_nbf": False},
        )


def test_pkcs1_keys_sign_too() -> None:
    pkcs1 = client_credential_cert("pkcs1", key_format="pkcs1")
    proof = proof_of_possession(
        object_id=OBJECT_ID, private_key_pem=pkcs1.key_pem.encode(), certificate_der=der(pkcs1), now=NOW
    )
    assert jwt.get_unverified_header(proof)["alg"] == "RS256"


def test_errors_never_carry_the_key(credential: ClientCredentialCert) -> None:
    other = client_credential_cert("other")
    ec = client_credential_cert("ec", key_type="ec")
    cases = {
        "does not belong": (other.key_pem.encode(), der(credential)),
        "not an RSA key": (ec.key_pem.encode(), der(ec)),
        "not a readable": (credential.key_pem.encode()[:200], der(credential)),
        "not a DER": (credential.key_pem.encode(), b"\x30\x03garbage"),
    }
    for expected, (key_pem, cert_der) in cases.items():
        with pytest.raises(CertificateError) as caught:
            proof_of_possession(
                object_id=OBJECT_ID, private_key_pem=key_pem, certificate_der=cert_der, now=NOW
            )
        assert expected in str(caught.value)
        # No chained exception (cryptography's, which might one day quote the input) is shown.
        assert caught.value.__cause__ is None
        assert caught.value.__context__ is None or caught.value.__suppress_context__
        assert_no_leak(str(caught.value), [other.key_pem, ec.key_pem, credential.key_pem])
