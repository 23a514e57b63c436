"""A local, faithful stand-in for smtp.office365.com (SMTP AUTH XOAUTH2 client submission).

Why: the operator's SMTP check must be exercised with the real aiosmtplib client against a server
that says exactly what Exchange Online says: the ``220 … Microsoft ESMTP MAIL Service ready``
banner, STARTTLS before any AUTH, ``AUTH LOGIN XOAUTH2`` after it, ``235 2.7.0`` on success,
``535 5.7.3`` directly (no 334 challenge) for every token problem, the ``535 5.7.139`` texts when
SMTP AUTH is disabled, ``530 5.7.57`` for MAIL without AUTH and ``554 5.2.252 SendAsDenied`` after
DATA. The reply texts drive the operator's failure classification, so they are reproduced
verbatim (see protocol-facts.md §1).

Tokens are checked against a :class:`~smtp_oauth_operator.testing.idp.FakeEntraID` (issued by it,
not expired, audience Exchange Online, ``SMTP.SendAsApp`` role) and against per-mailbox grants
(the ``Add-MailboxPermission`` step); by default nothing is granted, like a fresh tenant.

aiosmtpd is an optional dependency (the ``testing`` extra), which is why only this subpackage
imports it. Two aiosmtpd pitfalls are handled here: its 512-byte command limit (a real token
makes a 2-3 KB ``AUTH`` line) and ``Controller(port=0)`` (we bind with ``loop.create_server`` on a
private event loop thread instead, so port 0 works and start-up takes milliseconds).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import datetime as dt
import email.policy
import email.utils
import json
import logging
import secrets
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from types import TracebackType
from typing import Any, AnyStr, Literal, Protocol

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from smtp_oauth_operator.testing.idp import EXCHANGE_RESOURCE, TokenInfo
from smtp_oauth_operator.testing.pki import CertificateAuthority, ServerCert

__all__ = [
    "AuthAttempt",
    "AuthDisabled",
    "ChallengeStyle",
    "FakeExchange",
    "ReceivedMessage",
    "TokenValidator",
]

ChallengeStyle = Literal["exchange", "google"]
AuthDisabled = Literal["tenant", "mailbox", "policy"]

_AUTH_LINE_LIMIT = 16 * 1024
_MAX_SIZE = 157_286_400
_GOOGLE_CHALLENGE = {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}
_GOOGLE_535 = (
    "535-5.7.8 Username and Password not accepted. For more information, go to\r\n"
    "535 5.7.8  https://support.google.com/mail/?p=BadCredentials fake.127.0.0.1 - gsmtp"
)
_REWRITES = {
    # aiosmtpd's fixed texts → Exchange Online's.
    "220 Ready to start TLS": "220 2.0.0 SMTP server ready",
    "354 End data with <CR><LF>.<CR><LF>": "354 Start mail input; end with <CRLF>.<CRLF>",
    "221 Bye": "221 2.0.0 Service closing transmission channel",
    "250 OK": "250 2.0.0 OK",
}


class _DropLoginDataWarning(logging.Filter):
    """aiosmtpd logs a deprecation warning for every successful AUTH; it is not ours to fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Session.login_data is deprecated")


logging.getLogger("mail.log").addFilter(_DropLoginDataWarning())


class TokenValidator(Protocol):
    """What the server needs from an identity provider (``FakeEntraID`` satisfies it)."""

    def validate(self, token: str) -> TokenInfo | None: ...


@dataclass(frozen=True)
class AuthAttempt:
    """One AUTH command as the server saw it. The token itself is deliberately not kept."""

    mechanism: str
    user: str | None
    code: int
    reply: str
    client_id: str | None
    tls: bool


@dataclass(frozen=True)
class ReceivedMessage:
    """A message the server accepted (after DATA)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    message: EmailMessage
    authenticated_as: str
    client_id: str
    tls: bool


@dataclass(frozen=True)
class _Login:
    mailbox: str
    client_id: str
    tenant_id: str


class _ExchangeSMTP(SMTP):
    """aiosmtpd's protocol with Exchange's texts and a command limit big enough for tokens."""

    # The StreamReader buffer is sized from this at construction; DATA lines are held to the
    # RFC limit again below (instance attribute) so only command lines get the larger buffer.
    line_length_limit = _AUTH_LINE_LIMIT

    def __init__(self, handler: _ExchangeHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.owner = handler.owner
        self.line_length_limit = 1001
        # aiosmtpd keeps these limits in a class-level dict shared by every instance; give this
        # connection its own and let AUTH lines carry a ~2-3 KB XOAUTH2 blob.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.command_size_limits["AUTH"] = _AUTH_LINE_LIMIT

    @property
    def uses_tls(self) -> bool:
        return self._tls_protocol is not None or self.owner.implicit_tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and self.transport is None:
            stamp = email.utils.format_datetime(dt.datetime.now(dt.UTC).astimezone())
            self.__ident__ = f"Microsoft ESMTP MAIL Service ready at {stamp}"
            self.owner.opened(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.owner.closed(self)
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            await super().push(_REWRITES.get(status, status))
        else:
            await super().push(status)

    def abort(self) -> None:
        raw = self._original_transport or self.transport
        if isinstance(raw, asyncio.Transport):
            raw.abort()
        elif raw is not None:
            raw.close()


class _ExchangeHandler:
    """aiosmtpd handler hooks and AUTH mechanisms; state lives on the :class:`FakeExchange`."""

    def __init__(self, owner: FakeExchange) -> None:
        self.owner = owner

    async def handle_EHLO(
        self,
        server: _ExchangeSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        owner = self.owner
        address: Any = session.peer  # (host, port) in practice, despite aiosmtpd's annotation
        peer = address[0] if isinstance(address, tuple) else "127.0.0.1"
        lines = [
            f"{owner.server_name} Hello [{peer}]",
            f"SIZE {_MAX_SIZE}",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
        ]
        if owner.offer_starttls and not server.uses_tls:
            lines.append("STARTTLS")
        if server.uses_tls or owner.allow_plaintext_auth:
            lines.append("AUTH " + " ".join(owner.mechanisms))
        lines += ["8BITMIME", "SMTPUTF8"]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(
        self,
        server: _ExchangeSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not session.authenticated:
            return "530 5.7.57 Client not authenticated to send mail."
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self,
        server: _ExchangeSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: _ExchangeSMTP, session: Session, envelope: Envelope) -> str:
        login: Any = session.auth_data
        assert isinstance(login, _Login)  # MAIL is refused before a successful AUTH
        if self.owner.data_delay:
            # A slow mailbox server: the window in which a relay killed mid-submission is tested.
            await asyncio.sleep(self.owner.data_delay)
        fault = self.owner.take_data_fault()
        if fault is not None:
            return fault
        raw = envelope.original_content or b""
        parsed = BytesParser(policy=email.policy.default).parsebytes(raw)
        assert isinstance(parsed, EmailMessage)
        header_from = [addr for _, addr in email.utils.getaddresses(parsed.get_all("From", []))]
        for address in [envelope.mail_from or "", *header_from]:
            if address and not self.owner.may_send_as(login.mailbox, address):
                return (
                    f"554 5.2.252 SendAsDenied; {login.mailbox} not allowed to send as {address}; "
                    "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
                    "Failed to process message due to a permanent exception with message "
                    "[BeginDiagnosticData]Cannot submit message. 0.35250:0E00E18A[EndDiagnosticData] "
                    f"[Hostname={self.owner.diagnostic_host}]"
                )
        self.owner.store(
            ReceivedMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=raw,
                message=parsed,
                authenticated_as=login.mailbox,
                client_id=login.client_id,
                tls=server.uses_tls,
            )
        )
        internal = secrets.randbelow(10**13)
        return (
            f"250 2.6.0 <{secrets.token_hex(16)}@{self.owner.diagnostic_host.lower()}> "
            f"[InternalId={internal}, Hostname={self.owner.diagnostic_host}] "
            f"{len(raw)} bytes in 0.012, 80.123 KB/sec Queued mail for delivery"
        )

    async def auth_LOGIN(self, server: _ExchangeSMTP, args: list[str]) -> AuthResult:
        """Basic authentication is retired for client submission (protocol-facts.md §1)."""
        user: bytes | None = None
        if len(args) == 1:
            answer = await server.challenge_auth(SMTP.AuthLoginUsernameChallenge)
            if answer is MISSING:
                return self._record("LOGIN", None, None, server, 501, "501", handled=True)
            user = answer
        else:
            with contextlib.suppress(binascii.Error):
                user = base64.b64decode(args[1], validate=True)
        password = await server.challenge_auth(SMTP.AuthLoginPasswordChallenge)
        if password is MISSING:
            return self._record("LOGIN", None, None, server, 501, "501", handled=True)
        name = user.decode("utf-8", "replace") if user is not None else None
        reply = "550 5.7.30 Basic authentication is not supported for Client Submission."
        return self._record("LOGIN", name, None, server, 550, reply)

    async def auth_XOAUTH2(self, server: _ExchangeSMTP, args: list[str]) -> AuthResult:
        owner = self.owner
        if len(args) == 1:
            answer = await server.challenge_auth(b"", encode_to_b64=False)
            if answer is MISSING:  # "*" or bad base64: aiosmtpd already answered 501
                return self._record("XOAUTH2", None, None, server, 501, "501", handled=True)
            blob = bytes(answer)
        else:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Cannot Decode response")
                return self._record(
                    "XOAUTH2", None, None, server, 501, "501 5.5.2 Cannot Decode response", handled=True
                )
        user, token = _parse_xoauth2(blob)
        info = owner.idp.validate(token) if token else None
        client_id = info.client_id if info else None
        if info is None or user is None or not owner.token_acceptable(info):
            return await self._reject(server, user, client_id)
        disabled = owner.auth_disabled_for(user)
        if disabled is not None:
            return self._record("XOAUTH2", user, client_id, server, 535, owner.reply_disabled(disabled))
        if not owner.is_granted(user, info.client_id):
            return await self._reject(server, user, client_id)
        result = self._record("XOAUTH2", user, client_id, server, 235, "235 2.7.0 Authentication successful")
        result.success = True
        result.auth_data = _Login(mailbox=user, client_id=info.client_id, tenant_id=info.tenant_id)
        return result

    async def _reject(self, server: _ExchangeSMTP, user: str | None, client_id: str | None) -> AuthResult:
        """Exchange: a direct ``535 5.7.3``; Google: a 334 JSON challenge, then ``535 5.7.8``."""
        if self.owner.challenge_style == "google":
            answer = await server.challenge_auth(json.dumps(_GOOGLE_CHALLENGE).encode())
            if answer is MISSING:  # "*" or bad base64: aiosmtpd already answered 501
                return self._record("XOAUTH2", user, client_id, server, 501, "501", handled=True)
            return self._record("XOAUTH2", user, client_id, server, 535, _GOOGLE_535)
        return self._record("XOAUTH2", user, client_id, server, 535, self.owner.reply_535())

    def _record(
        self,
        mechanism: str,
        user: str | None,
        client_id: str | None,
        server: _ExchangeSMTP,
        code: int,
        reply: str,
        *,
        handled: bool = False,
    ) -> AuthResult:
        self.owner.record(
            AuthAttempt(
                mechanism=mechanism,
                user=user,
                code=code,
                reply=reply,
                client_id=client_id,
                tls=server.uses_tls,
            )
        )
        if handled:
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=reply)


def _parse_xoauth2(blob: bytes) -> tuple[str | None, str | None]:
    """Split ``user=…\\x01auth=Bearer …\\x01\\x01`` into (user, token); ``None`` for what is missing."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        return None, None
    if not text.endswith("\x01\x01"):
        return None, None
    user: str | None = None
    token: str | None = None
    for part in text[:-2].split("\x01"):
        key, sep, value = part.partition("=")
        if not sep:
            return None, None
        if key == "user":
            user = value
        elif key == "auth" and value.startswith("Bearer "):
            token = value[len("Bearer ") :]
    if not user or not token:
        return None, None
    return user, token


class FakeExchange:
    """An aiosmtpd server on 127.0.0.1 that answers like Exchange Online's SMTP submission.

    Use as a context manager or ``start()``/``stop()``. It runs its own asyncio loop in a daemon
    thread, so it serves both synchronous and asynchronous tests. ``port=0`` picks a free port.

    Modes: default is port-587 style (plain greeting, STARTTLS, then ``AUTH LOGIN XOAUTH2``);
    ``implicit_tls=True`` is port-465 style (TLS from the first byte, AUTH offered at once);
    ``offer_starttls=False`` is a plaintext-only server (no STARTTLS; AUTH only offered when
    ``allow_plaintext_auth=True``); ``offer_xoauth2=False`` offers ``AUTH LOGIN`` only.
    """

    def __init__(
        self,
        idp: TokenValidator,
        *,
        cert: ServerCert | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        server_name: str = "LO2P265CA0123.outlook.office365.com",
        implicit_tls: bool = False,
        offer_starttls: bool = True,
        offer_xoauth2: bool = True,
        allow_plaintext_auth: bool = False,
        challenge_style: ChallengeStyle = "exchange",
        auth_disabled: AuthDisabled | None = None,
        audiences: Iterable[str] = (EXCHANGE_RESOURCE,),
        required_role: str | None = "SMTP.SendAsApp",
        timeout: float = 300.0,
    ) -> None:
        if cert is None and (implicit_tls or offer_starttls):
            cert = CertificateAuthority.create("fake Exchange CA").issue(host, "localhost")
        self.idp = idp
        self.cert = cert
        self.host = host
        self._requested_port = port
        self.server_name = server_name
        self.diagnostic_host = f"{server_name.partition('.')[0].upper()}.GBRP265.PROD.OUTLOOK.COM"
        self.implicit_tls = implicit_tls
        self.offer_starttls = offer_starttls and not implicit_tls
        self.offer_xoauth2 = offer_xoauth2
        self.allow_plaintext_auth = allow_plaintext_auth
        self.challenge_style: ChallengeStyle = challenge_style
        self.auth_disabled: AuthDisabled | None = auth_disabled
        self.audiences = tuple(a.rstrip("/").lower() for a in audiences)
        self.required_role = required_role
        self.timeout = timeout
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._grants: set[tuple[str, str]] = set()
        self._send_as: set[tuple[str, str]] = set()
        self._mailbox_auth: dict[str, bool] = {}
        self._messages: list[ReceivedMessage] = []
        self._attempts: list[AuthAttempt] = []
        self._data_faults: list[str] = []
        self.data_delay = 0.0  # seconds before answering each end-of-DATA
        self._data_faults_answered = 0
        self._connections = 0
        self._open: set[_ExchangeSMTP] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._starttls_context: ssl.SSLContext | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> FakeExchange:
        """Bind and serve on a private event loop thread. Returns ``self``."""
        if self._loop is not None:
            return self
        # One context for all sessions: loading the chain per connection would dominate benchmarks.
        self._starttls_context = self.cert.server_context() if self.offer_starttls and self.cert else None
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_quiet)
        thread = threading.Thread(target=loop.run_forever, name="fake-exchange", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self._astart(), loop).result(timeout=10)
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    async def _astart(self) -> None:
        loop = asyncio.get_running_loop()
        ssl_context = self.cert.server_context() if self.implicit_tls and self.cert else None
        self._server = await loop.create_server(
            self._protocol, host=self.host, port=self._requested_port, ssl=ssl_context, backlog=512
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> _ExchangeSMTP:
        assert self._loop is not None
        exclude = ["PLAIN"] if self.offer_xoauth2 else ["PLAIN", "XOAUTH2"]
        return _ExchangeSMTP(
            _ExchangeHandler(self),
            hostname=self.server_name,
            tls_context=self._starttls_context,
            auth_require_tls=not (self.implicit_tls or self.allow_plaintext_auth),
            auth_exclude_mechanism=exclude,
            data_size_limit=_MAX_SIZE,
            enable_SMTPUTF8=True,
            timeout=self.timeout,
            loop=self._loop,
        )

    def stop(self) -> None:
        """Stop listening, abort open sessions and end the loop thread."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._astop(), loop).result(timeout=10)
        self._shutdown_loop()

    async def _astop(self) -> None:
        if self._server is not None:
            self._server.close()
        with self._lock:
            sessions = list(self._open)
        for session in sessions:
            session.abort()
        if self._server is not None:
            await self._server.wait_closed()
        current = asyncio.current_task()
        for _ in range(3):
            await asyncio.sleep(0)
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(3):
            await asyncio.sleep(0)

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        if not loop.is_running():
            loop.close()
        self._loop = self._thread = None
        self._server = None

    def __enter__(self) -> FakeExchange:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeExchange is not started")
        return self._port

    @property
    def ca_file(self) -> str | None:
        """The CA certificate a client must trust (``None`` for a plaintext-only server)."""
        return str(self.cert.ca_file) if self.cert else None

    @property
    def mechanisms(self) -> tuple[str, ...]:
        return ("LOGIN", "XOAUTH2") if self.offer_xoauth2 else ("LOGIN",)

    # ----------------------------------------------------------------- Exchange configuration

    def grant(self, mailbox: str, client_id: str) -> None:
        """``Add-MailboxPermission -User <app SP> -AccessRights FullAccess`` for ``mailbox``."""
        with self._lock:
            self._grants.add((mailbox.lower(), client_id.lower()))

    def revoke(self, mailbox: str, client_id: str) -> None:
        with self._lock:
            self._grants.discard((mailbox.lower(), client_id.lower()))

    def is_granted(self, mailbox: str, client_id: str) -> bool:
        with self._lock:
            return (mailbox.lower(), client_id.lower()) in self._grants

    def grant_send_as(self, mailbox: str, address: str) -> None:
        """Let an authenticated ``mailbox`` send as ``address`` (``Add-RecipientPermission``)."""
        with self._lock:
            self._send_as.add((mailbox.lower(), address.lower()))

    def may_send_as(self, mailbox: str, address: str) -> bool:
        if address.lower() == mailbox.lower():
            return True
        with self._lock:
            return (mailbox.lower(), address.lower()) in self._send_as

    def set_mailbox_smtp_auth(self, mailbox: str, *, disabled: bool | None) -> None:
        """``Set-CASMailbox -SmtpClientAuthenticationDisabled``: ``True``/``False`` overrides the
        tenant setting for ``mailbox``; ``None`` inherits it again."""
        with self._lock:
            if disabled is None:
                self._mailbox_auth.pop(mailbox.lower(), None)
            else:
                self._mailbox_auth[mailbox.lower()] = disabled

    def auth_disabled_for(self, mailbox: str) -> AuthDisabled | None:
        """Which 5.7.139 reply (if any) an otherwise valid AUTH as ``mailbox`` gets."""
        with self._lock:
            override = self._mailbox_auth.get(mailbox.lower())
        if self.auth_disabled == "policy":
            return "policy"
        if override is True:
            return "mailbox"
        if override is False:
            return None
        return self.auth_disabled

    def token_acceptable(self, info: TokenInfo) -> bool:
        if info.audience.rstrip("/").lower() not in self.audiences:
            return False
        return self.required_role is None or self.required_role in info.roles

    # ----------------------------------------------------------------- replies

    def reply_535(self) -> str:
        return f"535 5.7.3 Authentication unsuccessful [{self._diagnostic()}]"

    def reply_disabled(self, scope: AuthDisabled) -> str:
        if scope == "policy":
            text = (
                "the request did not meet the criteria to be authenticated successfully. "
                "Contact your administrator."
            )
        else:
            which = "Tenant" if scope == "tenant" else "Mailbox"
            text = (
                f"SmtpClientAuthentication is disabled for the {which}. "
                "Visit https://aka.ms/smtp_auth_disabled for more information."
            )
        return f"535 5.7.139 Authentication unsuccessful, {text} [{self._diagnostic()}]"

    def _diagnostic(self) -> str:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return f"{self.diagnostic_host} {stamp} 08DE{secrets.token_hex(6).upper()}"

    # ----------------------------------------------------------------- observations

    def opened(self, session: _ExchangeSMTP) -> None:
        with self._lock:
            self._connections += 1
            self._open.add(session)

    def closed(self, session: _ExchangeSMTP) -> None:
        with self._lock:
            self._open.discard(session)

    def record(self, attempt: AuthAttempt) -> None:
        with self._changed:
            self._attempts.append(attempt)
            self._changed.notify_all()

    def store(self, message: ReceivedMessage) -> None:
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def auth_attempts(self) -> list[AuthAttempt]:
        with self._lock:
            return list(self._attempts)

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._connections

    def wait_for_messages(self, count: int = 1, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Block until at least ``count`` messages arrived (or raise ``TimeoutError``)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self._messages)} of {count} messages arrived")
                self._changed.wait(remaining)
            return list(self._messages)

    def drop_sessions(self) -> None:
        """Abort every open session, as Exchange does with idle ones (clients must reconnect)."""
        loop = self._loop
        if loop is None:
            return

        async def drop() -> None:
            with self._lock:
                sessions = list(self._open)
            for session in sessions:
                session.abort()

        asyncio.run_coroutine_threadsafe(drop(), loop).result(timeout=10)

    def defer_data(self, count: int = 1, reply: str | None = None) -> None:
        """Answer the next ``count`` end-of-DATA with a refusal (default a temporary ``451 4.3.2``, as
        Exchange does when a mailbox server is busy); the message is then not stored."""
        text = reply or (
            f"451 4.3.2 Temporary server error. Please try again later ATTR1 [{self.diagnostic_host}]"
        )
        with self._lock:
            self._data_faults.extend([text] * count)

    def take_data_fault(self) -> str | None:
        with self._lock:
            if not self._data_faults:
                return None
            self._data_faults_answered += 1
            return self._data_faults.pop(0)

    @property
    def data_faults_answered(self) -> int:
        with self._lock:
            return self._data_faults_answered

    def clear(self) -> None:
        """Forget received messages and AUTH attempts (not grants or settings)."""
        with self._lock:
            self._messages.clear()
            self._attempts.clear()


def _quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Connection resets and failed handshakes are expected in tests; do not log them."""
