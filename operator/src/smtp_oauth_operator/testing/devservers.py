"""One call to bring up a CA, a fake Entra ID, a fake Microsoft Graph and a fake Exchange, seeded and
described on disk.

Why: the integration tests, the demo and the benchmark all need the same small world — a tenant,
an app registration with a client secret, a mailbox the app may send as — and the operator under
test only needs to be told where it lives. :class:`DevServers` builds that world and writes
``<state-dir>/ca.pem`` (the CA to trust) and ``<state-dir>/endpoints.json`` (authority host, token
endpoint, Graph host, SMTP host/port, tenant, client ID, mailbox) so a separate process (``python -m
smtp_oauth_operator.testing serve``) can be driven from shell scripts.

The client secret is supplied by the caller and deliberately never written to the state directory,
printed or logged: the demo must show the same secret hygiene the operator promises.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from smtp_oauth_operator.testing.graph import GRAPH_RESOURCE, FakeGraph
from smtp_oauth_operator.testing.idp import EXCHANGE_RESOURCE, FakeEntraID
from smtp_oauth_operator.testing.pki import CertificateAuthority
from smtp_oauth_operator.testing.smtpd import FakeExchange

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_MAILBOX",
    "DEFAULT_TENANT_ID",
    "DevServers",
    "Endpoints",
]

DEFAULT_TENANT_ID = "72f988bf-0000-4000-8000-00000000c0de"
DEFAULT_CLIENT_ID = "5e1f0a11-0000-4000-8000-0000000a5b1e"
DEFAULT_MAILBOX = "alerts@contoso.onmicrosoft.com"


@dataclass(frozen=True)
class Endpoints:
    """Where the dev servers listen; what ``endpoints.json`` contains (camelCase keys)."""

    authority_host: str
    token_endpoint: str
    smtp_host: str
    smtp_port: int
    ca_file: str
    tenant_id: str
    client_id: str
    mailbox: str
    scope: str = f"{EXCHANGE_RESOURCE}/.default"
    graph_host: str = ""

    def to_json(self) -> dict[str, str | int]:
        return {
            "authorityHost": self.authority_host,
            "tokenEndpoint": self.token_endpoint,
            "smtpHost": self.smtp_host,
            "smtpPort": self.smtp_port,
            "caFile": self.ca_file,
            "tenantId": self.tenant_id,
            "clientId": self.client_id,
            "mailbox": self.mailbox,
            "scope": self.scope,
            "graphHost": self.graph_host,
        }


class DevServers:
    """A CA, a :class:`FakeEntraID`, a :class:`FakeGraph` over the same directory and a STARTTLS
    :class:`FakeExchange`, seeded with one tenant, one app (``client_id``/``client_secret``) that may
    read its own registration in Graph (``graph_roles``, Application.Read.All by default) and
    FullAccess for it on every mailbox.

    ``with DevServers(tmp_path, client_secret="…") as dev: dev.endpoints.smtp_port …`` — the
    servers are also reachable as ``dev.idp``, ``dev.graph`` and ``dev.exchange`` for fault injection
    and for inspecting received mail.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        client_secret: str,
        tenant_id: str = DEFAULT_TENANT_ID,
        client_id: str = DEFAULT_CLIENT_ID,
        mailboxes: Sequence[str] = (DEFAULT_MAILBOX,),
        smtp_port: int = 0,
        idp_port: int = 0,
        token_lifetime: int = 3599,
        graph_roles: Sequence[str] = ("Application.Read.All",),
    ) -> None:
        if not client_secret:
            raise ValueError("a client secret is required")
        if not mailboxes:
            raise ValueError("at least one mailbox is required")
        self.state_dir = Path(state_dir)
        self._secret = client_secret
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.mailboxes = tuple(mailboxes)
        self._smtp_port = smtp_port
        self._idp_port = idp_port
        self._token_lifetime = token_lifetime
        self._graph_roles = tuple(graph_roles)
        self._idp: FakeEntraID | None = None
        self._graph: FakeGraph | None = None
        self._exchange: FakeExchange | None = None
        self._endpoints: Endpoints | None = None

    def __repr__(self) -> str:
        return f"DevServers(state_dir={str(self.state_dir)!r}, tenant_id={self.tenant_id!r})"

    def start(self) -> DevServers:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority.create("smtp-oauth-operator dev CA", directory=self.state_dir)
        cert = ca.issue("127.0.0.1", "localhost")
        idp = FakeEntraID(cert, port=self._idp_port).start()
        self._idp = idp
        try:
            domains = sorted({m.rpartition("@")[2].lower() for m in self.mailboxes if "@" in m})
            idp.register_tenant(self.tenant_id, *domains)
            idp.register_app(
                self.tenant_id, self.client_id, self._secret, token_lifetime=self._token_lifetime
            )
            self._graph = FakeGraph(idp, cert).start()
            idp.grant_api_roles(self.tenant_id, self.client_id, GRAPH_RESOURCE, *self._graph_roles)
            exchange = FakeExchange(idp, cert=cert, port=self._smtp_port).start()
            self._exchange = exchange
            for mailbox in self.mailboxes:
                exchange.grant(mailbox, self.client_id)
            self._endpoints = Endpoints(
                authority_host=idp.authority_host,
                token_endpoint=idp.token_endpoint(self.tenant_id),
                smtp_host=exchange.host,
                smtp_port=exchange.port,
                ca_file=str(ca.cert_file.resolve()),
                tenant_id=self.tenant_id,
                client_id=self.client_id,
                mailbox=self.mailboxes[0],
                graph_host=self._graph.base_url,
            )
            target = self.endpoints_file
            partial = target.with_suffix(".json.partial")
            partial.write_text(json.dumps(self._endpoints.to_json(), indent=2) + "\n", encoding="utf-8")
            partial.replace(target)  # atomic: a poller never sees half a file
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._exchange is not None:
            self._exchange.stop()
            self._exchange = None
        if self._graph is not None:
            self._graph.stop()
            self._graph = None
        if self._idp is not None:
            self._idp.stop()
            self._idp = None

    def __enter__(self) -> DevServers:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def idp(self) -> FakeEntraID:
        if self._idp is None:
            raise RuntimeError("DevServers is not started")
        return self._idp

    @property
    def graph(self) -> FakeGraph:
        if self._graph is None:
            raise RuntimeError("DevServers is not started")
        return self._graph

    @property
    def exchange(self) -> FakeExchange:
        if self._exchange is None:
            raise RuntimeError("DevServers is not started")
        return self._exchange

    @property
    def endpoints(self) -> Endpoints:
        if self._endpoints is None:
            raise RuntimeError("DevServers is not started")
        return self._endpoints

    @property
    def endpoints_file(self) -> Path:
        return self.state_dir / "endpoints.json"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "ca.pem"

    def summary(self) -> str:
        """One human-readable line (no secret in it)."""
        e = self.endpoints
        return (
            f"fake Entra ID at {e.authority_host}/{e.tenant_id}, fake Graph at {e.graph_host}, fake Exchange at "
            f"{e.smtp_host}:{e.smtp_port} (STARTTLS) for {e.mailbox}; "
            f"endpoints in {self.endpoints_file}"
        )
