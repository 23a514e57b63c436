"""Real local peers for the connection test: an HTTPS Entra ID and an Exchange-like SMTP server.

Every test gets fresh servers (they start in milliseconds), so a fault injected by one test cannot
leak into another. Nothing here is a mock: msal, requests and aiosmtplib talk TCP and TLS to them.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from smtp_oauth_operator.testing.idp import FakeEntraID
from smtp_oauth_operator.testing.pki import CertificateAuthority, ServerCert
from smtp_oauth_operator.testing.smtpd import FakeExchange

TENANT = "11111111-1111-4111-8111-111111111111"
CLIENT = "22222222-2222-4222-8222-222222222222"
MAILBOX = "no-reply@contoso.com"
# The leak canary: it must never show up in any output the operator or the CLI produces.
CANARY = "CANARY~s3cr3t.VALUE_0123456789abcdef"


@dataclass
class Peers:
    ca: CertificateAuthority
    cert: ServerCert
    idp: FakeEntraID
    smtp: FakeExchange
    tmp: Path
    secret: str = CANARY
    extra_docs: list[dict[str, Any]] = field(default_factory=list)
    servers: list[Any] = field(default_factory=list)

    def spec(self, **overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "username": MAILBOX,
            "smtp": {
                "host": "127.0.0.1",
                "port": self.smtp.port,
                "connectionTimeoutSeconds": 20,
                "caBundle": {"configMapKeyRef": {"name": "trust", "key": "ca.pem"}},
            },
            "identity": {
                "tenantId": TENANT,
                "clientId": CLIENT,
                "authorityHost": self.idp.authority_host,
                "timeoutSeconds": 20,
                "caBundle": {"configMapKeyRef": {"name": "trust", "key": "ca.pem"}},
                "clientSecret": {"secretKeyRef": {"name": "exo-app", "key": "client-secret"}},
            },
        }
        for path, value in overrides.items():
            node = spec
            *parents, leaf = path.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            if value is None:
                node.pop(leaf, None)
            else:
                node[leaf] = value
        return spec

    def manifests(
        self, spec: dict[str, Any] | None = None, *, secret: bool = True, name: str = "mail"
    ) -> Path:
        docs: list[dict[str, Any]] = [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "trust", "namespace": "mail"},
                "data": {"ca.pem": self.ca.cert_pem},
            }
        ]
        if secret:
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "exo-app", "namespace": "mail"},
                    "stringData": {"client-secret": self.secret},
                }
            )
        docs.extend(self.extra_docs)
        docs.append(
            {
                "apiVersion": "smtpoauth.dev/v1alpha1",
                "kind": "SmtpOAuthConfig",
                "metadata": {"name": name, "namespace": "mail"},
                "spec": spec if spec is not None else self.spec(),
            }
        )
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        return path


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("smtp-oauth-operator test CA")


@pytest.fixture(scope="session")
def cert(ca: CertificateAuthority) -> ServerCert:
    return ca.issue("127.0.0.1", "localhost")


@pytest.fixture
def peers(ca: CertificateAuthority, cert: ServerCert, tmp_path: Path) -> Iterator[Peers]:
    with FakeEntraID(cert) as idp, FakeExchange(idp, cert=cert) as smtp:
        idp.register_tenant(TENANT, "contoso.onmicrosoft.com")
        idp.register_app(TENANT, CLIENT, CANARY)
        smtp.grant(MAILBOX, CLIENT)
        yield Peers(ca, cert, idp, smtp, tmp_path)


def dedent(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"
