"""The SMTP relay: where a workload's message is accepted and where it is handed to Exchange Online.

Applications that only speak AUTH PLAIN/LOGIN (Alertmanager, Grafana) connect here (aiosmtpd), upgrade
with STARTTLS (or use the implicit-TLS port), and log in with the username and password of a relayed
SmtpOAuthConfig's ``spec.relay.credentialsSecretRef``; the login picks the configuration. The message is
handed to Exchange with XOAUTH2 (clients/smtp.py, the same client as the connection test) *before* the
client's end-of-DATA is answered, and Exchange's answer becomes ours: there is no spool, so a message is
either accepted upstream or refused to a client that still holds it (at-least-once, never
acknowledged-then-dropped).

Never an open relay: MAIL without AUTH gets ``530 5.7.0``, AUTH is offered only after TLS, and the
envelope and header senders must be in ``spec.relay.allowedSenders``. Nothing here logs a password, a
token or a message body; aiosmtpd's own logger (which logs every command line, AUTH included) is held
at WARNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import email.utils
import logging
import os
import signal
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.clients.metrics import RelayMetrics
from smtp_oauth_operator.clients.smtp import StaleSession, SubmitFailed, Upstream, open_upstream, send_on
from smtp_oauth_operator.domain.objects import ObjectSource
from smtp_oauth_operator.domain.reasons import CheckFailed
from smtp_oauth_operator.domain.relay import (
    LoginThrottle,
    MailboxLimits,
    credentials_match,
    one_line,
    upstream_answer,
)
from smtp_oauth_operator.domain.renewal import renewed_spec, state_of
from smtp_oauth_operator.domain.spec import GROUP, KIND, RelaySpec, SmtpOAuthSpec, SpecError, parse_spec
from smtp_oauth_operator.services.connection import Inputs, resolve, smtp_target, token_request
from smtp_oauth_operator.services.evaluation import evaluate

__all__ = [
    "DEFAULT_MAX_SIZE",
    "Options",
    "Relay",
    "RelayInputError",
    "Route",
    "RouteError",
    "Routes",
    "build_route",
    "refresh_from_manifests",
    "reload_certificate",
    "serve",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_SIZE = 35 * 1024 * 1024  # Exchange Online's default message size limit
MAX_RECIPIENTS = 500  # Exchange Online's per-message recipient limit
_DATA_CHUNK = 1 << 20  # the most DATA read in one step while looking for the terminator
_AIOSMTPD_LOGGERS = ("mail.log", "mail.debug")

_REWRITES = {
    # aiosmtpd's fixed texts → ones with enhanced status codes, as clients and operators expect.
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed maximum message size",
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    ),
    "503 Already authenticated": "503 5.5.1 Already authenticated",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
    "354 End data with <CR><LF>.<CR><LF>": "354 Start mail input; end with <CRLF>.<CRLF>",
    "221 Bye": "221 2.0.0 Bye",
}
_INVALID = "535 5.7.8 Authentication credentials invalid"


class RouteError(Exception):
    """A relayed configuration cannot be served (message safe to log: names, no values)."""


@dataclass(frozen=True, slots=True)
class Route:
    """One relayed SmtpOAuthConfig: who logs in, what they may send, and how it reaches Exchange."""

    namespace: str
    name: str
    spec: SmtpOAuthSpec
    relay: RelaySpec
    inputs: Inputs | None  # None when the referenced objects cannot be read (then never Ready)
    login: str
    password: str = field(repr=False)
    ready: bool = False
    reason: str = "Unknown"

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


async def build_route(
    body: Mapping[str, Any], source: ObjectSource, *, ready: bool, reason: str, inputs: Inputs | None = None
) -> Route | None:
    """The route for an SmtpOAuthConfig body; ``None`` when it does not enable the relay."""
    metadata = body.get("metadata") or {}
    namespace = str(metadata.get("namespace") or "default")
    name = str(metadata.get("name") or "?")
    try:
        spec = parse_spec(body.get("spec"))
    except SpecError as exc:
        raise RouteError(f"{namespace}/{name}: invalid spec: {exc}") from None
    # After a renewal switched, the spec's own Secret holds a credential about to be removed.
    spec = renewed_spec(spec, state_of(body))
    if spec.relay is None:
        return None
    secret_name = spec.relay.credentials_secret
    secret = await source.read("Secret", namespace, secret_name)
    if secret is None:
        raise RouteError(f"{namespace}/{name}: the relay's Secret {namespace}/{secret_name} does not exist")
    login = (secret.data.get("username") or "").strip()
    password = secret.data.get("password") or ""
    if not login or not password:
        raise RouteError(
            f"{namespace}/{name}: the relay's Secret {namespace}/{secret_name} needs the keys username and "
            "password (type kubernetes.io/basic-auth)"
        )
    if inputs is None and ready:
        try:
            inputs = await resolve(spec, namespace, int(metadata.get("generation") or 0), source)
        except CheckFailed as exc:
            ready, reason = False, exc.reason.value
            logger.warning("relay: %s/%s is not served: %s", namespace, name, exc.message)
    return Route(
        namespace=namespace,
        name=name,
        spec=spec,
        relay=spec.relay,
        inputs=inputs,
        login=login,
        password=password,
        ready=ready,
        reason=reason,
    )


async def refresh_from_manifests(
    docs: Sequence[Mapping[str, Any]], source: ObjectSource, tokens: TokenProvider, routes: Routes
) -> float:
    """Without a cluster (``relay -f``): test every relayed configuration in the files, as ``check``
    does, and serve it Ready only if its test passed. Returns the seconds until the next test is due
    (the shortest recheckInterval; a configuration that failed is re-tested sooner)."""
    due = 3600.0
    for doc in docs:
        if doc.get("kind") != KIND or not str(doc.get("apiVersion", "")).startswith(f"{GROUP}/"):
            continue
        meta = dict(doc.get("metadata") or {})
        meta.setdefault("namespace", "default")
        meta.setdefault("generation", 1)
        body = {**doc, "metadata": meta, "status": {}}
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError as exc:
            logger.warning(
                "relay: %s/%s is not served: invalid spec: %s", meta["namespace"], meta.get("name"), exc
            )
            continue
        if spec.relay is None:
            continue
        result = await evaluate(body, source, tokens, now=datetime.now(UTC), force=True)
        ready = result.decision.ready
        is_ready = ready.get("status") == "True"
        try:
            route = await build_route(
                body, source, ready=is_ready, reason=str(ready.get("reason")), inputs=result.inputs
            )
        except RouteError as exc:
            logger.warning("relay: not served: %s", exc)
            routes.remove(meta["namespace"], str(meta.get("name")))
            continue
        if route is None:
            continue
        routes.put(route)
        level = logging.INFO if is_ready else logging.WARNING
        logger.log(
            level,
            "relay: %s/%s serves login %r: %s (%s)",
            route.namespace,
            route.name,
            route.login,
            "Ready" if is_ready else "not Ready",
            ready.get("message"),
        )
        interval = spec.recheck_interval.total_seconds()
        due = min(due, interval if is_ready else min(interval, 60.0))
    return due


class Routes:
    """The relayed configurations by login. A login claimed by two configurations serves neither: the
    login must pick exactly one mailbox."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], Route] = {}
        self._by_login: dict[str, Route | None] = {}

    def put(self, route: Route) -> None:
        self._routes[route.key] = route
        self._index()

    def remove(self, namespace: str, name: str) -> None:
        if self._routes.pop((namespace, name), None) is not None:
            self._index()

    def get(self, key: tuple[str, str]) -> Route | None:
        return self._routes.get(key)

    def find(self, login: str) -> Route | None:
        return self._by_login.get(login.lower())

    def __len__(self) -> int:
        return len(self._routes)

    def keys(self) -> list[tuple[str, str]]:
        return list(self._routes)

    def _index(self) -> None:
        index: dict[str, Route | None] = {}
        for route in self._routes.values():
            login = route.login.lower()
            if login in index:
                other = index[login]
                if other is not None:
                    logger.warning(
                        "the relay login of %s/%s is also the login of %s/%s: neither is served until one changes",
                        route.namespace,
                        route.name,
                        other.namespace,
                        other.name,
                    )
                index[login] = None
            else:
                index[login] = route
        self._by_login = index


class _Quiet(logging.Filter):
    """aiosmtpd logs every command line at INFO (``AUTH PLAIN <base64 password>`` included) and the
    message lines at DEBUG; only its warnings and errors may pass, and never with a command line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and ">>" not in str(record.msg)


def _quiet_aiosmtpd() -> None:
    for name in _AIOSMTPD_LOGGERS:
        log = logging.getLogger(name)
        log.setLevel(logging.WARNING)
        if not any(isinstance(f, _Quiet) for f in log.filters):
            log.addFilter(_Quiet())


class Relay:
    """The relay server: listeners, the AUTH decision, local limits and the upstream submission."""

    def __init__(
        self,
        routes: Routes,
        tokens: TokenProvider,
        *,
        tls_context: ssl.SSLContext,
        hostname: str = "smtp-relay",
        max_size: int = DEFAULT_MAX_SIZE,
        metrics: RelayMetrics | None = None,
        limits: MailboxLimits | None = None,
        throttle: LoginThrottle | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = 300.0,
    ) -> None:
        self.routes = routes
        self.tokens = tokens
        self.tls_context = tls_context
        self.hostname = hostname
        self.max_size = max_size
        self.metrics = metrics
        self.limits = limits or MailboxLimits()
        self.throttle = throttle or LoginThrottle()
        self.clock = clock
        self.timeout = timeout
        self._servers: list[asyncio.Server] = []
        self._sessions: set[_RelaySMTP] = set()
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._draining = False
        self.pool = UpstreamPool()
        self._reaper: asyncio.Task[None] | None = None

    # -- listeners ---------------------------------------------------------------------------------

    async def listen(self, host: str, port: int, *, implicit_tls: bool = False) -> int:
        """Serve STARTTLS (or implicit TLS) on ``host:port``; returns the bound port (``0`` picks one)."""
        _quiet_aiosmtpd()
        loop = asyncio.get_running_loop()

        def factory() -> _RelaySMTP:
            return _RelaySMTP(
                _RelayHandler(self),
                self,
                hostname=self.hostname,
                tls_context=None if implicit_tls else self.tls_context,
                require_starttls=False,
                auth_required=True,
                auth_require_tls=not implicit_tls,
                data_size_limit=self.max_size,
                enable_SMTPUTF8=True,
                timeout=self.timeout,
                loop=loop,
            )

        server = await loop.create_server(
            factory, host=host, port=port, ssl=self.tls_context if implicit_tls else None, backlog=512
        )
        self._servers.append(server)
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap())
        return int(server.sockets[0].getsockname()[1])

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(5)
            self.pool.reap(time.monotonic())

    @property
    def draining(self) -> bool:
        return self._draining

    async def close(self, grace: float = 25.0) -> None:
        """Stop accepting, let messages being handed to Exchange finish (up to ``grace`` s), then end
        the sessions. A message whose end-of-DATA was not answered stays the client's to retry."""
        self._draining = True
        for server in self._servers:
            server.close()
        if self._in_flight:
            await asyncio.wait(list(self._in_flight), timeout=grace)
            await asyncio.sleep(0.2)  # let the sessions write Exchange's answers before they are cut
        for session in list(self._sessions):
            session.abort()
        if self._reaper is not None:
            self._reaper.cancel()
        await self.pool.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self._servers.clear()

    # -- the decisions -------------------------------------------------------------------------------

    async def login(self, peer: str, mechanism: str, user: bytes, password: bytes) -> AuthResult:
        try:
            name, secret = user.decode(), password.decode()
        except UnicodeDecodeError:
            name, secret = "", ""
        route = self.routes.find(name) if name else None
        ok = route is not None and credentials_match(name, secret, route.login, route.password)
        if not ok or route is None:
            delay = self.throttle.failed(peer, self.clock())
            if self.metrics:
                self.metrics.auth_failure("invalid")
            # The login name is the app's, not a secret; it helps find a misconfigured client.
            logger.warning(
                "relay: failed AUTH %s from %s as %r; answering in %.0f s", mechanism, peer, name[:64], delay
            )
            await asyncio.sleep(delay)
            return AuthResult(success=False, handled=False, message=_INVALID)
        self.throttle.succeeded(peer)
        if not route.ready or route.inputs is None:
            if self.metrics:
                self.metrics.auth_failure("not_ready")
            return AuthResult(success=False, handled=False, message=_not_ready(route))
        return AuthResult(success=True, auth_data=route.key)

    def current(self, session: Session) -> Route | None:
        key = session.auth_data
        return self.routes.get(key) if isinstance(key, tuple) else None

    async def deliver(self, route: Route, sender: str, recipients: tuple[str, ...], data: bytes) -> str:
        """Hand the message to Exchange and return the answer for the client's end-of-DATA."""
        started = time.monotonic()
        refusal = self.limits.take(
            route.spec.username,
            len(recipients),
            per_minute=route.relay.messages_per_minute,
            per_day=route.relay.recipients_per_day,
            now=self.clock(),
        )
        if refusal is not None:
            self._count(route, "rate_limited")
            return str(refusal)
        if route.inputs is None:
            return _not_ready(route)
        answer, result = await self._submit(route, sender, recipients, data)
        elapsed = time.monotonic() - started
        if self.metrics:
            self.metrics.duration.observe(elapsed)
        self._count(route, result)
        logger.info(
            "relay: %s/%s from %s to %d recipient(s), %d bytes: %s (%.3f s)",
            route.namespace,
            route.name,
            sender,
            len(recipients),
            len(data),
            answer,
            elapsed,
        )
        return answer

    async def _submit(
        self, route: Route, sender: str, recipients: tuple[str, ...], data: bytes
    ) -> tuple[str, str]:
        """(answer for the client, metric result). An idle authenticated session of this route is
        reused when there is one; a new one is opened otherwise."""
        assert route.inputs is not None
        request = token_request(route.spec, route.inputs)
        target = smtp_target(route.spec, route.inputs)
        # A changed spec or rotated Secret (a new fingerprint) never reuses a session opened before.
        pool_key = (route.namespace, route.name, route.inputs.fingerprint)
        auth_retried = stale_retried = False
        while True:
            try:
                token = await self.tokens.acquire(request)
            except CheckFailed as exc:
                return (
                    f"451 4.7.0 Cannot get a token from Entra ID ({exc.reason.value}); try again later",
                    "token_failed",
                )
            upstream = self.pool.take(pool_key, time.monotonic())
            reused = upstream is not None
            if upstream is None:
                try:
                    upstream = await open_upstream(
                        target, route.spec.username, token.value, now=time.monotonic()
                    )
                except SubmitFailed as exc:
                    if exc.auth_rejected and token.from_cache and not auth_retried:
                        # A cached token may predate a permission change or be revoked: exactly one
                        # retry with a fresh one; a fresh token's 535 is the configuration's problem.
                        auth_retried = True
                        self.tokens.invalidate(request)
                        self.pool.drop(pool_key)
                        continue
                    return upstream_answer(exc.code, exc.text), _result(exc.code)
            try:
                code, text = await send_on(upstream, sender=sender, recipients=recipients, data=data)
            except StaleSession as exc:
                await upstream.close()
                if reused and not stale_retried:
                    # Exchange closed the idle session before our MAIL: nothing was sent; once more.
                    stale_retried = True
                    continue
                return upstream_answer(exc.code, exc.text), _result(exc.code)
            except SubmitFailed as exc:
                await upstream.close()
                return upstream_answer(exc.code, exc.text), _result(exc.code)
            self.pool.give(pool_key, upstream, time.monotonic())
            return upstream_answer(code, text), _result(code)

    def _count(self, route: Route, result: str) -> None:
        if self.metrics:
            self.metrics.message(route.namespace, route.name, result)

    def track(self, task: asyncio.Task[Any]) -> None:
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)


def _result(code: int) -> str:
    return "sent" if 200 <= code < 300 else "deferred" if 400 <= code < 500 else "rejected"


class UpstreamPool:
    """Idle authenticated sessions with Exchange, per relayed configuration.

    A session goes back to the pool after a message Exchange answered with 2xx; it is not reused
    when idle longer than ``idle`` seconds (Exchange drops idle sessions), older than ``max_age`` or
    after ``max_messages`` messages. Any failure closes the session instead.
    """

    def __init__(
        self, *, idle: float = 15.0, max_age: float = 300.0, max_messages: int = 100, per_key: int = 16
    ) -> None:
        self.idle = idle
        self.max_age = max_age
        self.max_messages = max_messages
        self.per_key = per_key
        self._idle: dict[tuple[str, ...], list[tuple[Upstream, float]]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def take(self, key: tuple[str, ...], now: float) -> Upstream | None:
        sessions = self._idle.get(key) or []
        while sessions:
            upstream, since = sessions.pop()  # the most recently used: the least likely to be stale
            if (
                now - since <= self.idle
                and now - upstream.opened <= self.max_age
                and upstream.smtp.is_connected
            ):
                return upstream
            self._close(upstream)
        return None

    def give(self, key: tuple[str, ...], upstream: Upstream, now: float) -> None:
        sessions = self._idle.setdefault(key, [])
        if upstream.messages >= self.max_messages or len(sessions) >= self.per_key:
            self._close(upstream)
            return
        sessions.append((upstream, now))

    def drop(self, key: tuple[str, ...]) -> None:
        for upstream, _ in self._idle.pop(key, []):
            self._close(upstream)

    def reap(self, now: float) -> None:
        for key in list(self._idle):
            keep = []
            for upstream, since in self._idle[key]:
                if now - since > self.idle or now - upstream.opened > self.max_age:
                    self._close(upstream)
                else:
                    keep.append((upstream, since))
            self._idle[key] = keep

    async def close(self) -> None:
        for key in list(self._idle):
            self.drop(key)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=5)

    def _close(self, upstream: Upstream) -> None:
        task = asyncio.ensure_future(upstream.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _not_ready(route: Route) -> str:
    return (
        f"454 4.7.0 Configuration {route.namespace}/{route.name} is not Ready ({route.reason}); "
        "try again later"
    )


class _RelaySMTP(SMTP):
    """aiosmtpd's session with our AUTH (slowed failures), reply texts and session bookkeeping."""

    # The de-facto LOGIN challenges (draft-murchison-sasl-login); Go clients such as Alertmanager's
    # refuse aiosmtpd's default "User Name\0" as an "unexpected server challenge".
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, handler: _RelayHandler, relay: Relay, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and self.transport is None:
            self.relay._sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.relay._sessions.discard(self)
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = _REWRITES.get(status, status)
        await super().push(status)

    def _peer(self) -> str:
        peer: Any = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        # aiosmtpd's built-in PLAIN and LOGIN end in this synchronous call with the decoded pair; hand
        # it back so that _decide makes the (async: a failure is answered late) decision.
        return AuthResult(success=False, handled=False, auth_data=auth_data)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        result = await super().auth_PLAIN(_, args)
        return await self._decide("PLAIN", result)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        result = await super().auth_LOGIN(_, args)
        return await self._decide("LOGIN", result)

    async def _decide(self, mechanism: str, result: AuthResult) -> AuthResult:
        if isinstance(result, AuthResult) and isinstance(result.auth_data, LoginPassword):
            pair: LoginPassword = result.auth_data
            return await self.relay.login(self._peer(), mechanism, pair.login, pair.password)
        # "*" or bad base64 in a challenge answer: aiosmtpd has already answered 501.
        return AuthResult(success=False, handled=True)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the message in chunks between ``.<CRLF>`` occurrences instead of
        line by line: the same replies, limits and result, at a fraction of the CPU (its per-line loop
        was most of the relay's CPU for a 100 KB message; docs/performance.md)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader: Any = self._reader  # its _limit (the line limit) is raised below; asyncio has no setter
        limit = self.data_size_limit
        data = bytearray()
        tail = b"\r\n"  # the data starts at a line start: a first line "." ends it at once
        size = 0
        too_much = False
        saved_limit = reader._limit
        reader._limit = _DATA_CHUNK  # the StreamReader's line limit, raised for this read only
        try:
            while True:
                try:
                    chunk = await reader.readuntil(b".\r\n")
                except asyncio.LimitOverrunError as exc:
                    # No ".<CRLF>" within a chunk: take what was scanned (it keeps the last bytes
                    # that could start the terminator) and go on.
                    chunk = await reader.read(exc.consumed)
                except asyncio.CancelledError:
                    self._writer.close()  # the connection was lost during DATA, as aiosmtpd does
                    raise
                size += len(chunk)
                if not too_much:
                    if limit and size > limit + 3:
                        too_much = True  # keep reading to the end, keep nothing
                        data = bytearray()
                    else:
                        data += chunk
                window = tail + chunk
                if window.endswith(b"\r\n.\r\n"):
                    break
                tail = window[-4:]
        finally:
            reader._limit = saved_limit
        if too_much:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        content = bytes(data[:-3])  # without the ".<CRLF>" line; the CRLF before it is the content's
        if any(len(line) > self.line_length_limit - 2 for line in content.split(b"\r\n")):
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        # RFC 5321 4.5.2: a line's leading dot was doubled by the client.
        content = content.replace(b"\r\n.", b"\r\n")
        if content.startswith(b"."):
            content = content[1:]
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    def abort(self) -> None:
        raw = self._original_transport or self.transport
        if isinstance(raw, asyncio.Transport):
            raw.abort()
        elif raw is not None:
            raw.close()


class _RelayHandler:
    """aiosmtpd's hooks: MAIL, RCPT and DATA for an authenticated session."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def handle_MAIL(
        self, server: _RelaySMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        relay = self.relay
        route = relay.current(session)
        if route is None:
            return "454 4.7.0 This login is no longer served; authenticate again later"
        if not route.ready:
            return _not_ready(route)
        if not route.relay.allows(address):
            relay._count(route, "sender_refused")
            return f"553 5.7.1 Sender <{one_line(address, 254)}> is not allowed for this login"
        refusal = relay.limits.check_message(
            route.spec.username, route.relay.messages_per_minute, relay.clock()
        )
        if refusal is not None:
            relay._count(route, "rate_limited")
            return str(refusal)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: _RelaySMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        relay = self.relay
        route = relay.current(session)
        if route is None:
            return "454 4.7.0 This login is no longer served; authenticate again later"
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return f"452 4.5.3 Too many recipients (at most {MAX_RECIPIENTS} per message)"
        refusal = relay.limits.check_recipients(
            route.spec.username, len(envelope.rcpt_tos) + 1, route.relay.recipients_per_day, relay.clock()
        )
        if refusal is not None:
            return str(refusal)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: _RelaySMTP, session: Session, envelope: Envelope) -> str:
        relay = self.relay
        route = relay.current(session)
        if route is None:
            return "454 4.7.0 This login is no longer served; try again later"
        if not route.ready:
            return _not_ready(route)
        data: bytes = envelope.original_content or b""
        headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
        for _, address in email.utils.getaddresses([str(v) for v in headers.get_all("From", [])]):
            if address and not route.relay.allows(address):
                relay._count(route, "sender_refused")
                return f"550 5.7.1 Header From <{one_line(address, 254)}> is not allowed for this login"
        if relay.draining:
            return "421 4.3.2 The relay is shutting down; try again"
        task = asyncio.ensure_future(
            relay.deliver(route, envelope.mail_from or "", tuple(envelope.rcpt_tos), data)
        )
        relay.track(task)
        # Shielded: a client that hangs up mid-wait must not cancel a submission Exchange may already
        # have accepted (it is then counted and logged as delivered; the client will retry it).
        return await asyncio.shield(task)

    async def handle_exception(self, error: Exception) -> str:
        # The exception text may quote a peer's data; its class name is enough to find the bug.
        logger.error("relay: session failed with %s", type(error).__name__)
        return "451 4.3.0 Internal error; try again later"


# -- the process -----------------------------------------------------------------------------------------


class RelayInputError(Exception):
    """The relay cannot start with these options (exit code 2)."""


@dataclass(frozen=True, slots=True)
class Options:
    listen: str = "0.0.0.0"  # noqa: S104 - a Pod's service port
    port: int = 2587
    tls_port: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_secret: str | None = None
    hostname: str = "smtp-relay"
    max_size: int = DEFAULT_MAX_SIZE
    metrics_port: int = 0
    namespaces: tuple[str, ...] = ()


def _server_context(
    cert_pem: str | None, key_pem: str | None, cert_file: str | None, key_file: str | None
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if cert_pem is not None and key_pem is not None:
            # ssl loads chains from files only: a private temporary directory, removed at once.
            with tempfile.TemporaryDirectory() as tmp:
                cert_path, key_path = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
                for path, text in ((cert_path, cert_pem), (key_path, key_pem)):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "w") as fh:
                        fh.write(text)
                context.load_cert_chain(cert_path, key_path)
        elif cert_file and key_file:
            context.load_cert_chain(cert_file, key_file)
        else:
            raise RelayInputError(
                "the relay needs a TLS certificate: --tls-cert and --tls-key, or --tls-secret"
            )
    except (OSError, ssl.SSLError) as exc:
        raise RelayInputError(
            f"cannot load the TLS certificate and key ({getattr(exc, 'strerror', None) or exc.__class__.__name__})"
        ) from None
    return context


async def _tls_from(options: Options, source: ObjectSource | None) -> ssl.SSLContext:
    if options.tls_secret:
        if source is None:
            raise RelayInputError(
                "--tls-secret needs -f (in a cluster, mount the Secret and use --tls-cert/--tls-key)"
            )
        namespace, _, name = options.tls_secret.rpartition("/")
        secret = await source.read("Secret", namespace or "default", name)
        if secret is None or "tls.crt" not in secret.data or "tls.key" not in secret.data:
            raise RelayInputError(f"Secret {options.tls_secret} with tls.crt and tls.key is not in the files")
        return _server_context(secret.data["tls.crt"], secret.data["tls.key"], None, None)
    return _server_context(None, None, options.tls_cert, options.tls_key)


async def reload_certificate(
    context: ssl.SSLContext, cert_file: str, key_file: str, *, interval: float = 30.0
) -> None:
    """A renewed certificate (cert-manager rewrites the mounted Secret) is loaded into the same context,
    which every new handshake uses: no restart, no dropped connection."""

    def stamp() -> tuple[float, float]:
        return os.stat(cert_file).st_mtime, os.stat(key_file).st_mtime

    seen = stamp()
    while True:
        await asyncio.sleep(interval)
        try:
            now = stamp()
            if now != seen:
                context.load_cert_chain(cert_file, key_file)
                seen = now
                logger.info("relay: loaded the renewed TLS certificate from %s", cert_file)
        except (OSError, ssl.SSLError) as exc:
            # Mid-rotation the pair can be inconsistent for a moment; keep the old one and look again.
            logger.warning("relay: cannot load the TLS certificate yet (%s)", type(exc).__name__)


async def serve(
    options: Options, docs: Sequence[Mapping[str, Any]] | None, source: ObjectSource | None
) -> None:
    """Run the relay until SIGTERM/SIGINT: from manifest files (``docs``) or the cluster."""
    context = await _tls_from(options, source)
    metrics = RelayMetrics()
    tokens = TokenProvider()
    routes = Routes()
    relay = Relay(
        routes,
        tokens,
        tls_context=context,
        hostname=options.hostname,
        max_size=options.max_size,
        metrics=metrics,
    )
    if docs is not None and source is not None:
        if not any(d.get("kind") == KIND for d in docs):
            raise RelayInputError(f"no {KIND} ({GROUP}) found in the files")
        # Tested before the port opens, so a client never meets a configuration still being tested.
        first_due = await refresh_from_manifests(docs, source, tokens, routes)
        if not len(routes):
            raise RelayInputError("no SmtpOAuthConfig in the files enables the relay (spec.relay.enabled)")
        feeder = asyncio.create_task(_refresh_loop(docs, source, tokens, routes, first_due))
    else:
        from smtp_oauth_operator.services import relay_feed  # noqa: PLC0415 - it imports this module

        feed = relay_feed.connect(routes, options.namespaces)
        feeder = asyncio.create_task(feed.run())
        # Listen once the configurations are known, so that a new replica in a rollout never answers
        # a valid login with 535; after a minute without the API server, listen anyway (and say so).
        synced = asyncio.ensure_future(feed.synced.wait())
        await asyncio.wait([synced, feeder], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if feeder.done():
            synced.cancel()
            raise RelayInputError(f"the cluster feed stopped: {type(feeder.exception()).__name__}")
        if not synced.done():
            synced.cancel()
            logger.warning("relay: the configurations are not listed after 60 s; listening anyway")
    try:
        ports = [await relay.listen(options.listen, options.port)]
        if options.tls_port:
            ports.append(await relay.listen(options.listen, options.tls_port, implicit_tls=True))
    except OSError as exc:
        feeder.cancel()
        raise RelayInputError(f"cannot listen on {options.listen}: {exc.strerror or exc}") from None
    metrics.serve(options.metrics_port)
    reloader = None
    if options.tls_cert and options.tls_key and not options.tls_secret:
        reloader = asyncio.create_task(reload_certificate(context, options.tls_cert, options.tls_key))
    logger.info(
        "relay: listening on %s port %s (STARTTLS)%s, %d configuration(s)",
        options.listen,
        ports[0],
        f" and {ports[1]} (implicit TLS)" if len(ports) > 1 else "",
        len(routes),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        done, _ = await asyncio.wait(
            [asyncio.ensure_future(stop.wait()), feeder], return_when=asyncio.FIRST_COMPLETED
        )
        if feeder in done and feeder.exception() is not None:
            logger.error("relay: the configuration feed failed: %s", type(feeder.exception()).__name__)
            raise RelayInputError("the configuration feed stopped") from None
    finally:
        logger.info("relay: stopping; finishing the messages being handed to Exchange")
        await relay.close()
        feeder.cancel()
        if reloader is not None:
            reloader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feeder


async def _refresh_loop(
    docs: Sequence[Mapping[str, Any]], source: ObjectSource, tokens: TokenProvider, routes: Routes, due: float
) -> None:
    while True:
        await asyncio.sleep(due)
        due = await refresh_from_manifests(docs, source, tokens, routes)
