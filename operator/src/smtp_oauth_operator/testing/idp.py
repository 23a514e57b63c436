"""A local, faithful stand-in for login.microsoftonline.com (client-credentials flow only).

Why: the project tests its identity client with the real MSAL library over real HTTPS instead of
mocking it, so something on 127.0.0.1 must answer exactly the requests MSAL Python 1.39 makes:
OIDC discovery (``GET /{tenant}/v2.0/.well-known/openid-configuration``) and the token request
(``POST /{tenant}/oauth2/v2.0/token``), with Entra ID's real status codes and error JSON
(``error``, ``error_description`` "AADSTSnnnn: …\\r\\nTrace ID: …", ``error_codes``, …), because
the operator classifies failures by ``error_codes[0]``. Faults that only a real network shows
(429 with Retry-After and a non-JSON body, 5xx, a server that never answers) are injectable per
tenant so retry/backoff and timeout handling can be exercised deterministically.

Access tokens are opaque random strings shaped like Exchange Online JWTs (three base64url
segments, ~1.6-1.9 KB) so the XOAUTH2 ``AUTH`` line is as long as a real one (well over aiosmtpd's
512-byte default command limit). They are validated by lookup (:meth:`FakeEntraID.validate`), never
by parsing, and every token handed out is kept in :attr:`FakeEntraID.issued_tokens` so tests can
assert that no token leaks into logs, events or status.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.server
import json
import re
import secrets
import socket
import ssl
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from jwt.algorithms import RSAAlgorithm

from smtp_oauth_operator.testing.pki import CertificateAuthority, ServerCert

__all__ = [
    "EXCHANGE_APP_ID",
    "EXCHANGE_RESOURCE",
    "Endpoint",
    "FakeEntraID",
    "FederatedCredential",
    "PasswordMeta",
    "TokenInfo",
]

EXCHANGE_RESOURCE = "https://outlook.office365.com"
"""The resource (audience) of Exchange Online tokens; scope ``https://outlook.office365.com/.default``."""

EXCHANGE_APP_ID = "00000002-0000-0ff1-ce00-000000000000"
"""Exchange Online's first-party application ID; ``<app id>/.default`` is an equivalent scope."""

Endpoint = Literal["token", "discovery", "any"]

_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
_DNS = re.compile(
    r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]$",
    re.IGNORECASE,
)
_MULTI_TENANT = frozenset({"common", "organizations", "consumers"})
_RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access"})
_DISCOVERY = re.compile(r"^/([^/]+)/v2\.0/\.well-known/openid-configuration$")
_TOKEN = re.compile(r"^/([^/]+)/oauth2/v2\.0/token$")
_KEYS = re.compile(r"^/([^/]+)/discovery/v2\.0/keys$")
_MAX_BODY = 64 * 1024
_JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_SKEW = 300  # seconds of clock skew tolerated on nbf/exp


def _unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return b""


def _get_json(url: str, context: ssl.SSLContext | None) -> dict[str, Any]:
    if not url.startswith("https://"):
        raise ValueError("not https")
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        data = json.loads(response.read(1 << 20))
    if not isinstance(data, dict):
        raise TypeError("not an object")
    return data


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _random_b64url(chars: int) -> str:
    return _b64url(secrets.token_bytes(chars))[:chars]


@dataclass(frozen=True)
class TokenInfo:
    """What the fake Exchange needs to know about an access token it was shown."""

    tenant_id: str
    client_id: str
    audience: str
    roles: tuple[str, ...]
    issued_at: float
    expires_at: float

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at


@dataclass
class _App:
    tenant_id: str
    client_id: str
    secrets: dict[str, bool]  # secret value -> expired?
    token_lifetime: int
    roles: tuple[str, ...]
    display_name: str
    certificates: dict[str, x509.Certificate] = field(default_factory=dict)  # SHA-256 hex -> cert
    federated: list[FederatedCredential] = field(default_factory=list)
    # What Microsoft Graph shows of the same registration (testing/graph.py): the application's
    # object ID, per-credential metadata, its owners and the app roles granted per resource.
    object_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    password_meta: dict[str, PasswordMeta] = field(default_factory=dict)  # secret value -> metadata
    key_meta: dict[str, PasswordMeta] = field(default_factory=dict)  # SHA-256 thumbprint -> metadata
    owners: set[str] = field(default_factory=set)  # client IDs (lower-case) of owning service principals
    api_roles: dict[str, tuple[str, ...]] = field(default_factory=dict)  # resource (lower) -> roles
    # A multi-tenant app published by another tenant: here only its service principal exists, so
    # Graph has no application object for it in this tenant (404), yet tokens are issued.
    guest: bool = False

    def password(self, value: str) -> PasswordMeta:
        """Graph's record of a secret, made on first sight for secrets registered without one."""
        meta = self.password_meta.get(value)
        if meta is None:
            meta = self.password_meta[value] = PasswordMeta.new()
        return meta

    def key(self, thumbprint: str) -> PasswordMeta:
        meta = self.key_meta.get(thumbprint)
        if meta is None:
            cert = self.certificates[thumbprint]
            meta = self.key_meta[thumbprint] = PasswordMeta(
                key_id=str(uuid.uuid4()),
                display_name=cert.subject.rfc4514_string(),
                start=cert.not_valid_before_utc,
                end=cert.not_valid_after_utc,
            )
        return meta


@dataclass
class PasswordMeta:
    """A credential's metadata as Microsoft Graph lists it (never its value)."""

    key_id: str
    display_name: str | None
    start: dt.datetime
    end: dt.datetime
    has_hint: bool = True  # secrets made before Graph kept hints list ``"hint": null``

    @classmethod
    def new(
        cls,
        display_name: str | None = None,
        end: dt.datetime | None = None,
        start: dt.datetime | None = None,
    ) -> PasswordMeta:
        # The portal's default lifetime is 180 days ("Recommended: 180 days").
        begin = start or dt.datetime.now(dt.UTC)
        return cls(str(uuid.uuid4()), display_name, begin, end or begin + dt.timedelta(days=180))


@dataclass(frozen=True)
class FederatedCredential:
    """An app's federated identity credential, as ``az ad app federated-credential create`` makes it."""

    issuer: str
    subject: str
    audiences: tuple[str, ...] = ("api://AzureADTokenExchange",)
    name: str = "kubernetes"


@dataclass
class _Tenant:
    tenant_id: str
    domains: set[str]
    resources: tuple[str, ...]
    display_name: str
    apps: dict[str, _App] = field(default_factory=dict)


@dataclass
class _Fault:
    kind: Literal["throttle", "fail", "hang"]
    tenant: str | None
    endpoint: Endpoint
    remaining: int | None
    status: int = 503
    retry_after: int | None = None
    json_body: bool = True

    def matches(self, endpoint: Endpoint, names: set[str]) -> bool:
        """``names``: the requested tenant segment plus, when known, the tenant's ID and domains."""
        if self.endpoint not in ("any", endpoint):
            return False
        return self.tenant is None or self.tenant.lower() in names


class _HttpError(Exception):
    """An Entra-shaped error response, raised inside request handling."""

    def __init__(self, status: int, error: str, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.code = code
        self.message = message


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 512  # socketserver's default of 5 drops SYNs when a benchmark starts
    owner: FakeEntraID

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Do the TLS handshake in the per-connection thread, not in the accept loop."""
        sock: socket.socket = request
        sock.settimeout(self.owner.handshake_timeout)
        try:
            tls = self.owner.tls_context.wrap_socket(sock, server_side=True)
        except (OSError, ValueError):
            # Untrusted-CA and plain-TCP clients end up here; that is their test, not our error.
            sock.close()
            return
        self.owner.track(tls, add=True)
        try:
            tls.settimeout(self.owner.idle_timeout)
            super().finish_request(tls, client_address)
        finally:
            self.owner.track(tls, add=False)
            with contextlib.suppress(OSError):
                tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Connection resets and timeouts are normal for a test server: stay quiet."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes
    server_version = "Microsoft-IIS/10.0"
    sys_version = ""
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """No access log on stderr."""

    def do_GET(self) -> None:
        self.server.owner.handle(self, "GET")

    def do_POST(self) -> None:
        self.server.owner.handle(self, "POST")

    def send_payload(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Cache-Control", "no-store, no-cache")
        self.send_header("Pragma", "no-cache")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


class FakeEntraID:
    """A threaded HTTPS server on 127.0.0.1 speaking Entra ID's client-credentials protocol.

    Typical use::

        with FakeEntraID() as idp:
            idp.register_tenant(TENANT, "contoso.onmicrosoft.com")
            idp.register_app(TENANT, CLIENT_ID, "s3cret")
            app = msal.ConfidentialClientApplication(
                CLIENT_ID, "s3cret", authority=f"{idp.authority_host}/{TENANT}",
                instance_discovery=False, http_client=session_trusting(idp.ca_file))

    Replies (all errors in Entra's JSON shape, ``error_codes[0]`` as below):

    * discovery, unknown GUID/DNS tenant → 400 ``invalid_tenant`` 90002; malformed tenant →
      400 ``invalid_request`` 900023;
    * token: unknown tenant 90002/900023; wrong ``grant_type`` → 400 ``unsupported_grant_type``
      70003; missing parameter → 400 ``invalid_request`` 900144; unknown client → 400
      ``unauthorized_client`` 700016; no secret → 401 ``invalid_client`` 7000218; wrong secret →
      401 ``invalid_client`` 7000215; expired secret → 401 ``invalid_client`` 7000222; scope
      without ``/.default`` → 400 ``invalid_scope`` 1002012; two resources → 400 ``invalid_scope``
      700022; resource the tenant lacks → 400 ``invalid_resource`` 500011; ``/common`` etc. →
      400 ``invalid_request`` 50059.
    """

    def __init__(
        self,
        cert: ServerCert | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        resources: tuple[str, ...] = (EXCHANGE_RESOURCE,),
        hang_limit: float = 300.0,
        idle_timeout: float = 60.0,
        handshake_timeout: float = 10.0,
    ) -> None:
        if cert is None:
            cert = CertificateAuthority.create("fake Entra ID CA").issue(host, "localhost")
        self.cert = cert
        self.tls_context = cert.server_context()
        self.host = host
        self._requested_port = port
        self.default_resources = tuple(r.rstrip("/") for r in resources)
        self.hang_limit = hang_limit
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self._lock = threading.RLock()
        self._tenants: dict[str, _Tenant] = {}
        self._faults: list[_Fault] = []
        self._tokens: dict[str, TokenInfo] = {}
        self._issued: list[str] = []
        self._token_requests = 0
        self._token_requests_by_client: Counter[str] = Counter()
        self._discovery_requests = 0
        self._hung_requests = 0
        self._assertions: list[str] = []
        self._issuer_context: ssl.SSLContext | None = None
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> FakeEntraID:
        """Bind (port 0 picks a free port) and serve in a daemon thread. Returns ``self``."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((self.host, self._requested_port), _Handler)
        server.owner = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-entra-id:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release hung requests and close every open connection."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeEntraID:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def track(self, conn: socket.socket, *, add: bool) -> None:
        """Remember open connections so :meth:`stop` can close them (internal)."""
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # ----------------------------------------------------------------- addresses

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeEntraID is not started")
        return int(self._server.server_address[1])

    @property
    def authority_host(self) -> str:
        """``https://127.0.0.1:PORT`` — what ``login.microsoftonline.com`` is in production."""
        return f"https://{self.host}:{self.port}"

    @property
    def ca_file(self) -> str:
        """Path of the CA certificate a client must trust to talk to this server."""
        return str(self.cert.ca_file)

    @property
    def ca_pem(self) -> str:
        return self.cert.ca_pem

    def authority(self, tenant: str) -> str:
        """The MSAL ``authority`` URL for ``tenant``."""
        return f"{self.authority_host}/{tenant}"

    def token_endpoint(self, tenant: str) -> str:
        """The token endpoint as discovery advertises it (canonical tenant ID when known)."""
        with self._lock:
            known = self._resolve(tenant)
        return f"{self.authority_host}/{known.tenant_id if known else tenant}/oauth2/v2.0/token"

    def discovery_url(self, tenant: str) -> str:
        return f"{self.authority_host}/{tenant}/v2.0/.well-known/openid-configuration"

    # ----------------------------------------------------------------- directory

    def register_tenant(
        self,
        tenant_id: str,
        *domains: str,
        resources: tuple[str, ...] | None = None,
        display_name: str | None = None,
    ) -> None:
        """Create a tenant reachable by its ID and by each of ``domains``.

        ``resources`` are the resource URIs (token audiences) provisioned in the tenant; by
        default the server's ``resources`` (Exchange Online only). A tenant with
        ``resources=()`` models "Exchange Online is not provisioned" (AADSTS500011).
        """
        with self._lock:
            self._tenants[tenant_id.lower()] = _Tenant(
                tenant_id=tenant_id,
                domains={d.lower() for d in domains},
                resources=tuple(r.rstrip("/") for r in resources)
                if resources is not None
                else self.default_resources,
                display_name=display_name or (domains[0] if domains else "Contoso"),
            )

    def register_app(
        self,
        tenant: str,
        client_id: str,
        secret: str,
        *,
        expired: bool = False,
        token_lifetime: int = 3599,
        roles: tuple[str, ...] = ("SMTP.SendAsApp",),
        display_name: str = "smtp-oauth-operator test app",
    ) -> None:
        """Register an application (service principal) with one client secret in ``tenant``.

        ``expired=True`` makes the secret expired (AADSTS7000222); ``token_lifetime`` is the
        ``expires_in`` of issued tokens; ``roles`` the app roles granted (Exchange checks for
        ``SMTP.SendAsApp``).
        """
        with self._lock:
            known = self._require_tenant(tenant)
            known.apps[client_id.lower()] = _App(
                tenant_id=known.tenant_id,
                client_id=client_id,
                secrets={secret: expired},
                token_lifetime=token_lifetime,
                roles=tuple(roles),
                display_name=display_name,
            )

    def set_secret(self, tenant: str, client_id: str, secret: str, *, expired: bool = False) -> None:
        """Rotate: ``secret`` becomes the app's only valid secret (old ones stop working)."""
        with self._lock:
            app = self._require_app(tenant, client_id)
            app.secrets = {secret: expired}
            app.password_meta = {k: v for k, v in app.password_meta.items() if k == secret}

    def add_secret(
        self,
        tenant: str,
        client_id: str,
        secret: str,
        *,
        expired: bool = False,
        end: dt.datetime | None = None,
        display_name: str | None = None,
        legacy: bool = False,
    ) -> str:
        """Add a second secret, as during an overlap rotation; both are accepted. ``end`` is the
        ``endDateTime`` Graph lists (after it the token endpoint answers AADSTS7000222); ``legacy``
        makes it an old secret that Graph lists without a hint. Returns the credential's keyId."""
        with self._lock:
            app = self._require_app(tenant, client_id)
            app.secrets[secret] = expired
            meta = app.password_meta[secret] = PasswordMeta.new(display_name, end)
            meta.has_hint = not legacy
            return meta.key_id

    def set_secret_end(self, tenant: str, client_id: str, secret: str, end: dt.datetime) -> None:
        """Set the ``endDateTime`` Graph lists for ``secret`` (what the portal showed when it was made)."""
        with self._lock:
            self._require_app(tenant, client_id).password(secret).end = end

    def remove_secret(self, tenant: str, client_id: str, secret: str) -> None:
        with self._lock:
            app = self._require_app(tenant, client_id)
            app.secrets.pop(secret, None)
            app.password_meta.pop(secret, None)

    def grant_api_roles(self, tenant: str, client_id: str, resource: str, *roles: str) -> None:
        """Grant app roles of another API (e.g. Microsoft Graph's Application.Read.All), with admin
        consent: tokens for ``resource`` carry exactly these roles."""
        with self._lock:
            self._require_app(tenant, client_id).api_roles[resource.rstrip("/").lower()] = tuple(roles)

    def add_owner(self, tenant: str, client_id: str, owner_client_id: str) -> None:
        """Make ``owner_client_id``'s service principal an owner of the app (itself, for OwnedBy)."""
        with self._lock:
            self._require_app(tenant, client_id).owners.add(owner_client_id.lower())

    def make_guest(self, tenant: str, client_id: str) -> None:
        """The app becomes a multi-tenant app registered elsewhere (Graph: Request_ResourceNotFound)."""
        with self._lock:
            self._require_app(tenant, client_id).guest = True

    def provision_resource(self, resource: str) -> None:
        """Make ``resource`` (e.g. Microsoft Graph) known in every tenant, present and future."""
        resource = resource.rstrip("/")
        with self._lock:
            if resource not in self.default_resources:
                self.default_resources = (*self.default_resources, resource)
            for tenant in self._tenants.values():
                if resource not in tenant.resources:
                    tenant.resources = (*tenant.resources, resource)

    def app_record(self, tenant: str, client_id: str) -> _App:
        """The live registration (testing/graph.py shares it; hold :attr:`lock` while using it)."""
        return self._require_app(tenant, client_id)

    def apps(self, tenant: str) -> list[_App]:
        with self._lock:
            return list(self._require_tenant(tenant).apps.values())

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def expire_secret(self, tenant: str, client_id: str, secret: str | None = None) -> None:
        """Mark ``secret`` (default: every secret of the app) as expired."""
        with self._lock:
            app = self._require_app(tenant, client_id)
            for value in list(app.secrets):
                if secret is None or value == secret:
                    app.secrets[value] = True

    def set_token_lifetime(self, tenant: str, client_id: str, seconds: int) -> None:
        with self._lock:
            self._require_app(tenant, client_id).token_lifetime = seconds

    def add_certificate(self, tenant: str, client_id: str, cert_pem: str) -> str:
        """Upload a certificate credential (Certificates & secrets); returns its SHA-256 thumbprint."""
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        thumbprint = cert.fingerprint(hashes.SHA256()).hex()
        with self._lock:
            self._require_app(tenant, client_id).certificates[thumbprint] = cert
        return thumbprint

    def remove_certificate(self, tenant: str, client_id: str, cert_pem: str) -> None:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        thumbprint = cert.fingerprint(hashes.SHA256()).hex()
        with self._lock:
            app = self._require_app(tenant, client_id)
            app.certificates.pop(thumbprint, None)
            app.key_meta.pop(thumbprint, None)

    def add_federated_credential(self, tenant: str, client_id: str, credential: FederatedCredential) -> None:
        """``az ad app federated-credential create``: trust tokens of ``issuer`` for ``subject``."""
        with self._lock:
            self._require_app(tenant, client_id).federated.append(credential)

    def clear_federated_credentials(self, tenant: str, client_id: str) -> None:
        with self._lock:
            self._require_app(tenant, client_id).federated.clear()

    def trust_issuers(self, ca_pem: str) -> None:
        """The CA that issuers' HTTPS certificates chain to (Entra ID trusts public CAs; a local issuer
        or a test cluster's API server has its own)."""
        context = ssl.create_default_context(cadata=ca_pem)
        with self._lock:
            self._issuer_context = context

    @property
    def received_assertions(self) -> list[str]:
        """Every client assertion presented (leak canaries: none may appear in output)."""
        with self._lock:
            return list(self._assertions)

    def remove_app(self, tenant: str, client_id: str) -> None:
        """Delete the app registration (subsequent token requests get AADSTS700016)."""
        with self._lock:
            known = self._require_tenant(tenant)
            known.apps.pop(client_id.lower(), None)

    def _require_tenant(self, tenant: str) -> _Tenant:
        known = self._resolve(tenant)
        if known is None:
            raise KeyError(f"tenant {tenant!r} is not registered")
        return known

    def _require_app(self, tenant: str, client_id: str) -> _App:
        app = self._require_tenant(tenant).apps.get(client_id.lower())
        if app is None:
            raise KeyError(f"app {client_id!r} is not registered in {tenant!r}")
        return app

    def _resolve(self, tenant: str) -> _Tenant | None:
        key = tenant.lower()
        found = self._tenants.get(key)
        if found is not None:
            return found
        for candidate in self._tenants.values():
            if key in candidate.domains:
                return candidate
        return None

    # ----------------------------------------------------------------- faults

    def throttle(
        self,
        retry_after: int = 60,
        json_body: bool = False,
        *,
        tenant: str | None = None,
        endpoint: Endpoint = "token",
        times: int | None = None,
    ) -> None:
        """Answer 429 with ``Retry-After: retry_after``.

        The body is the plain text ``Too Many Requests`` that Entra really sends to client-credential
        callers (MSAL Python then raises ``JSONDecodeError``), or with ``json_body=True`` an Entra
        JSON error (``temporarily_unavailable``, AADSTS90055). ``tenant=None`` applies to every
        tenant; ``times=N`` affects the next N matching requests only.
        """
        self._add_fault(
            _Fault(
                "throttle",
                tenant,
                endpoint,
                times,
                status=429,
                retry_after=retry_after,
                json_body=json_body,
            )
        )

    def fail(
        self,
        status: int = 503,
        *,
        tenant: str | None = None,
        endpoint: Endpoint = "token",
        times: int | None = None,
        json_body: bool = True,
        retry_after: int | None = None,
    ) -> None:
        """Answer ``status`` (a 5xx) with an Entra ``temporarily_unavailable`` JSON body
        (AADSTS90033), or a plain-text body with ``json_body=False``; optional ``Retry-After``.
        """
        self._add_fault(
            _Fault(
                "fail",
                tenant,
                endpoint,
                times,
                status=status,
                retry_after=retry_after,
                json_body=json_body,
            )
        )

    def hang(
        self,
        *,
        tenant: str | None = None,
        endpoint: Endpoint = "token",
        times: int | None = None,
    ) -> None:
        """Accept the request and never answer (until :meth:`stop` or ``hang_limit`` seconds),
        so the client's read timeout fires."""
        self._add_fault(_Fault("hang", tenant, endpoint, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _add_fault(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.insert(0, fault)

    def _take_fault(self, tenant: str, endpoint: Endpoint) -> _Fault | None:
        with self._lock:
            names = {tenant.lower()}
            known = self._resolve(tenant)
            if known is not None:
                names |= {known.tenant_id.lower(), *known.domains}
            for fault in self._faults:
                if fault.matches(endpoint, names):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    # ----------------------------------------------------------------- observations

    @property
    def issued_tokens(self) -> list[str]:
        """Every access token handed out so far (leak canaries: none may appear in output)."""
        with self._lock:
            return list(self._issued)

    @property
    def token_requests(self) -> int:
        """POSTs that reached the token endpoint (including failed and faulted ones)."""
        with self._lock:
            return self._token_requests

    @property
    def token_requests_by_client(self) -> dict[str, int]:
        """Token POSTs per ``client_id`` form value (as sent, lower-cased)."""
        with self._lock:
            return dict(self._token_requests_by_client)

    def token_requests_for(self, client_id: str) -> int:
        with self._lock:
            return self._token_requests_by_client.get(client_id.lower(), 0)

    @property
    def discovery_requests(self) -> int:
        with self._lock:
            return self._discovery_requests

    @property
    def hung_requests(self) -> int:
        with self._lock:
            return self._hung_requests

    def reset_counters(self) -> None:
        with self._lock:
            self._token_requests = 0
            self._token_requests_by_client.clear()
            self._discovery_requests = 0
            self._hung_requests = 0

    def validate(self, token: str) -> TokenInfo | None:
        """The token's facts if this server issued it and it has not expired, else ``None``."""
        info = self.lookup(token)
        if info is None or info.expired:
            return None
        return info

    def lookup(self, token: str) -> TokenInfo | None:
        """Like :meth:`validate` but also returns expired tokens."""
        with self._lock:
            return self._tokens.get(token)

    def expire_tokens(self, client_id: str | None = None) -> None:
        """Make every issued token (of ``client_id``) expired, as if an hour had passed."""
        now = time.time()
        with self._lock:
            for token, info in self._tokens.items():
                if client_id is None or info.client_id.lower() == client_id.lower():
                    self._tokens[token] = TokenInfo(
                        tenant_id=info.tenant_id,
                        client_id=info.client_id,
                        audience=info.audience,
                        roles=info.roles,
                        issued_at=info.issued_at,
                        expires_at=min(info.expires_at, now - 1),
                    )

    # ----------------------------------------------------------------- request handling

    def handle(self, request: _Handler, method: str) -> None:
        """Dispatch one HTTP request (called from the per-connection thread)."""
        path = urlsplit(request.path).path
        correlation = request.headers.get("client-request-id") or str(uuid.uuid4())
        body = b""
        if method == "POST":
            length = int(request.headers.get("Content-Length") or 0)
            body = request.rfile.read(min(length, _MAX_BODY)) if length > 0 else b""
            if length > _MAX_BODY:
                request.close_connection = True  # the rest of the body is still in the stream
        try:
            if method == "GET" and (match := _DISCOVERY.match(path)):
                with self._lock:
                    self._discovery_requests += 1
                self._apply_fault(request, match.group(1), "discovery", correlation)
                self._discovery(request, match.group(1), correlation)
            elif method == "POST" and (match := _TOKEN.match(path)):
                form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
                with self._lock:
                    self._token_requests += 1
                    self._token_requests_by_client[form.get("client_id", "").lower()] += 1
                self._apply_fault(request, match.group(1), "token", correlation)
                self._token(request, match.group(1), form, correlation)
            elif method == "GET" and (match := _KEYS.match(path)):
                self._json(request, 200, {"keys": []}, correlation)
            elif _TOKEN.match(path) or _DISCOVERY.match(path):
                request.send_payload(405, b"", "text/plain", {"Allow": "GET" if method == "POST" else "POST"})
            else:
                request.send_payload(404, b"", "text/html")
        except _Hung:
            request.close_connection = True
        except _Answered:
            pass
        except _HttpError as error:
            self._error(request, error, correlation)

    def _apply_fault(self, request: _Handler, tenant: str, endpoint: Endpoint, correlation: str) -> None:
        fault = self._take_fault(tenant, endpoint)
        if fault is None:
            return
        if fault.kind == "hang":
            with self._lock:
                self._hung_requests += 1
            self._stopping.wait(self.hang_limit)
            raise _Hung
        headers = {"client-request-id": correlation, "x-ms-request-id": str(uuid.uuid4())}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
        if fault.kind == "throttle":
            error = _HttpError(
                429,
                "temporarily_unavailable",
                90055,
                "There are too many incoming requests. Please try again later.",
            )
            plain = b"Too Many Requests"
        else:
            error = _HttpError(
                fault.status,
                "temporarily_unavailable",
                90033,
                "A transient error has occurred. Please try again.",
            )
            plain = b"Service Unavailable"
        if fault.json_body:
            self._error(request, error, correlation, headers)
        else:
            request.send_payload(fault.status, plain, "text/plain; charset=utf-8", headers)
        raise _Answered

    def _check_tenant(self, tenant: str) -> _Tenant:
        with self._lock:
            known = self._resolve(tenant)
        if known is not None:
            return known
        if _GUID.match(tenant) or _DNS.match(tenant):
            raise _HttpError(
                400,
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and "
                "are signing into the correct cloud. Check with your subscription administrator, "
                "this may happen if there are no active subscriptions for the tenant.",
            )
        raise _HttpError(
            400,
            "invalid_request",
            900023,
            f"Specified tenant identifier '{tenant}' is neither a valid DNS name, nor a valid "
            "external domain.",
        )

    def _discovery(self, request: _Handler, tenant: str, correlation: str) -> None:
        if tenant.lower() in _MULTI_TENANT:
            tid = tenant.lower()
            issuer_tid = "{tenantid}"
        else:
            tid = self._check_tenant(tenant).tenant_id
            issuer_tid = tid
        base = f"{self.authority_host}/{tid}"
        document = {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{self.authority_host}/{issuer_tid}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "claims_supported": [
                "sub",
                "iss",
                "cloud_instance_name",
                "cloud_instance_host_name",
                "cloud_graph_host_name",
                "msgraph_host",
                "aud",
                "exp",
                "iat",
                "auth_time",
                "acr",
                "nonce",
                "preferred_username",
                "name",
                "tid",
                "ver",
                "at_hash",
                "c_hash",
                "email",
            ],
            "kerberos_endpoint": f"{base}/kerberos",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }
        self._json(request, 200, document, correlation)

    def _token(self, request: _Handler, tenant: str, form: dict[str, str], correlation: str) -> None:
        if tenant.lower() in _MULTI_TENANT:
            raise _HttpError(
                400,
                "invalid_request",
                50059,
                "No tenant-identifying information found in either the request or implied by any "
                "provided credentials.",
            )
        known = self._check_tenant(tenant)
        for name in ("grant_type", "client_id", "scope"):
            if not form.get(name):
                raise _HttpError(
                    400,
                    "invalid_request",
                    900144,
                    f"The request body must contain the following parameter: '{name}'.",
                )
        if form["grant_type"] != "client_credentials":
            raise _HttpError(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{form['grant_type']}'.",
            )
        client_id = form["client_id"]
        with self._lock:
            app = known.apps.get(client_id.lower())
            app_secrets = dict(app.secrets) if app else {}
        if app is None:
            raise _HttpError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{known.display_name}'. This can happen if the application has not been installed "
                "by the administrator of the tenant or consented to by any user in the tenant. You "
                "may have sent your authentication request to the wrong tenant.",
            )
        if form.get("client_assertion") or form.get("client_assertion_type"):
            self._check_assertion(app, form, known)
            resource = self._resource(form["scope"], known)
            self._json(request, 200, self._issue_response(app, resource), correlation)
            return
        secret = form.get("client_secret")
        if not secret:
            raise _HttpError(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
            )
        if secret not in app_secrets:
            raise _HttpError(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the "
                f"client secret value, not the client secret ID, for a secret added to app "
                f"'{app.client_id}'.",
            )
        with self._lock:
            meta = app.password_meta.get(secret)
            past_end = meta is not None and meta.end <= dt.datetime.now(dt.UTC)
        if app_secrets[secret] or past_end:
            raise _HttpError(
                401,
                "invalid_client",
                7000222,
                f"The provided client secret keys for app '{app.client_id}' are expired. Visit the "
                "Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or "
                "consider using certificate credentials for added security: https://aka.ms/certCreds.",
            )
        resource = self._resource(form["scope"], known)
        token = self._issue(app, resource)
        self._json(
            request,
            200,
            {
                "token_type": "Bearer",
                "expires_in": app.token_lifetime,
                "ext_expires_in": app.token_lifetime,
                "access_token": token,
            },
            correlation,
        )

    def _issue_response(self, app: _App, resource: str) -> dict[str, Any]:
        token = self._issue(app, resource)
        return {
            "token_type": "Bearer",
            "expires_in": app.token_lifetime,
            "ext_expires_in": app.token_lifetime,
            "access_token": token,
        }

    # ----------------------------------------------------------------- private_key_jwt and federation

    def _check_assertion(self, app: _App, form: dict[str, str], tenant: _Tenant) -> None:
        """Entra ID's checks of a client assertion, in its order: shape, whose it is (the app's own
        certificate, or a federated issuer), signature, lifetime, then the federated record."""
        assertion = form.get("client_assertion", "")
        if form.get("client_assertion_type") != _JWT_BEARER or not assertion:
            raise _HttpError(
                400,
                "invalid_request",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
            )
        with self._lock:
            self._assertions.append(assertion)
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _HttpError(400, "invalid_request", 50027, "JWT token is invalid or malformed.") from None
        if claims.get("iss") == app.client_id or claims.get("sub") == app.client_id:
            self._check_certificate_assertion(app, assertion, header, claims, tenant)
        else:
            self._check_federated_assertion(app, assertion, header, claims)

    def _check_certificate_assertion(
        self, app: _App, assertion: str, header: dict[str, Any], claims: dict[str, Any], tenant: _Tenant
    ) -> None:
        if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
            raise _HttpError(
                401,
                "invalid_client",
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter. Review the "
                "documentation at https://docs.microsoft.com/en-us/azure/active-directory/develop/"
                "active-directory-certificate-credentials .",
            )
        with self._lock:
            registered = dict(app.certificates)
        cert: x509.Certificate | None = None
        if "x5t#S256" in header:
            presented = _unb64url(str(header["x5t#S256"])).hex()
            cert = registered.get(presented)
        elif "x5t" in header:
            presented = _unb64url(str(header["x5t"])).hex()
            cert = next(
                (c for c in registered.values() if c.fingerprint(hashes.SHA1()).hex() == presented), None
            )
        else:
            raise _HttpError(
                401,
                "invalid_client",
                5002723,
                "Invalid JWT header: the client assertion has no 'x5t', 'x5t#S256' or 'kid' header.",
            )
        if cert is None:
            raise _HttpError(
                401,
                "invalid_client",
                700027,
                "The certificate with identifier used to sign the client assertion is not registered on "
                f"application. [Reason - The key was not found., Thumbprint of key used by client: "
                f"'{presented.upper()}', Please visit the Azure Portal, Graph Explorer or directly use MS "
                f"Graph to see configured keys for app Id '{app.client_id}'.]",
            )
        algorithm = str(header.get("alg", ""))
        try:
            jwt.decode(
                assertion,
                cert.public_key(),  # type: ignore[arg-type]  # an RSA key, checked at registration
                algorithms=[algorithm] if algorithm in {"RS256", "PS256"} else ["RS256"],
                options={"verify_exp": False, "verify_nbf": False, "verify_aud": False, "verify_iat": False},
            )
        except jwt.PyJWTError:
            raise _HttpError(
                401, "invalid_client", 700027, "Client assertion failed signature validation."
            ) from None
        self._check_lifetime(claims)
        endpoints = {
            self.token_endpoint(tenant.tenant_id).lower(),
            *(f"{self.authority_host}/{d}/oauth2/v2.0/token".lower() for d in tenant.domains),
        }
        if str(claims.get("aud", "")).lower() not in endpoints:
            raise _HttpError(
                401,
                "invalid_client",
                700212,
                f"No matching federated identity record found for presented assertion audience "
                f"'{claims.get('aud')}'.",
            )

    def _check_lifetime(self, claims: dict[str, Any]) -> None:
        now = time.time()
        exp = claims.get("exp")
        nbf = claims.get("nbf", claims.get("iat"))
        if (
            not isinstance(exp, int | float)
            or (isinstance(nbf, int | float) and nbf > now + _SKEW)
            or exp < now - _SKEW
        ):

            def stamp(value: Any) -> str:
                if not isinstance(value, int | float):
                    return "unknown"
                return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%m/%d/%Y %H:%M:%S")

            raise _HttpError(
                401,
                "invalid_client",
                700024,
                f"Client assertion is not within its valid time range. Current time: {stamp(now)}, "
                f"assertion valid from {stamp(nbf)}, expiry time of assertion {stamp(exp)}. Review the "
                "documentation at https://docs.microsoft.com/en-us/azure/active-directory/develop/"
                "active-directory-certificate-credentials .",
            )

    def _check_federated_assertion(
        self, app: _App, assertion: str, header: dict[str, Any], claims: dict[str, Any]
    ) -> None:
        issuer = str(claims.get("iss", ""))
        subject = str(claims.get("sub", ""))
        audiences = claims.get("aud")
        presented_aud = audiences if isinstance(audiences, list) else [audiences]
        with self._lock:
            records = [f for f in app.federated if f.issuer == issuer]
        hint = (
            "Please note that the matching is done using a case-sensitive comparison. Check your federated "
            "identity credential Subject, Audience and Issuer against the presented assertion. "
            "https://learn.microsoft.com/entra/workload-id/workload-identity-federation"
        )
        if not records:
            raise _HttpError(
                400,
                "invalid_client",
                700211,
                f"No matching federated identity record found for presented assertion issuer '{issuer}'. {hint}",
            )
        keys = self._issuer_keys(issuer)
        kid = header.get("kid")
        key = next((k for k in keys if kid is None or k.get("kid") == kid), None)
        try:
            if key is None:
                raise jwt.InvalidSignatureError
            public = RSAAlgorithm.from_jwk(json.dumps(key))
            jwt.decode(
                assertion,
                public,  # type: ignore[arg-type]
                algorithms=["RS256"],
                options={"verify_exp": False, "verify_nbf": False, "verify_aud": False, "verify_iat": False},
            )
        except (jwt.PyJWTError, ValueError, KeyError):
            raise _HttpError(
                401,
                "invalid_client",
                700027,
                "Client assertion failed signature validation. [Reason - The key was not found in the "
                f"issuer's keys. Issuer: '{issuer}']",
            ) from None
        self._check_lifetime(claims)
        records = [f for f in records if f.subject == subject]
        if not records:
            raise _HttpError(
                400,
                "invalid_client",
                700213,
                f"No matching federated identity record found for presented assertion subject '{subject}'. {hint}",
            )
        if not any(a in f.audiences for f in records for a in presented_aud):
            raise _HttpError(
                400,
                "invalid_client",
                700212,
                f"No matching federated identity record found for presented assertion audience "
                f"'{' '.join(str(a) for a in presented_aud)}'. {hint}",
            )

    def _issuer_keys(self, issuer: str) -> list[dict[str, Any]]:
        """Fetch the issuer's discovery document and JWKS as Entra ID does (no caching: every
        assertion sees the issuer's current keys)."""
        with self._lock:
            context = self._issuer_context
        try:
            discovery = _get_json(issuer.rstrip("/") + "/.well-known/openid-configuration", context)
            if str(discovery.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
                raise ValueError("issuer mismatch")
            jwks = _get_json(str(discovery["jwks_uri"]), context)
            keys = jwks["keys"]
            if not isinstance(keys, list):
                raise TypeError("no keys")
        except (OSError, ValueError, KeyError, TypeError):
            raise _HttpError(
                401,
                "invalid_client",
                50166,
                f"Request to External OIDC endpoint failed. [Issuer: '{issuer}']",
            ) from None
        return [k for k in keys if isinstance(k, dict)]

    def _resource(self, scope: str, tenant: _Tenant) -> str:
        scopes = [s for s in scope.split() if s.lower() not in _RESERVED_SCOPES]
        if not scopes:
            raise _HttpError(
                400,
                "invalid_scope",
                70011,
                f"The provided value for the input parameter 'scope' is not valid. The scope {scope} "
                "is not valid.",
            )
        for item in scopes:
            if not item.endswith("/.default"):
                raise _HttpError(
                    400,
                    "invalid_scope",
                    1002012,
                    f"The provided value for scope {item} is not valid. Client credential flows must "
                    "have a scope value with /.default suffixed to the resource identifier "
                    "(application ID URI).",
                )
        resources = {s[: -len("/.default")].rstrip("/") for s in scopes}
        if len(resources) > 1:
            raise _HttpError(
                400,
                "invalid_scope",
                700022,
                f"The provided value for the input parameter scope is not valid because it contains "
                f"more than one resource. Scope {scope} is not valid.",
            )
        (resource,) = resources
        canonical = EXCHANGE_RESOURCE if resource.lower() == EXCHANGE_APP_ID else resource
        for provisioned in tenant.resources:
            if provisioned.lower() == canonical.lower():
                return provisioned
        raise _HttpError(
            400,
            "invalid_resource",
            500011,
            f"The resource principal named {resource} was not found in the tenant named "
            f"{tenant.display_name}. This can happen if the application has not been installed by "
            "the administrator of the tenant or consented to by any user in the tenant. You might "
            "have sent your authentication request to the wrong tenant.",
        )

    def _issue(self, app: _App, resource: str) -> str:
        now = time.time()
        info = TokenInfo(
            tenant_id=app.tenant_id,
            client_id=app.client_id,
            audience=resource,
            roles=app.api_roles.get(resource.lower(), app.roles),
            issued_at=now,
            expires_at=now + app.token_lifetime,
        )
        token = _make_token(app, resource, int(now))
        with self._lock:
            self._tokens[token] = info
            self._issued.append(token)
        return token

    # ----------------------------------------------------------------- responses

    def _json(
        self,
        request: _Handler,
        status: int,
        payload: dict[str, Any],
        correlation: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        extra = {"client-request-id": correlation, "x-ms-request-id": str(uuid.uuid4())}
        extra.update(headers or {})
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        request.send_payload(status, body, "application/json; charset=utf-8", extra)

    def _error(
        self,
        request: _Handler,
        error: _HttpError,
        correlation: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        trace_id = str(uuid.uuid4())
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        description = (
            f"AADSTS{error.code}: {error.message}\r\nTrace ID: {trace_id}\r\n"
            f"Correlation ID: {correlation}\r\nTimestamp: {stamp}"
        )
        payload = {
            "error": error.error,
            "error_description": description,
            "error_codes": [error.code],
            "timestamp": stamp,
            "trace_id": trace_id,
            "correlation_id": correlation,
            "error_uri": f"{self.authority_host}/error?code={error.code}",
        }
        self._json(request, error.status, payload, correlation, headers)


class _Hung(Exception):
    """The request was deliberately left unanswered."""


class _Answered(Exception):
    """A fault already sent the response; nothing more to do."""


def _make_token(app: _App, resource: str, now: int) -> str:
    """A random, opaque token shaped like an Exchange Online app-only JWT (~1.6-1.9 KB)."""
    thumb = _random_b64url(27)
    header = {"typ": "JWT", "nonce": _random_b64url(43), "alg": "RS256", "x5t": thumb, "kid": thumb}
    issuer = f"https://sts.windows.net/{app.tenant_id}/"
    oid = str(uuid.uuid4())
    claims = {
        "aud": resource,
        "iss": issuer,
        "iat": now,
        "nbf": now,
        "exp": now + app.token_lifetime,
        "aio": _random_b64url(secrets.choice(range(60, 180))),
        "app_displayname": app.display_name,
        "appid": app.client_id,
        "appidacr": "1",
        "idp": issuer,
        "idtyp": "app",
        "oid": oid,
        "rh": "1." + _random_b64url(60) + ".",
        "roles": list(app.api_roles.get(resource.lower(), app.roles)),
        "sid": str(uuid.uuid4()),
        "sub": oid,
        "tid": app.tenant_id,
        "uti": _random_b64url(22),
        "ver": "1.0",
        "wids": ["0997a1d0-0d1d-4acb-b408-d5ca73121e90"],
        "xms_ftd": _random_b64url(64),
        "xms_idrel": "7 20",
        "xms_rd": "0.42" + _random_b64url(48),
    }
    segments: Iterator[bytes] = (
        json.dumps(part, separators=(",", ":")).encode("utf-8") for part in (header, claims)
    )
    head, body = (_b64url(s) for s in segments)
    return f"{head}.{body}.{_random_b64url(342)}"
