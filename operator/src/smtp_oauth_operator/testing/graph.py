"""A local stand-in for Microsoft Graph's application credential API, sharing FakeEntraID's directory.

Why: credential discovery (and renewal) must be tested against something that answers like
``graph.microsoft.com`` — bearer-token checks, the application object with its
``passwordCredentials``/``keyCredentials``, ``addPassword``/``removePassword`` and Graph's error JSON —
without mocking the HTTP client. It serves the *same* app registrations as :class:`FakeEntraID`
(``FakeEntraID.app_record``): a password added here really works at the token endpoint, and one removed
here stops working there, so a test of the whole chain cannot pass by accident.

Served (HTTPS on 127.0.0.1, a free port):

* ``GET /v1.0/applications(appId='{appId}')`` and ``GET /v1.0/applications/{id}`` with ``$select``;
* ``POST …/addPassword`` (``{"passwordCredential": {"displayName", "endDateTime"}}`` → 200 with the
  passwordCredential including ``secretText``, the only time a value is ever returned) and
  ``POST …/removePassword`` (``{"keyId"}`` → 204);
* ``POST …/addKey`` (``{"keyCredential": {"type": "AsymmetricX509Cert", "usage": "Verify", "key":
  <base64 DER>, "displayName"?}, "passwordCredential": null, "proof": <JWT>}`` → 200 with the
  keyCredential as the listing shows it: a new ``keyId``, ``customKeyIdentifier`` the SHA-1 thumbprint
  (base64 of the digest, like every listed certificate), ``displayName`` (default: the subject), start/end the certificate's validity, ``key`` null) and ``POST …/removeKey`` (``{"keyId", "proof"}`` →
  204). The certificate is registered in (removed from) the shared directory, so MSAL with it gets
  (no longer gets) a token.

Permissions as Graph checks them (application permissions in the token's ``roles``): reading needs
Application.Read.All (or Application.ReadWrite.All, Directory.Read.All, or Application.ReadWrite.OwnedBy
on an application the caller owns); adding and removing passwords need Application.ReadWrite.All or
Application.ReadWrite.OwnedBy as an owner. addKey and removeKey need no role when the token is the
app's own ("an application does not need any specific permission to roll its own keys"); any other
caller needs what addPassword needs.

The proof of possession of addKey/removeKey (Graph's "application-rollkey-prooftoken"): a JWT signed
RS256 with the private key of a certificate currently registered on the app and valid now, named by its
``x5t`` header (base64url SHA-1 of the DER; ``x5t#S256`` is accepted too), with ``aud``
:data:`POP_AUDIENCE`, ``iss`` the application's *object* ID (not its appId), ``nbf``/``exp`` around now
(5 minutes of clock skew, IdentityModel's default) and at most 10 minutes apart. Any failure is 401
``Authentication_MissingOrMalformed`` "Access Token missing or malformed." — what real Graph answers
(microsoftgraph/microsoft-graph-docs issues 10686 and 22076), whatever the cause; the cause is kept
in :attr:`FakeGraph.proof_refusals` for tests. An application with no valid certificate at all cannot
prove possession, so it gets the same 401 (Graph documents that such an app cannot use addKey, not the
status it answers). The checks run after the bearer token and the permission, and after the body's
shape (malformed body or ``key`` → 400); a certificate already registered (same thumbprint) or already
expired → 400 ``Request_BadRequest`` (real Graph's wording of those two is not known; ours says what
is wrong); an unknown keyId to removeKey → 400 as for removePassword.

Errors use Graph's shape
``{"error": {"code", "message", "innerError": {"date", "request-id", "client-request-id"}}}``:
401 ``InvalidAuthenticationToken`` (the bearer token), 401 ``Authentication_MissingOrMalformed`` (the
proof), 403 ``Authorization_RequestDenied``, 404 ``Request_ResourceNotFound``, 429 ``TooManyRequests``
with ``Retry-After``. ``throttle()`` and ``deny()`` inject the last two regardless of the request
(addKey and removeKey are writes).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import re
import secrets
import socket
import threading
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from smtp_oauth_operator.testing.idp import FakeEntraID, PasswordMeta, _App, _Handler, _Server, _unb64url
from smtp_oauth_operator.testing.pki import ServerCert

__all__ = ["GRAPH_RESOURCE", "POP_AUDIENCE", "READ_ROLES", "FakeGraph"]

GRAPH_RESOURCE = "https://graph.microsoft.com"
"""Microsoft Graph's resource (token audience) in the public cloud."""

READ_ROLES = frozenset(
    {"Application.Read.All", "Application.ReadWrite.All", "Directory.Read.All", "Directory.ReadWrite.All"}
)
_WRITE_ROLES = frozenset({"Application.ReadWrite.All"})
_OWNED_BY = "Application.ReadWrite.OwnedBy"
_KEY_ACTIONS = frozenset({"addKey", "removeKey"})

POP_AUDIENCE = "00000002-0000-0000-c000-000000000000"
"""The ``aud`` of an addKey/removeKey proof of possession (the Azure AD Graph application ID). Written
out here rather than imported from the operator's domain, so a wrong value there cannot pass here."""
_MAX_PROOF_LIFETIME = 600  # seconds between nbf and exp
_SKEW = 300  # IdentityModel's default clock skew on nbf/exp

_ACTIONS = r"(?:/(addPassword|removePassword|addKey|removeKey))?"
_BY_APP_ID = re.compile(rf"^/v1\.0/applications\(appId='([^']*)'\){_ACTIONS}$")
_BY_ID = re.compile(rf"^/v1\.0/applications/([^/()]+){_ACTIONS}$")
_MAX_BODY = 64 * 1024
_SECRET_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.~"


def _graph_time(moment: dt.datetime) -> str:
    """Graph's DateTimeOffset: UTC with seven fractional digits, e.g. 2021-09-09T19:50:29.3086381Z."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def _new_secret() -> str:
    """A value shaped like Entra ID's generated secrets: 40 characters, ``~`` in the fifth place."""
    head = "".join(secrets.choice(_SECRET_ALPHABET[:62]) for _ in range(3))
    tail = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(34))
    return f"{head}8Q~{tail}"


class _GraphError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass
class _Fault:
    kind: Literal["throttle", "deny"]
    remaining: int | None
    retry_after: int = 0
    operation: Literal["read", "write", "any"] = "any"


class FakeGraph:
    """A threaded HTTPS Microsoft Graph on 127.0.0.1 over ``idp``'s directory.

    ``with FakeGraph(idp) as graph: graph.base_url`` — what ``https://graph.microsoft.com`` is in
    production. Grant permissions with ``idp.grant_api_roles(tenant, client, GRAPH_RESOURCE, role)``
    (and ``idp.add_owner`` for OwnedBy); every secret Graph returns is kept in :attr:`returned_secrets`
    for leak canaries.
    """

    def __init__(
        self,
        idp: FakeEntraID,
        cert: ServerCert | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        resource: str = GRAPH_RESOURCE,
        idle_timeout: float = 60.0,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.idp = idp
        self.cert = cert or idp.cert
        self.tls_context = self.cert.server_context()
        self.host = host
        self.resource = resource.rstrip("/")
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self._requested_port = port
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._returned: list[str] = []
        self._requests: dict[str, int] = dict.fromkeys(
            ("read", "addPassword", "removePassword", "addKey", "removeKey"), 0
        )
        self._proof_refusals: list[str] = []
        self._received = 0
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        idp.provision_resource(self.resource)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> FakeGraph:
        if self._server is not None:
            return self
        server = _Server((self.host, self._requested_port), _Handler)
        server.owner = self  # type: ignore[assignment]  # the same duck-typed owner interface
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-graph:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
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

    def __enter__(self) -> FakeGraph:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeGraph is not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:PORT`` — what ``https://graph.microsoft.com`` is in production."""
        return f"https://{self.host}:{self.port}"

    # ----------------------------------------------------------------- faults and observations

    def throttle(
        self,
        retry_after: int = 30,
        *,
        times: int | None = None,
        operation: Literal["read", "write", "any"] = "any",
    ) -> None:
        """Answer 429 ``TooManyRequests`` with ``Retry-After: retry_after`` (the next ``times`` requests)."""
        with self._lock:
            self._faults.insert(0, _Fault("throttle", times, retry_after, operation))

    def deny(self, *, times: int | None = None, operation: Literal["read", "write", "any"] = "any") -> None:
        """Answer 403 ``Authorization_RequestDenied`` whatever the token's roles."""
        with self._lock:
            self._faults.insert(0, _Fault("deny", times, 0, operation))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def returned_secrets(self) -> list[str]:
        """Every ``secretText`` handed out by addPassword (leak canaries)."""
        with self._lock:
            return list(self._returned)

    @property
    def requests(self) -> dict[str, int]:
        """Requests that passed authentication and authorization, per operation (``read``,
        ``addPassword``, ``removePassword``, ``addKey``, ``removeKey``; a refused proof still counts)."""
        with self._lock:
            return dict(self._requests)

    @property
    def proof_refusals(self) -> list[str]:
        """Why each refused proof of possession was refused (one short reason each, oldest first): real
        Graph answers every one the same way, so a test asks here which check caught it."""
        with self._lock:
            return list(self._proof_refusals)

    @property
    def received(self) -> int:
        """Every request that reached the server, refused, throttled or not."""
        with self._lock:
            return self._received

    def reset_counters(self) -> None:
        with self._lock:
            self._requests = dict.fromkeys(self._requests, 0)
            self._received = 0
            self._proof_refusals.clear()

    def add_password(
        self, tenant: str, client_id: str, *, display_name: str | None = None, end: dt.datetime | None = None
    ) -> str:
        """What a colleague does in the portal: a new secret for the app (returned, and canaried)."""
        value = _new_secret()
        self.idp.add_secret(tenant, client_id, value, end=end, display_name=display_name)
        with self._lock:
            self._returned.append(value)
        return value

    # ----------------------------------------------------------------- request handling

    def handle(self, request: _Handler, method: str) -> None:
        parts = urlsplit(request.path)
        path = unquote(parts.path)
        correlation = request.headers.get("client-request-id") or str(uuid.uuid4())
        with self._lock:
            self._received += 1
        body = b""
        if method == "POST":
            length = int(request.headers.get("Content-Length") or 0)
            body = request.rfile.read(min(length, _MAX_BODY)) if length > 0 else b""
            if length > _MAX_BODY:
                request.close_connection = True
        try:
            match = _BY_APP_ID.match(path) or _BY_ID.match(path)
            if match is None:
                raise _GraphError(
                    400,
                    "BadRequest",
                    f"Resource not found for the segment '{path.rsplit('/', 1)[-1]}'.",
                )
            key, action = match.group(1), match.group(2)
            if (method == "GET") != (action is None):
                raise _GraphError(405, "Request_BadRequest", f"The HTTP method '{method}' is not allowed.")
            token = self._authenticate(request)
            operation: Literal["read", "write"] = "read" if action is None else "write"
            self._apply_fault(operation)
            app = self._find(token.tenant_id, key, by_app_id=match.re is _BY_APP_ID)
            self._authorize(token.client_id, token.roles, app, operation, own_keys=action in _KEY_ACTIONS)
            with self._lock:
                self._requests[action or "read"] += 1
            if action is None:
                select = parse_qs(parts.query).get("$select", [""])[0]
                self._json(request, 200, self._application(app, select), correlation)
            elif action == "addPassword":
                self._json(request, 200, self._add_password(app, body), correlation)
            elif action == "addKey":
                self._json(request, 200, self._add_key(app, body), correlation)
            else:
                if action == "removePassword":
                    self._remove_password(app, body)
                else:
                    self._remove_key(app, body)
                request.send_payload(204, b"", "text/plain", {"client-request-id": correlation})
        except _GraphError as error:
            self._error(request, error, correlation)

    def _authenticate(self, request: _Handler) -> Any:
        header = request.headers.get("Authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        info = self.idp.lookup(value.strip())
        if info is None:
            raise _GraphError(
                401, "InvalidAuthenticationToken", "IDX14100: JWT is not well formed, there are no dots (.)."
            )
        if info.expired:
            raise _GraphError(
                401, "InvalidAuthenticationToken", "Lifetime validation failed, the token is expired."
            )
        if info.audience.rstrip("/").lower() != self.resource.lower():
            raise _GraphError(
                401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience."
            )
        return info

    def _apply_fault(self, operation: Literal["read", "write"]) -> None:
        with self._lock:
            fault = next((f for f in self._faults if f.operation in ("any", operation)), None)
            if fault is None:
                return
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
        if fault.kind == "throttle":
            raise _GraphError(
                429,
                "TooManyRequests",
                "Too many requests. Please retry after the time in the Retry-After header.",
                {"Retry-After": str(fault.retry_after)},
            )
        raise _GraphError(
            403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
        )

    def _find(self, tenant: str, key: str, *, by_app_id: bool) -> _App:
        with self.idp.lock:
            for app in self.idp.apps(tenant):
                if not app.guest and (app.client_id if by_app_id else app.object_id).lower() == key.lower():
                    return app
        raise _GraphError(
            404,
            "Request_ResourceNotFound",
            f"Resource '{key}' does not exist or one of its queried reference-property objects are not present.",
        )

    def _authorize(
        self, caller: str, roles: tuple[str, ...], app: _App, operation: str, *, own_keys: bool = False
    ) -> None:
        granted = set(roles)
        allowed = READ_ROLES if operation == "read" else _WRITE_ROLES
        with self.idp.lock:
            owner = caller.lower() in app.owners
        # "An application does not need any specific permission to roll its own keys": addKey and
        # removeKey called with the app's own token need no role; the proof is what protects them.
        if own_keys and caller.lower() == app.client_id.lower():
            return
        if granted & allowed or (_OWNED_BY in granted and owner):
            return
        raise _GraphError(
            403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
        )

    def _application(self, app: _App, select: str) -> dict[str, Any]:
        with self.idp.lock:
            passwords = [
                self._password(meta, v[:3] if meta.has_hint else None)
                for v in app.secrets
                if (meta := app.password(v))
            ]
            keys = [self._key(app, t) for t in app.certificates]
            full: dict[str, Any] = {
                "id": app.object_id,
                "appId": app.client_id,
                "displayName": app.display_name,
                "passwordCredentials": passwords,
                "keyCredentials": keys,
            }
        fields = [f.strip() for f in select.split(",") if f.strip()] or list(full)
        unknown = [f for f in fields if f not in full]
        if unknown:
            raise _GraphError(
                400,
                "BadRequest",
                f"Could not find a property named '{unknown[0]}' on type 'microsoft.graph.application'.",
            )
        context = "https://graph.microsoft.com/v1.0/$metadata#applications"
        context += f"({','.join(fields)})/$entity" if select else "/$entity"
        return {"@odata.context": context, **{f: full[f] for f in fields}}

    @staticmethod
    def _password(meta: PasswordMeta, hint: str | None, secret_text: str | None = None) -> dict[str, Any]:
        return {
            "customKeyIdentifier": None,
            "displayName": meta.display_name,
            "endDateTime": _graph_time(meta.end),
            "hint": hint,
            "keyId": meta.key_id,
            "secretText": secret_text,
            "startDateTime": _graph_time(meta.start),
        }

    def _key(self, app: _App, thumbprint: str) -> dict[str, Any]:
        cert = app.certificates[thumbprint]
        meta = app.key(thumbprint)
        return {
            # Binary in Graph's JSON is base64; for an uploaded certificate it holds the SHA-1 thumbprint.
            "customKeyIdentifier": base64.b64encode(cert.fingerprint(hashes.SHA1())).decode(),
            "displayName": meta.display_name,
            "endDateTime": _graph_time(meta.end),
            "key": None,
            "keyId": meta.key_id,
            "startDateTime": _graph_time(meta.start),
            "type": "AsymmetricX509Cert",
            "usage": "Verify",
        }

    def _add_password(self, app: _App, body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body or b"{}")
            credential = payload.get("passwordCredential") or {}
            display = credential.get("displayName")
            end_text = credential.get("endDateTime")
            end = dt.datetime.fromisoformat(end_text) if end_text else None
        except (ValueError, AttributeError, TypeError):
            raise _GraphError(
                400, "Request_BadRequest", "Invalid value specified for property 'passwordCredential'."
            ) from None
        if end is not None and end.tzinfo is None:
            end = end.replace(tzinfo=dt.UTC)
        if display is not None and not isinstance(display, str):
            raise _GraphError(
                400, "Request_BadRequest", "Invalid value specified for property 'displayName'."
            )
        value = _new_secret()
        meta = PasswordMeta.new(display, end)
        with self.idp.lock:
            app.secrets[value] = False
            app.password_meta[value] = meta
        with self._lock:
            self._returned.append(value)
        response = self._password(meta, value[:3], value)
        return {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.passwordCredential",
            **response,
        }

    def _remove_password(self, app: _App, body: bytes) -> None:
        try:
            key_id = str(json.loads(body or b"{}")["keyId"])
        except (ValueError, KeyError, TypeError):
            raise _GraphError(
                400, "Request_BadRequest", "Invalid value specified for property 'keyId'."
            ) from None
        with self.idp.lock:
            value = next(
                (v for v, m in app.password_meta.items() if m.key_id.lower() == key_id.lower()), None
            )
            if value is None or value not in app.secrets:
                raise _GraphError(
                    400,
                    "Request_BadRequest",
                    f"No password credential found with keyId '{key_id}'.",  # unverified wording
                )
            app.secrets.pop(value)
            app.password_meta.pop(value)

    # ----------------------------------------------------------------- addKey / removeKey

    def _add_key(self, app: _App, body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body or b"{}")
            credential = payload.get("keyCredential")
            if not isinstance(credential, dict):
                raise TypeError("no keyCredential")
        except (ValueError, AttributeError, TypeError):
            raise _GraphError(
                400, "Request_BadRequest", "Invalid value specified for property 'keyCredential'."
            ) from None
        if credential.get("type") != "AsymmetricX509Cert" or credential.get("usage") != "Verify":
            # X509CertAndPassword / Sign (a signing certificate with its password) is Graph's other
            # form; a client credential is always a public certificate that Entra ID verifies with.
            raise _GraphError(
                400,
                "Request_BadRequest",
                "This stand-in adds keyCredentials of type 'AsymmetricX509Cert' with usage 'Verify' only.",
            )
        display = credential.get("displayName")
        if display is not None and not isinstance(display, str):
            raise _GraphError(
                400, "Request_BadRequest", "Invalid value specified for property 'displayName'."
            )
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(str(credential["key"]), validate=True))
        except (KeyError, ValueError, TypeError):
            raise _GraphError(
                400,
                "Request_BadRequest",
                "Invalid value specified for property 'key' of resource 'KeyCredential'.",
            ) from None
        self._check_proof(app, payload.get("proof"))
        thumbprint = cert.fingerprint(hashes.SHA256()).hex()
        now = dt.datetime.now(dt.UTC)
        if cert.not_valid_after_utc <= now:
            raise _GraphError(  # unverified wording
                400, "Request_BadRequest", "Key credential end date is invalid: the certificate has expired."
            )
        with self.idp.lock:
            if thumbprint in app.certificates:
                raise _GraphError(  # unverified wording: real Graph's message for this is not known
                    400,
                    "Request_BadRequest",
                    "A key credential with the same certificate thumbprint already exists on the application.",
                )
            app.certificates[thumbprint] = cert
            app.key_meta[thumbprint] = PasswordMeta(
                key_id=str(uuid.uuid4()),
                display_name=display or cert.subject.rfc4514_string(),
                start=cert.not_valid_before_utc,
                end=cert.not_valid_after_utc,
            )
            added = self._key(app, thumbprint)
        return {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.keyCredential",
            **added,
        }

    def _remove_key(self, app: _App, body: bytes) -> None:
        try:
            payload = json.loads(body or b"{}")
            key_id = str(payload["keyId"])
        except (ValueError, KeyError, TypeError):
            raise _GraphError(
                400, "Request_BadRequest", "Invalid value specified for property 'keyId'."
            ) from None
        self._check_proof(app, payload.get("proof"))
        with self.idp.lock:
            thumbprint = next(
                (t for t in app.certificates if app.key(t).key_id.lower() == key_id.lower()), None
            )
            if thumbprint is None:
                raise _GraphError(
                    400,
                    "Request_BadRequest",
                    f"No key credential found with keyId '{key_id}'.",  # unverified wording
                )
            app.certificates.pop(thumbprint)
            app.key_meta.pop(thumbprint, None)

    def _check_proof(self, app: _App, proof: Any) -> None:
        """Graph's proof-of-possession checks; every failure is the same 401, as Graph answers it."""
        reason = self._proof_problem(app, proof)
        if reason is None:
            return
        with self._lock:
            self._proof_refusals.append(reason)
        raise _GraphError(401, "Authentication_MissingOrMalformed", "Access Token missing or malformed.")

    def _proof_problem(self, app: _App, proof: Any) -> str | None:
        if not isinstance(proof, str) or not proof:
            return "no proof"
        try:
            header = jwt.get_unverified_header(proof)
        except jwt.PyJWTError:
            return "not a JWT"
        if header.get("alg") != "RS256":
            return "not signed RS256"
        with self.idp.lock:
            registered = {t: (c, app.key(t)) for t, c in app.certificates.items()}
        now = dt.datetime.now(dt.UTC)
        valid = {t: c for t, (c, meta) in registered.items() if meta.start <= now < meta.end}
        if not valid:
            return "the application has no valid certificate"
        signer: x509.Certificate | None = None
        if isinstance(header.get("x5t#S256"), str):
            signer = valid.get(_unb64url(header["x5t#S256"]).hex())
        elif isinstance(header.get("x5t"), str):
            sha1 = _unb64url(header["x5t"])
            signer = next((c for c in valid.values() if c.fingerprint(hashes.SHA1()) == sha1), None)
        else:
            return "no x5t header"
        if signer is None:
            return "signed by a certificate not registered and valid on the application"
        try:
            claims = jwt.decode(
                proof,
                signer.public_key(),  # type: ignore[arg-type]  # RSA: RS256 verified it
                algorithms=["RS256"],
                audience=POP_AUDIENCE,
                issuer=app.object_id,
                leeway=_SKEW,
                options={"require": ["aud", "iss", "nbf", "exp"]},
            )
        except jwt.InvalidAudienceError:
            return "wrong aud"
        except jwt.InvalidIssuerError:
            return "wrong iss"
        except jwt.InvalidSignatureError:
            return "bad signature"
        except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError):
            return "outside its lifetime"
        except jwt.PyJWTError:
            return "malformed claims"
        lifetime = float(claims["exp"]) - float(claims["nbf"])
        if lifetime > _MAX_PROOF_LIFETIME:
            return "lifetime over 10 minutes"
        return None

    # ----------------------------------------------------------------- responses

    def _json(self, request: _Handler, status: int, payload: dict[str, Any], correlation: str) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        headers = {"client-request-id": correlation, "request-id": str(uuid.uuid4())}
        request.send_payload(status, body, "application/json;odata.metadata=minimal;charset=utf-8", headers)

    def _error(self, request: _Handler, error: _GraphError, correlation: str) -> None:
        request_id = str(uuid.uuid4())
        payload = {
            "error": {
                "code": error.code,
                "message": error.message,
                "innerError": {
                    "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                    "request-id": request_id,
                    "client-request-id": correlation,
                },
            }
        }
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        headers = {"client-request-id": correlation, "request-id": request_id, **error.headers}
        request.send_payload(error.status, body, "application/json", headers)
