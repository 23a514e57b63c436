"""Access tokens from Microsoft Entra ID (client credentials), and where identity failures are decided.

One MSAL ``ConfidentialClientApplication`` is kept per (authority, client, credential, trust, proxy):
its in-memory token cache is what lets a thousand SmtpOAuthConfigs sharing one app registration cost
one token request per token lifetime. Nothing here is ever written to disk or to the API server.

An application holds its client secret, so it lives only as long as a resource uses it: each owner
(a SmtpOAuthConfig, ``namespace/name``) is bound to the application of its latest token request, and
an application no owner is bound to any more (the secret was rotated, the resource deleted or
``release``d) is closed and dropped at once.

MSAL's HTTP is synchronous (requests), so every call runs in a worker thread. We hand MSAL our own
``requests.Session`` with ``trust_env=False``: otherwise the ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``
variables silently override the CA bundle we pass, and ``HTTPS_PROXY`` overrides ``spec.proxy``.
A response hook records each HTTP status and ``Retry-After``, which MSAL's result does not carry.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msal
import requests

from smtp_oauth_operator.domain.reasons import CheckFailed, ConditionType, Reason
from smtp_oauth_operator.domain.redact import proxy_address, proxy_secrets, quote_reply

__all__ = ["AccessToken", "TokenProvider", "TokenRequest"]

logger = logging.getLogger(__name__)

# error_codes[0] of Entra ID's error JSON → our reason (protocol-facts.md §5). The `error` string is
# the fallback when a code is new to us.
_CODES: dict[int, Reason] = {
    90002: Reason.TENANT_NOT_FOUND,
    900023: Reason.TENANT_NOT_FOUND,
    700016: Reason.APPLICATION_NOT_FOUND,
    7000215: Reason.INVALID_CLIENT_SECRET,
    7000222: Reason.CLIENT_SECRET_EXPIRED,
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

    @property
    def authority(self) -> str:
        return f"{self.authority_host.rstrip('/')}/{self.tenant_id}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.authority}/oauth2/v2.0/token"

    def cache_key(self) -> tuple[str, ...]:
        # The secret (and a proxy URL's credentials) enter the key only as a digest, so a rotated secret gets a fresh application
        # (MSAL caches a 400 for 60 s per application) while the key itself is harmless to hold.
        digest = hashlib.sha256(self.client_secret.encode()).hexdigest()
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

    def __init__(self, *, max_apps: int = 512, on_request: Callable[[str], None] | None = None) -> None:
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
        async with app.lock:
            return await asyncio.to_thread(self._acquire_sync, app, request)

    # -- worker thread -------------------------------------------------------------------------

    def _acquire_sync(self, app: _App, request: TokenRequest) -> AccessToken:
        http = app.http
        http.status = http.retry_after = http.url = None
        secrets = (request.client_secret, *proxy_secrets(request.proxy_url))
        host = urlsplit(request.authority_host).netloc
        proxy = proxy_address(request.proxy_url)
        try:
            if app.msal is None:
                app.msal = msal.ConfidentialClientApplication(
                    request.client_id,
                    client_credential=request.client_secret,
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
        self._on_request(reason)
        description = str(result.get("error_description", "")).split("\r\n")[0].split("\n")[0]
        detail = quote_reply(description, (request.client_secret, *proxy_secrets(request.proxy_url))) or error
        return CheckFailed(reason, f"Entra ID refused the token request: {detail}", condition=_T)


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
