"""Credential kinds other than a client secret, as pure values: a certificate read from a TLS Secret.

A certificate credential is parsed and checked here, before any network call: the PEM must hold a
certificate (leaf first, a chain may follow) and an unencrypted RSA private key that belongs to that
leaf. Entra ID accepts client assertions signed with RS256 or PS256 only, and MSAL signs with those
only, so an EC key is refused here with that explanation rather than by Entra ID as a bad signature.

The expiry of a certificate is its ``notAfter``; the thumbprints are what Entra ID's portal shows.
Nothing here ever puts key material into a message, a ``repr`` or an exception.

A renewed certificate is registered on the app with Graph's addKey, which needs no Graph permission when
the app calls it for itself but wants a *proof of possession*: a short JWT signed with a certificate the
app already has (:func:`proof_of_possession`).
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = [
    "POP_AUDIENCE",
    "POP_LIFETIME",
    "CertificateCredential",
    "CertificateError",
    "parse_certificate",
    "proof_of_possession",
]

_CERT_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


# Loading an RSA key with its consistency checks costs ~45 ms of CPU (2048 bits), on the event loop,
# on every pass. A key is checked in full once; afterwards only the SHA-256 digests of keys that
# passed are remembered (never the keys), and a known key loads without the checks in microseconds.
_CHECKED_KEYS: OrderedDict[bytes, None] = OrderedDict()
_CHECKED_MAX = 4096
_CHECKED_LOCK = threading.Lock()


def _load_key(pem: bytes) -> object:
    digest = hashlib.sha256(pem).digest()
    with _CHECKED_LOCK:
        known = digest in _CHECKED_KEYS
        if known:
            _CHECKED_KEYS.move_to_end(digest)
    key = serialization.load_pem_private_key(pem, password=None, unsafe_skip_rsa_key_validation=known)
    if not known:
        with _CHECKED_LOCK:
            _CHECKED_KEYS[digest] = None
            while len(_CHECKED_KEYS) > _CHECKED_MAX:
                _CHECKED_KEYS.popitem(last=False)
    return key


class CertificateError(ValueError):
    """The TLS Secret cannot be used as a certificate credential; the message is safe to show."""


@dataclass(frozen=True, slots=True)
class CertificateCredential:
    """A leaf certificate with its private key; ``private_key_pem`` never appears in ``repr``."""

    private_key_pem: str = field(repr=False)
    leaf_pem: str = field(repr=False)
    chain_pem: str = field(repr=False)  # the leaf followed by any intermediates, as given
    thumbprint_sha256: str  # lower-case hex
    thumbprint_sha1: str
    subject: str
    not_before: datetime
    not_after: datetime

    @property
    def leaf_der(self) -> bytes:
        """The leaf certificate in DER (what Graph's keyCredential.key carries, base64-encoded)."""
        return x509.load_pem_x509_certificate(self.leaf_pem.encode()).public_bytes(serialization.Encoding.DER)

    def status(self) -> dict[str, str]:
        """What status.clientCertificate shows (public facts only)."""
        return {
            "thumbprintSHA256": self.thumbprint_sha256,
            "thumbprintSHA1": self.thumbprint_sha1,
            "subject": self.subject[:1024],
            "notAfter": self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


def parse_certificate(cert_pem: str, key_pem: str) -> CertificateCredential:
    """Check a ``tls.crt`` / ``tls.key`` pair and return it as a credential, or raise CertificateError."""
    blocks = _CERT_BLOCK.findall(cert_pem or "")
    if not blocks:
        raise CertificateError("tls.crt holds no PEM certificate")
    try:
        certs = [x509.load_pem_x509_certificate(block.encode()) for block in blocks]
    except ValueError:
        raise CertificateError("tls.crt holds a PEM block that is not a valid X.509 certificate") from None
    leaf = certs[0]
    if "PRIVATE KEY-----" not in (key_pem or ""):
        raise CertificateError("tls.key holds no PEM private key")
    if "ENCRYPTED" in key_pem:
        raise CertificateError("tls.key is encrypted; a kubernetes.io/tls Secret holds an unencrypted key")
    try:
        key = _load_key(key_pem.encode())
    except (ValueError, TypeError):
        # cryptography's messages never quote the key, but they say nothing useful either.
        raise CertificateError("tls.key is not a readable PEM private key (PKCS#1 or PKCS#8)") from None
    except Exception:
        raise CertificateError("tls.key holds a key of an unsupported type") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(
            "tls.key is an EC key; Entra ID accepts client assertions signed with RSA keys only "
            "(issue the certificate with an RSA key of 2048 bits or more)"
        )
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CertificateError("tls.key is not an RSA private key")
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise CertificateError(
            "tls.key does not belong to the first certificate of tls.crt (the leaf must come first)"
        )
    return CertificateCredential(
        private_key_pem=key_pem,
        leaf_pem=blocks[0] + "\n",
        chain_pem="\n".join(blocks) + "\n",
        thumbprint_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        thumbprint_sha1=leaf.fingerprint(hashes.SHA1()).hex(),  # noqa: S303 - a name, not a signature
        subject=leaf.subject.rfc4514_string(),
        not_before=leaf.not_valid_before_utc.astimezone(UTC),
        not_after=leaf.not_valid_after_utc.astimezone(UTC),
    )


POP_AUDIENCE = "00000002-0000-0000-c000-000000000000"
"""``aud`` of an addKey/removeKey proof: the (Azure AD Graph) application ID Microsoft's sample uses."""

POP_LIFETIME = timedelta(minutes=10)
"""Graph accepts a proof whose ``exp`` is at most 10 minutes after its ``nbf``."""


def proof_of_possession(
    *, object_id: str, private_key_pem: bytes, certificate_der: bytes, now: datetime
) -> str:
    """The JWT that Graph's ``addKey``/``removeKey`` want as ``proof``: RS256, signed with the private key
    of ``certificate_der`` (a certificate already registered on the app and not expired), named by its
    ``x5t`` header; ``aud`` :data:`POP_AUDIENCE`, ``iss`` the application's *object* ID (``id``, not
    ``appId``), ``nbf`` now and ``exp`` :data:`POP_LIFETIME` later.

    Raises CertificateError (whose message never holds key material) when the key cannot sign or does
    not belong to the certificate.
    """
    try:
        certificate = x509.load_der_x509_certificate(certificate_der)
    except ValueError:
        raise CertificateError("the signing certificate is not a DER X.509 certificate") from None
    try:
        key = _load_key(private_key_pem)
    except Exception:  # cryptography's errors say nothing useful and must never carry the key
        raise CertificateError("the signing key is not a readable unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CertificateError("the signing key is not an RSA key; Graph verifies the proof as RS256")
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != certificate.public_key().public_bytes(der, spki):
        raise CertificateError("the signing key does not belong to the signing certificate")
    sha1 = certificate.fingerprint(hashes.SHA1())  # noqa: S303 - x5t is defined as the SHA-1 thumbprint
    start = int(now.timestamp())
    claims = {
        "aud": POP_AUDIENCE,
        "iss": object_id,
        "nbf": start,
        "exp": start + int(POP_LIFETIME.total_seconds()),
    }
    try:
        return jwt.encode(
            claims,
            key,
            algorithm="RS256",
            headers={"x5t": base64.urlsafe_b64encode(sha1).rstrip(b"=").decode("ascii")},
        )
    except Exception:
        raise CertificateError(
            "the proof of possession could not be signed with the certificate's key"
        ) from None
