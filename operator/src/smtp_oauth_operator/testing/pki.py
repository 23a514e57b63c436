"""A throw-away certificate authority for the local fake servers.

Why: the operator must verify TLS for real (MSAL refuses plain-http authorities, and the SMTP
client must check the server certificate), so the fake Entra ID and the fake Exchange need
certificates that chain to a CA the tests control. A second, untrusted CA lets the tests prove
that verification failures are detected rather than silently ignored. EC P-256 keys keep key
generation in the millisecond range, so every test may make its own CA.

Files are written as PEM: the server certificate file holds the leaf followed by the CA
certificate (the chain ``ssl.SSLContext.load_cert_chain`` expects), the key file holds an
unencrypted PKCS#8 key.
"""

from __future__ import annotations

import atexit
import datetime as dt
import ipaddress
import re
import shutil
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateAuthority",
    "ClientCredentialCert",
    "ServerCert",
    "build_ca_certificate",
    "build_leaf_certificate",
    "client_credential_cert",
]

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def _temp_directory(prefix: str) -> Path:
    """Make a private temporary directory that is removed when the interpreter exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (keys and chains alike)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text, encoding="ascii")


def _general_name(hostname: str) -> x509.GeneralName:
    """An IP literal becomes an iPAddress SAN, anything else a dNSName SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def build_ca_certificate(
    key: ec.EllipticCurvePrivateKey, subject: x509.Name, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    """A self-signed CA certificate (path length 0) for ``key``: the one CA recipe of the test kit."""
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_leaf_certificate(
    *,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    usages: list[x509.ObjectIdentifier],
    names: list[x509.GeneralName],
    not_before: dt.datetime,
    not_after: dt.datetime,
    serial: int | None = None,
) -> x509.Certificate:
    """A leaf certificate signed by ``issuer``: TLS server and/or client (``usages``), SANs ``names``."""
    ca_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class ServerCert:
    """A leaf certificate issued by a :class:`CertificateAuthority`, already written to disk.

    ``cert_file`` holds the leaf followed by the CA certificate; ``key_file`` the private key;
    ``ca_file`` the issuing CA certificate alone (what a client must trust).
    """

    hostnames: tuple[str, ...]
    cert_pem: str
    key_pem: str
    ca_pem: str
    cert_file: Path
    key_file: Path
    ca_file: Path
    not_valid_after: dt.datetime = field(compare=False)

    def server_context(self) -> ssl.SSLContext:
        """A server-side TLS context presenting this certificate (TLS 1.2+, no client certs)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client-side TLS context trusting only the issuing CA (hostname checking on)."""
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))


class CertificateAuthority:
    """A self-signed EC P-256 CA that issues server certificates for local test servers."""

    def __init__(
        self,
        name: str,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        directory: Path,
    ) -> None:
        self.name = name
        self._key = key
        self._cert = cert
        self.directory = directory
        self.cert_pem: str = _cert_pem(cert)
        self.cert_file: Path = directory / "ca.pem"
        _write_private(self.cert_file, self.cert_pem)
        self.cert_file.chmod(0o644)

    @classmethod
    def create(
        cls,
        name: str = "smtp-oauth-operator test CA",
        *,
        directory: str | Path | None = None,
        valid_days: int = 30,
    ) -> CertificateAuthority:
        """Make a new CA; its certificate is written to ``<directory>/ca.pem``.

        Without ``directory`` a private temporary directory is used and removed at exit.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "smtp-oauth-operator testing"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        now = _now()
        cert = build_ca_certificate(
            key, subject, now - dt.timedelta(minutes=5), now + dt.timedelta(days=valid_days)
        )
        path = Path(directory) if directory is not None else _temp_directory("fake-ca-")
        path.mkdir(parents=True, exist_ok=True)
        return cls(name, key, cert, path)

    @property
    def certificate(self) -> x509.Certificate:
        """The CA certificate object."""
        return self._cert

    def write(self, path: str | Path) -> Path:
        """Write the CA certificate (PEM) to ``path`` and return it as a :class:`Path`."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.cert_pem, encoding="ascii")
        return target

    def client_context(self) -> ssl.SSLContext:
        """A client-side TLS context trusting only this CA (hostname checking on)."""
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.cert_file))

    def issue(
        self,
        *hostnames: str,
        directory: str | Path | None = None,
        valid_days: int = 30,
        expired: bool = False,
    ) -> ServerCert:
        """Issue a TLS server certificate for ``hostnames`` (default ``127.0.0.1``, ``localhost``).

        IP literals become iPAddress SANs, other names dNSName SANs; the first name is also the
        subject CN. ``expired=True`` yields a certificate whose validity ended yesterday, for
        expiry-detection tests. Files go to ``directory`` (default: the CA's directory), named
        after the first hostname plus a serial suffix so several certificates can coexist.
        """
        names = hostnames or ("127.0.0.1", "localhost")
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        if expired:
            not_before = now - dt.timedelta(days=valid_days + 1)
            not_after = now - dt.timedelta(days=1)
        else:
            not_before = now - dt.timedelta(minutes=5)
            not_after = now + dt.timedelta(days=valid_days)
        serial = x509.random_serial_number()
        cert = build_leaf_certificate(
            issuer_key=self._key,
            issuer=self._cert,
            key=key,
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]),
            usages=[ExtendedKeyUsageOID.SERVER_AUTH],
            names=[_general_name(n) for n in names],
            not_before=not_before,
            not_after=not_after,
            serial=serial,
        )
        target = Path(directory) if directory is not None else self.directory
        stem = f"{_SAFE_NAME.sub('_', names[0])}-{serial % 0xFFFFFFFF:08x}"
        cert_pem = _cert_pem(cert) + self.cert_pem
        key_pem = _key_pem(key)
        cert_file = target / f"{stem}.crt"
        key_file = target / f"{stem}.key"
        _write_private(cert_file, cert_pem)
        _write_private(key_file, key_pem)
        ca_file = target / "ca.pem"
        if ca_file != self.cert_file:
            ca_file = self.write(target / f"{stem}.ca.pem")
        return ServerCert(
            hostnames=tuple(names),
            cert_pem=cert_pem,
            key_pem=key_pem,
            ca_pem=self.cert_pem,
            cert_file=cert_file,
            key_file=key_file,
            ca_file=ca_file,
            not_valid_after=not_after,
        )


@dataclass(frozen=True)
class ClientCredentialCert:
    """A certificate credential for an app registration, as a kubernetes.io/tls Secret holds it.

    Self-signed like ``New-SelfSignedCertificate`` / ``openssl req -x509`` output that admins upload
    to Entra ID; RSA, because Entra ID verifies client assertions with RSA keys only.
    """

    cert_pem: str
    key_pem: str = field(repr=False)
    not_after: dt.datetime

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem.encode())

    @property
    def thumbprint_sha256(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex()

    @property
    def thumbprint_sha1(self) -> str:
        return self.certificate.fingerprint(hashes.SHA1()).hex()

    def secret(self, name: str, namespace: str) -> dict[str, object]:
        """The kubernetes.io/tls Secret manifest holding this credential."""
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": namespace},
            "stringData": {"tls.crt": self.cert_pem, "tls.key": self.key_pem},
        }


def client_credential_cert(
    common_name: str = "smtp-oauth-operator",
    *,
    not_after: dt.datetime | None = None,
    days: int = 365,
    key_type: str = "rsa",
    key_format: str = "pkcs8",
) -> ClientCredentialCert:
    """A self-signed certificate credential (``key_type`` ``rsa`` or ``ec``; ``key_format`` ``pkcs8``
    or ``pkcs1``, the traditional ``BEGIN RSA PRIVATE KEY`` form)."""
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415 - only here

    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    key = (
        rsa.generate_private_key(65537, 2048)
        if key_type == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    now = _now()
    end = not_after or now + dt.timedelta(days=days)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now - dt.timedelta(minutes=5), end - dt.timedelta(days=1)))
        .not_valid_after(end)
        .sign(key, hashes.SHA256())
    )
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if key_format == "pkcs1"
        else serialization.PrivateFormat.PKCS8
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()
    return ClientCredentialCert(_cert_pem(cert), key_pem, end)
