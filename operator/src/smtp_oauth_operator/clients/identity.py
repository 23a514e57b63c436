"""Access tokens from Microsoft Entra ID (client credentials), and where identity failures are decided.

One MSAL ``ConfidentialClientApplication`` is kept per (authority, client, credential, trust, proxy):
its in-memory token cache is what lets a thousand SmtpOAuthConfigs sharing one app registration cost
one token request per token lifetime. Nothing here is ever written to disk or to the API server.

An application holds its client secret, so it lives only as long as a resource uses it: each owner
(a SmtpOAuthConfig, ``namespace/name``) is bound to the application of its latest token request, and
an application no owner is bound to any more (the secret was rotated, the resource deleted or
``release``d) is closed and dropped at once.

MSAL's HTTP is synchronous (requests), so every call runs in a thread of a bounded pool of its own: a
black-holed identity provider holds those threads only, never the ones the Kubernetes client uses. We hand MSAL our own
``requests.Session`` with ``trust_env=False``: otherwise the ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``
variables silently override the CA bundle we pass, and ``HTTPS_PROXY`` overrides ``spec.proxy``.
A response hook records each HTTP status and ``Retry-After``, which MSAL's result does not carry.

Three credentials reach MSAL here: a client secret; a certificate (MSAL's ``private_key`` +
``public_certificate`` form, which signs PS256 with the SHA-256 thumbprint); and a federated
assertion, a callable MSAL calls only for a network token request, so each request presents a fresh
ServiceAccount token. An application is keyed by the credential's identity (a digest, a thumbprint, a
ServiceAccount name), never by the secret itself.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import logging
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msal
import requests

from smtp_oauth_operator.domain.credentials import CertificateCredential
from smtp_oauth_operator.domain.reasons import CheckFailed, ConditionType, Reason
from smtp_oauth_operator.domain.redact import proxy_address, proxy_secrets, quote_reply

__all__ = ["AccessToken", "FederatedAssertion", "TokenProvider", "TokenRequest"]

logger = logging.getLogger(__name__)

# error_codes[0] of Entra ID's error JSON → our reason (protocol-facts.md §5). The `error` string is
# the fallback when a code is new to us.
_CODES: dict[int, Reason] = {
    90002: Reason.TENANT_NOT_FOUND,
    900023: Reason.TENANT_NOT_FOUND,
    700016: Reason.APPLICATION_NOT_FOUND,
    7000215: Reason.INVALID_CLIENT_SECRET,
    7000222: Reason.CLIENT_SECRET_EXPIRED,
    700027: Reason.CERTIFICATE_NOT_REGISTERED,
    700024: Reason.CLOCK_SKEW,
    70021: Reason.FEDERATED_CREDENTIAL_MISMATCH,
    700211: Reason.FEDERATED_CREDENTIAL_MISMATCH,
    700212: Reason.FEDERATED_CREDENTIAL_MISMATCH,
    700213: Reason.FEDERATED_CREDENTIAL_MISMATCH,
    7002137: Reason.FEDERATED_CREDENTIAL_MISMATCH,
    7002138: Reason.FEDERATED_CREDENTIAL_MISMATCH,
    50166: Reason.ISSUER_UNREACHABLE,
    70011: Reason.INVALID_SCOPE,
    1002012: Reason.INVALID_SCOPE,
    500011: Reason.INVALID_SCOPE,
}
_ERRORS: dict[str, Reason] = {
    "invalid_tenant": Reason.TENANT_NOT_FOUND,
    "unauthorized_client": Reason.APPLICATION_NOT_FOUND,
    "invalid_client": Reason.INVALID_CLIENT_SECRET,
    "invalid_scope": Reason.INVALID_SCOPE,
    "invalid_resource": Reason.INVALID_SCOPE,
}
_T = ConditionType.TOKEN_ACQUIRED
TOKEN_THREADS = 16  # token requests in flight at once (one per application at most)
# ... and at most this many to one identity provider (through one proxy): a black-holed peer holds
# that many threads, and the others keep being served by the rest of the pool.
TOKEN_THREADS_PER_PEER = 4


@dataclass(frozen=True, slots=True)
class FederatedAssertion:
    """Where a federated client assertion (a ServiceAccount token) comes from.

    ``identity`` names the source without any secret (``serviceaccount:mail/mail-sender aud=…`` or
    ``file:/var/run/…``) and is part of the application cache key; ``fetch`` returns a fresh token and
    is called by MSAL only when it makes a network token request. It may raise CheckFailed (the
    ServiceAccount is missing, the TokenRequest is forbidden).
    """

    identity: str
    fetch: Callable[[], str] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """Everything needed to ask for a token. ``client_secret`` never appears in ``repr``."""

    authority_host: str
    tenant_id: str
    client_id: str
    scope: str
    client_secret: str = field(repr=False)
    ca_pem: str | None = None
    proxy_url: str | None = field(default=None, repr=False)  # may carry credentials
    timeout: float = 30.0
    certificate: CertificateCredential | None = None
    send_certificate_chain: bool = False
    assertion: FederatedAssertion | None = None

    @property
    def authority(self) -> str:
        return f"{self.authority_host.rstrip('/')}/{self.tenant_id}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.authority}/oauth2/v2.0/token"

    def credential_id(self) -> str:
        """Which credential, without holding it: a certificate by its thumbprint, a federated source
        by its name, a client secret by a digest (a rotation then gets a fresh application, since
        MSAL caches a 400 for 60 s per application)."""
        if self.certificate is not None:
            chain = ":chain" if self.send_certificate_chain else ""
            return f"cert:{self.certificate.thumbprint_sha256}{chain}"
        if self.assertion is not None:
            return f"federated:{self.assertion.identity}"
        return "secret:" + hashlib.sha256(self.client_secret.encode()).hexdigest()

    def msal_credential(self, presented: dict[str, str]) -> str | dict[str, Any]:
        """MSAL's ``client_credential``; a federated assertion's claims are noted in ``presented``."""
        if self.certificate is not None:
            # With public_certificate and no SHA-1 "thumbprint", MSAL (>= 1.35) signs PS256 with an
            # x5t#S256 header, the modern form, and sends the given certificates as x5c.
            public = self.certificate.chain_pem if self.send_certificate_chain else self.certificate.leaf_pem
            return {"private_key": self.certificate.private_key_pem, "public_certificate": public}
        if self.assertion is not None:
            return {"client_assertion": functools.partial(_present, self.assertion.fetch, presented)}
        return self.client_secret

    def secrets(self) -> tuple[str, ...]:
        """Values that must never be quoted back (the key, the secret, a proxy's credentials)."""
        proxy = proxy_secrets(self.proxy_url)
        if self.certificate is not None:
            return (self.certificate.private_key_pem, *proxy)
        return (self.client_secret, *proxy) if self.client_secret else proxy

    def cache_key(self) -> tuple[str, ...]:
        # The credential (and a proxy URL's credentials) enter the key only as digests or names, so a
        # rotated credential gets a fresh application while the key itself is harmless to hold.
        digest = self.credential_id()
        ca = hashlib.sha256(self.ca_pem.encode()).hexdigest() if self.ca_pem else ""
        proxy = hashlib.sha256(self.proxy_url.encode()).hexdigest() if self.proxy_url else ""
        return (self.authority, self.client_id, digest, ca, proxy, str(self.timeout))


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str = field(repr=False)
    expires_at: float
    from_cache: bool


@dataclass(slots=True)
class _Http:
    """What the response hook saw during one call (thread-local per application)."""

    status: int | None = None
    retry_after: float | None = None
    url: str | None = None


class _App:
    def __init__(self, request: TokenRequest) -> None:
        self.lock = asyncio.Lock()
        self.local = threading.local()
        session = requests.Session()
        session.trust_env = False
        session.verify = True
        # Always our context, also without a caBundle: requests would otherwise verify against certifi's
        # bundle and ignore the system store and SSL_CERT_FILE (the chart's extraCaBundle), which the
        # SMTP client honours.
        session.mount("https://", _TrustAdapter(_trust(request.ca_pem or "")))
        if request.proxy_url:
            session.proxies = {"https": request.proxy_url, "http": request.proxy_url}
        session.hooks["response"].append(self._record)
        # MSAL passes no timeout of its own to an http_client it did not build.
        session.request = functools.partial(session.request, timeout=request.timeout)  # type: ignore[method-assign]
        self.session = session
        self.msal: msal.ConfidentialClientApplication | None = None
        self.request = request
        self.presented: dict[str, str] = {}  # claims of the last federated assertion (no signature)

    def _record(self, response: requests.Response, *_: Any, **__: Any) -> None:
        http: _Http = self.http
        http.status = response.status_code
        http.url = response.url
        retry_after = response.headers.get("Retry-After")
        http.retry_after = float(retry_after) if retry_after and retry_after.isdigit() else None

    @property
    def http(self) -> _Http:
        if not hasattr(self.local, "http"):
            self.local.http = _Http()
        http: _Http = self.local.http
        return http

    def close(self) -> None:
        self.session.close()


@functools.lru_cache(maxsize=64)
def _trust(ca_pem: str) -> ssl.SSLContext:
    """The system's trust anchors (``SSL_CERT_FILE`` when set) plus ``ca_pem`` if any, loaded once per
    bundle and shared by every app."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_pem:
        context.load_verify_locations(cadata=ca_pem)
    return context


class _TrustAdapter(requests.adapters.HTTPAdapter):
    """Hands urllib3 a prepared SSLContext (directly and through a proxy's tunnel).

    With ``session.verify = <bundle file>`` urllib3 loads the whole bundle (the system's anchors plus
    spec.identity.caBundle, some 140 certificates) again for every new connection: tens of
    milliseconds of CPU per new app registration, most of a connection test against a near IdP.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(proxy, **proxy_kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]
        # requests points every connection at certifi's bundle, which urllib3 would load into our
        # context on each connect; the context already holds the anchors we trust.
        conn.ca_certs = None
        conn.ca_cert_dir = None


class TokenProvider:
    """Acquires client-credentials tokens with a shared in-memory cache.

    ``on_request(result)`` is called once per request that reached (or tried to reach) the identity
    provider, with the reason value or ``"Success"``; cache hits are not requests.
    """

    def __init__(
        self,
        *,
        max_apps: int = 512,
        on_request: Callable[[str], None] | None = None,
        threads: int = TOKEN_THREADS,
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="msal")
        self._per_peer = max(1, min(TOKEN_THREADS_PER_PEER, threads // 2))
        self._peers: dict[tuple[str, str], asyncio.Semaphore] = {}
        self._apps: OrderedDict[tuple[str, ...], _App] = OrderedDict()
        self._max_apps = max_apps
        self._on_request = on_request or (lambda _result: None)
        self._bound: dict[Hashable, tuple[str, ...]] = {}  # owner -> key of its latest request
        self._owners: dict[tuple[str, ...], set[Hashable]] = {}  # key -> owners bound to it

    def __len__(self) -> int:
        return len(self._apps)

    def __contains__(self, request: object) -> bool:
        """Whether an application (holding ``request``'s credential) is kept."""
        return isinstance(request, TokenRequest) and request.cache_key() in self._apps

    def _app(self, request: TokenRequest) -> _App:
        key = request.cache_key()
        app = self._apps.get(key)
        if app is None:
            app = _App(request)
            self._apps[key] = app
            while len(self._apps) > self._max_apps:
                _, old = self._apps.popitem(last=False)
                old.close()
        self._apps.move_to_end(key)
        return app

    def invalidate(self, request: TokenRequest) -> None:
        """Forget the cached application and tokens, e.g. after Exchange rejected the token.

        A token minted before the admin granted SMTP.SendAsApp lacks the role for its whole lifetime;
        dropping it makes the next test ask for a fresh one.
        """
        app = self._apps.pop(request.cache_key(), None)
        if app is not None:
            app.close()

    def release(self, owner: Hashable) -> None:
        """``owner`` is gone (or paused): drop the application it used unless another owner uses it."""
        key = self._bound.pop(owner, None)
        if key is not None:
            self._unbind(owner, key)

    def retain(self, owners: Iterable[Hashable]) -> None:
        """Release every owner not in ``owners`` (after a re-list: the complete set of resources)."""
        keep = set(owners)
        for owner in [o for o in self._bound if o not in keep]:
            self.release(owner)

    def clear(self) -> None:
        """Drop every application and token (the operator is paused or stopping)."""
        for app in self._apps.values():
            app.close()
        self._apps.clear()
        self._bound.clear()
        self._owners.clear()

    def _bind(self, owner: Hashable, key: tuple[str, ...]) -> None:
        old = self._bound.get(owner)
        if old == key:
            return
        self._bound[owner] = key
        self._owners.setdefault(key, set()).add(owner)
        if old is not None:
            self._unbind(owner, old)

    def _unbind(self, owner: Hashable, key: tuple[str, ...]) -> None:
        owners = self._owners.get(key)
        if owners is not None:
            owners.discard(owner)
            if owners:
                return
            del self._owners[key]
        # No resource uses this credential any more: the application and the secret it holds go now,
        # not when 512 newer ones have pushed it out.
        app = self._apps.pop(key, None)
        if app is not None:
            app.close()

    async def acquire(self, request: TokenRequest, *, owner: Hashable | None = None) -> AccessToken:
        """A token for ``request``; ``owner`` (the resource asking) binds it to this credential."""
        app = self._app(request)
        if owner is not None:
            self._bind(owner, request.cache_key())
        # One request in flight per application: concurrent tests of resources that share an app
        # registration wait here and then find the token in the cache.
        await app.lock.acquire()
        peer = (urlsplit(request.authority_host).netloc, request.proxy_url or "")
        slot = self._peers.setdefault(peer, asyncio.Semaphore(self._per_peer))
        try:
            await slot.acquire()
        except BaseException:
            app.lock.release()
            raise
        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool, self._acquire_sync, app, request)
        except BaseException:
            slot.release()
            app.lock.release()
            raise

        # A thread can not be interrupted: if the caller's deadline cancels the wait, the application
        # and the peer's slot stay taken until its request ends, so no second request shares the
        # session meanwhile and a black hole never holds more than its share of the pool.
        def finished(done: asyncio.Future[AccessToken]) -> None:
            if not done.cancelled():
                done.exception()  # retrieved: a result nobody awaits any more is not an error
            slot.release()
            app.lock.release()

        future.add_done_callback(finished)
        return await asyncio.shield(future)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- worker thread -------------------------------------------------------------------------

    def _acquire_sync(self, app: _App, request: TokenRequest) -> AccessToken:
        http = app.http
        http.status = http.retry_after = http.url = None
        secrets = request.secrets()
        host = urlsplit(request.authority_host).netloc
        proxy = proxy_address(request.proxy_url)
        try:
            if app.msal is None:
                app.msal = msal.ConfidentialClientApplication(
                    request.client_id,
                    client_credential=request.msal_credential(app.presented),
                    authority=request.authority,
                    http_client=app.session,
                    instance_discovery=False,
                    validate_authority=False,
                )
            result = app.msal.acquire_token_for_client(scopes=[request.scope])
        except requests.exceptions.SSLError as exc:
            self._on_request(Reason.TLS_VERIFICATION_FAILED)
            raise CheckFailed(
                Reason.TLS_VERIFICATION_FAILED,
                f"the identity provider {host} presented a certificate that is not trusted "
                f"({_ssl_detail(exc)}); add its issuing CA as spec.identity.caBundle",
                condition=_T,
            ) from None
        except requests.exceptions.ProxyError as exc:
            self._on_request(Reason.IDENTITY_PROVIDER_UNREACHABLE)
            raise CheckFailed(
                Reason.IDENTITY_PROVIDER_UNREACHABLE,
                f"the proxy {proxy} did not connect us to {host} ({_short(exc, secrets)})",
            ) from None
        except requests.exceptions.Timeout:
            self._on_request(Reason.IDENTITY_PROVIDER_UNREACHABLE)
            via = f" through the proxy {proxy}" if proxy else ""
            raise CheckFailed(
                Reason.IDENTITY_PROVIDER_UNREACHABLE,
                f"no answer from the identity provider {host}{via} within {request.timeout:g} s",
            ) from None
        except requests.exceptions.RequestException as exc:
            self._on_request(Reason.IDENTITY_PROVIDER_UNREACHABLE)
            raise CheckFailed(
                Reason.IDENTITY_PROVIDER_UNREACHABLE,
                f"cannot connect to the identity provider {host} ({_short(exc, secrets)})",
            ) from None
        except msal.exceptions.MsalServiceError:
            # MSAL raises this for a 5xx; a throttling answer may come the same way.
            raise self._http_failure(app, request) from None
        except json.JSONDecodeError:
            raise self._http_failure(app, request) from None
        except ValueError as exc:
            # MSAL's constructor raises ValueError when tenant discovery is refused (a 400 for an
            # unknown tenant). Any other ValueError is a bug of ours; let it surface as such.
            if "authority" not in str(exc).lower():
                raise
            status = app.http.status  # set by the response hook, behind mypy's back
            if status is not None and (status >= 500 or status == 429):
                raise self._http_failure(app, request) from None
            self._on_request(Reason.TENANT_NOT_FOUND)
            raise CheckFailed(
                Reason.TENANT_NOT_FOUND,
                f"Entra ID does not know the tenant {request.tenant_id!r} at {host} "
                f"(OIDC discovery answered HTTP {status or 'with an error'})",
            ) from None

        if "access_token" in result:
            from_cache = result.get("token_source") == "cache"
            if not from_cache:
                self._on_request("Success")
            expires_in = float(result.get("expires_in", 600))
            return AccessToken(
                value=str(result["access_token"]),
                expires_at=time.time() + expires_in,
                from_cache=from_cache,
            )
        raise self._error_result(result, app, request)

    def _http_failure(self, app: _App, request: TokenRequest) -> CheckFailed:
        status = app.http.status
        host = urlsplit(request.authority_host).netloc
        if status == 429:
            self._on_request(Reason.THROTTLED)
            retry = app.http.retry_after
            after = f"; retrying after {retry:g} s as asked" if retry else ""
            return CheckFailed(
                Reason.THROTTLED, f"Entra ID throttled the token request (HTTP 429){after}", retry_after=retry
            )
        self._on_request(Reason.IDENTITY_PROVIDER_UNAVAILABLE)
        what = f"HTTP {status}" if status else "an unreadable answer"
        return CheckFailed(
            Reason.IDENTITY_PROVIDER_UNAVAILABLE,
            f"the identity provider {host} failed with {what}",
            retry_after=app.http.retry_after,
        )

    def _error_result(self, result: dict[str, Any], app: _App, request: TokenRequest) -> CheckFailed:
        status = app.http.status
        if status == 429 or (status is not None and status >= 500):
            return self._http_failure(app, request)
        codes = result.get("error_codes") or []
        code = codes[0] if codes and isinstance(codes[0], int) else None
        error = str(result.get("error", "unknown_error"))
        reason = _CODES.get(code) if code is not None else None
        reason = reason or _ERRORS.get(error, Reason.UNEXPECTED_RESPONSE)
        reason = _for_credential(reason, code, request)
        self._on_request(reason)
        description = str(result.get("error_description", "")).split("\r\n")[0].split("\n")[0]
        detail = quote_reply(description, request.secrets()) or error
        if reason is Reason.FEDERATED_CREDENTIAL_MISMATCH:
            return CheckFailed(reason, _mismatch(code, app.presented, detail), condition=_T)
        if reason is Reason.CERTIFICATE_NOT_REGISTERED and request.certificate is not None:
            detail = (
                f"certificate {request.certificate.thumbprint_sha256} (SHA-1 "
                f"{request.certificate.thumbprint_sha1}) is not registered on app {request.client_id}: {detail}"
            )
        return CheckFailed(reason, f"Entra ID refused the token request: {detail}", condition=_T)


def _present(fetch: Callable[[], str], presented: dict[str, str]) -> str:
    """MSAL's client_assertion callable: a fresh token per network request, its claims noted for
    the error message (issuer, subject, audience are public facts; the signature is not kept)."""
    token = fetch()
    presented.clear()
    presented.update(_claims(token))
    return token


def _claims(token: str) -> dict[str, str]:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    if not isinstance(claims, dict):
        return {}
    out = {k: str(claims[k]) for k in ("iss", "sub") if isinstance(claims.get(k), str)}
    aud = claims.get("aud")
    if isinstance(aud, list):
        aud = " ".join(str(a) for a in aud)
    if isinstance(aud, str):
        out["aud"] = aud
    return {k: v[:256] for k, v in out.items()}


# error_codes that name which of the federated credential's fields did not match.
_MISMATCH_FIELD = {
    700211: "issuer",
    700212: "audience",
    700213: "subject",
    7002137: "subject",
    7002138: "subject",
}


def _mismatch(code: int | None, presented: dict[str, str], detail: str) -> str:
    field_name = _MISMATCH_FIELD.get(code or 0)
    claim = {"issuer": "iss", "subject": "sub", "audience": "aud"}
    if field_name is not None and presented.get(claim[field_name]):
        return (
            f"no federated credential of the app matches the {field_name} the operator presented, "
            f"{presented[claim[field_name]]!r} (Entra ID: {detail})"
        )
    shown = ", ".join(f"{name} {presented[c]!r}" for name, c in claim.items() if presented.get(c))
    what = f"; the operator presented {shown}" if shown else ""
    return f"Entra ID found no matching federated credential{what} (Entra ID: {detail})"


def _for_credential(reason: Reason, code: int | None, request: TokenRequest) -> Reason:
    """The same error means different things for different credentials: ``invalid_client`` is a bad
    secret for a secret, an unknown certificate for a certificate; a signature Entra ID cannot check
    is a missing certificate for a certificate, a token from another issuer key for federation."""
    if request.certificate is not None and reason is Reason.INVALID_CLIENT_SECRET:
        return Reason.CERTIFICATE_NOT_REGISTERED
    if request.assertion is not None and reason in {
        Reason.INVALID_CLIENT_SECRET,
        Reason.CERTIFICATE_NOT_REGISTERED,
    }:
        return Reason.FEDERATED_CREDENTIAL_MISMATCH
    return reason


def _ssl_detail(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("certificate verify failed: ", "CERTIFICATE_VERIFY_FAILED"):
        if marker in text:
            tail = text.split(marker, 1)[1]
            return "certificate verify failed: " + tail.split(" (_ssl")[0].split("')")[0].strip(" :")
    return "TLS handshake failed"


def _short(exc: BaseException, secrets: tuple[str, ...]) -> str:
    text = str(exc)
    for marker in ("Failed to establish a new connection: ", "Caused by ", "Errno"):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    return quote_reply(text.rstrip("')\""), secrets)[:160] or type(exc).__name__
