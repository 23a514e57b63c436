"""SMTP AUTH XOAUTH2 against Exchange Online (aiosmtplib), and where SMTP failures are decided.

The session is exactly what a sender does: connect (directly or through an HTTP CONNECT proxy), read
the greeting, EHLO, STARTTLS (required: never authenticate in plaintext), EHLO, AUTH XOAUTH2, an
optional test message, QUIT. Each step that can fail maps its errors to one reason here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.message
import email.utils
import functools
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aiosmtplib

# python-socks' HTTP CONNECT connector is driven with our own stream (see _ReplyBoundedStream); its
# public Proxy class reads past the reply. Pinned below 4 in pyproject.toml; the proxy integration
# tests exercise this import path.
from python_socks import ProxyType
from python_socks._abc import AsyncResolver, AsyncSocketStream
from python_socks._connectors.factory_async import create_connector
from python_socks._protocols.errors import ReplyError

from smtp_oauth_operator.domain.reasons import CheckFailed, ConditionType, Reason
from smtp_oauth_operator.domain.redact import proxy_address, proxy_secrets, quote_reply

__all__ = [
    "Message",
    "SmtpResult",
    "SmtpTarget",
    "StaleSession",
    "SubmitFailed",
    "Upstream",
    "authenticate",
    "hang_up",
    "open_upstream",
    "send_on",
    "tls_context",
]

_M = ConditionType.SMTP_AUTHENTICATED
_MAX_PROXY_REPLY = 16384


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    host: str
    port: int
    implicit_tls: bool
    timeout: float
    ca_pem: str | None = None
    proxy_url: str | None = field(default=None, repr=False)  # may carry credentials

    def describe(self) -> str:
        return f"{self.host}:{self.port} ({'ImplicitTLS' if self.implicit_tls else 'StartTLS'})"


@dataclass(frozen=True, slots=True)
class Message:
    sender: str
    to: tuple[str, ...]
    subject: str
    body: str


@dataclass(slots=True)
class SmtpResult:
    banner: str = ""
    auth_methods: list[str] = field(default_factory=list)
    sent: str | None = None  # the server's answer to DATA when a message was sent


@functools.lru_cache(maxsize=64)
def tls_context(ca_pem: str | None) -> ssl.SSLContext:
    """The client context for a trust bundle: the system's anchors plus ``ca_pem``.

    Built once per bundle and shared by every session: loading the system's anchors costs tens of
    milliseconds of CPU on the event loop (it was most of the operator's CPU per connection test), and
    an SSLContext may serve any number of connections.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_pem:
        context.load_verify_locations(cadata=ca_pem)
    return context


class _ProxyResolves(AsyncResolver):
    """An HTTP proxy resolves the target's name itself; the connector never asks us."""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_UNSPEC) -> Any:
        raise NotImplementedError


class _ReplyBoundedStream(AsyncSocketStream):
    """python-socks' stream interface over a non-blocking socket that never reads past the proxy's reply.

    python-socks reads the CONNECT reply with one ``recv(65536)``; the SMTP server speaks first, and its
    220 greeting often arrives in the same segment as the proxy's ``200`` (measured on loopback: 29 of
    200 sessions lost their greeting and timed out). Reading to the blank line, one byte at a time
    (some 40 bytes), leaves the greeting in the socket for aiosmtplib.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.complete = False

    async def write(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def read(self, max_bytes: int = _MAX_PROXY_REPLY) -> bytes:
        head = bytearray()
        while not head.endswith(b"\r\n\r\n") and len(head) < min(max_bytes, _MAX_PROXY_REPLY):
            chunk = await self.loop.sock_recv(self.sock, 1)
            if not chunk:
                break
            head += chunk
        self.complete = head.endswith(b"\r\n\r\n")
        return bytes(head)

    async def read_exactly(self, n: int) -> bytes:  # SOCKS only; never called for HTTP CONNECT
        raise NotImplementedError

    async def close(self) -> None:
        self.sock.close()


async def _connect_tcp(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"{host} has no address")
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


async def _tunnel(target: SmtpTarget) -> socket.socket:
    """An HTTP CONNECT tunnel to the SMTP server through ``target.proxy_url`` (python-socks speaks the
    protocol, with ``Proxy-Authorization: Basic`` when the URL carries credentials)."""
    proxy = urlsplit(target.proxy_url or "")
    where = proxy_address(target.proxy_url)
    secrets = proxy_secrets(target.proxy_url)
    authority = f"{target.host}:{target.port}"
    user = unquote(proxy.username) if proxy.username is not None else None
    password = unquote(proxy.password) if proxy.password is not None else None
    try:
        async with asyncio.timeout(target.timeout):
            sock = await _connect_tcp(proxy.hostname or "", proxy.port or 80)
    except TimeoutError:
        raise CheckFailed(
            Reason.SMTP_CONNECTION_TIMEOUT, f"no connection to the proxy {where} within {target.timeout:g} s"
        ) from None
    except OSError as exc:
        raise CheckFailed(
            Reason.SMTP_CONNECTION_REFUSED,
            f"cannot connect to the proxy {where} ({quote_reply(exc.strerror or str(exc), secrets)})",
        ) from None
    stream = _ReplyBoundedStream(sock)
    connector = create_connector(ProxyType.HTTP, user, password, rdns=None, resolver=_ProxyResolves())
    try:
        async with asyncio.timeout(target.timeout):
            await connector.connect(stream, target.host, target.port)
    except TimeoutError:
        sock.close()
        raise CheckFailed(
            Reason.SMTP_CONNECTION_TIMEOUT,
            f"the proxy {where} did not open a tunnel to {authority} within {target.timeout:g} s",
        ) from None
    except (ReplyError, OSError, ValueError) as exc:
        sock.close()
        detail = quote_reply(str(exc), secrets) or "no answer"
        hint = ""
        if getattr(exc, "error_code", None) == 407:
            hint = "; check the user and password in the proxy URL"
        raise CheckFailed(
            Reason.SMTP_CONNECTION_REFUSED,
            f"the proxy {where} refused the tunnel to {authority}: {detail}{hint}",
        ) from None
    if not stream.complete:
        sock.close()
        raise CheckFailed(
            Reason.SMTP_CONNECTION_REFUSED,
            f"the proxy {where} closed the connection before answering the tunnel to {authority}",
        )
    return sock


def _reply(exc: aiosmtplib.SMTPResponseException, secrets: tuple[str, ...]) -> str:
    return quote_reply(f"{exc.code} {exc.message}", secrets)


async def authenticate(
    target: SmtpTarget,
    username: str,
    token: str,
    *,
    message: Message | None = None,
) -> SmtpResult:
    """Run one SMTP session and raise :class:`CheckFailed` with the precise reason on failure."""
    auth_blob = base64.b64encode(f"user={username}\x01auth=Bearer {token}\x01\x01".encode()).decode()
    secrets = (token, auth_blob)
    result = SmtpResult()
    context = tls_context(target.ca_pem)
    where = target.describe()
    sock = await _tunnel(target) if target.proxy_url else None
    smtp = aiosmtplib.SMTP(
        hostname=target.host,
        port=None if sock else target.port,
        use_tls=target.implicit_tls,
        start_tls=False,
        tls_context=context,
        timeout=target.timeout,
        sock=sock,
    )
    try:
        try:
            response = await smtp.connect()
            result.banner = quote_reply(response.message, secrets)
        except aiosmtplib.SMTPConnectTimeoutError:
            raise CheckFailed(
                Reason.SMTP_CONNECTION_TIMEOUT,
                f"no connection to {where} within {target.timeout:g} s",
            ) from None
        except aiosmtplib.SMTPReadTimeoutError:
            raise CheckFailed(
                Reason.SMTP_CONNECTION_TIMEOUT,
                f"{where} accepted the connection but sent no greeting within {target.timeout:g} s",
            ) from None
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise CheckFailed(
                Reason.UNEXPECTED_RESPONSE, f"{where} greeted with {_reply(exc, secrets)}"
            ) from None
        except aiosmtplib.SMTPConnectError as exc:
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise _tls_failure(cause, where) from None
            if isinstance(cause, ssl.SSLError):
                raise CheckFailed(
                    Reason.UNEXPECTED_RESPONSE,
                    f"the TLS handshake with {where} failed ({cause.reason or cause}); is it really "
                    "an implicit-TLS port?",
                ) from None
            detail = getattr(cause, "strerror", None) or quote_reply(str(exc))
            raise CheckFailed(
                Reason.SMTP_CONNECTION_REFUSED, f"cannot connect to {where} ({detail})"
            ) from None

        await smtp.ehlo()
        if not target.implicit_tls:
            if not smtp.supports_extension("starttls"):
                raise CheckFailed(
                    Reason.STARTTLS_NOT_OFFERED,
                    f"{where} does not offer STARTTLS, and this operator never authenticates in plaintext",
                )
            try:
                await smtp.starttls(tls_context=context)
            except ssl.SSLCertVerificationError as exc:
                raise _tls_failure(exc, where) from None
            except ssl.SSLError as exc:
                raise CheckFailed(
                    Reason.UNEXPECTED_RESPONSE, f"the STARTTLS handshake with {where} failed ({exc.reason})"
                ) from None
            await smtp.ehlo()

        result.auth_methods = sorted(smtp.server_auth_methods)
        if "xoauth2" not in smtp.server_auth_methods:
            offered = ", ".join(m.upper() for m in result.auth_methods) or "none"
            raise CheckFailed(
                Reason.XOAUTH2_NOT_OFFERED,
                f"{where} does not offer AUTH XOAUTH2 after TLS (offers: {offered})",
            )
        try:
            await smtp.auth_xoauth2(username, token)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise _auth_failure(exc, where, secrets) from None

        if message is not None:
            result.sent = await _send(smtp, message, where, secrets)
        return result
    except aiosmtplib.SMTPTimeoutError:
        raise CheckFailed(
            Reason.SMTP_CONNECTION_TIMEOUT, f"{where} stopped answering within {target.timeout:g} s"
        ) from None
    except aiosmtplib.SMTPResponseException as exc:
        raise CheckFailed(Reason.UNEXPECTED_RESPONSE, f"{where} answered {_reply(exc, secrets)}") from None
    except aiosmtplib.SMTPServerDisconnected as exc:
        raise CheckFailed(
            Reason.UNEXPECTED_RESPONSE,
            f"{where} closed the connection unexpectedly ({quote_reply(str(exc), secrets)})",
        ) from None
    except aiosmtplib.SMTPException as exc:
        raise CheckFailed(Reason.UNEXPECTED_RESPONSE, f"{where}: {quote_reply(str(exc), secrets)}") from None
    finally:
        await hang_up(smtp)


async def hang_up(smtp: aiosmtplib.SMTP) -> None:
    """QUIT if the server still listens, then abort the transport.

    aiosmtplib closes a TLS transport after QUIT with close(), which starts a TLS shutdown waiting for
    the peer's close_notify; behind a proxy, or when the event loop ends right after (the ``check``
    CLI), that shutdown outlives the loop and leaks the socket. abort() releases it at once.
    """
    transport = smtp.transport
    if smtp.is_connected:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await smtp.quit(timeout=2)
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    smtp.close()


def _tls_failure(exc: ssl.SSLCertVerificationError, where: str) -> CheckFailed:
    detail = exc.verify_message or exc.reason or "certificate verify failed"
    return CheckFailed(
        Reason.TLS_VERIFICATION_FAILED,
        f"the SMTP server {where} presented a certificate that is not trusted ({detail}); "
        "add its issuing CA as spec.smtp.caBundle",
        condition=_M,
    )


def _auth_failure(
    exc: aiosmtplib.SMTPAuthenticationError, where: str, secrets: tuple[str, ...]
) -> CheckFailed:
    reply = _reply(exc, secrets)
    text = exc.message or ""
    if exc.code == 535 and "5.7.139" in text:
        scope = "the mailbox" if "Mailbox" in text else "the tenant" if "Tenant" in text else "this sender"
        return CheckFailed(
            Reason.SMTP_AUTH_DISABLED,
            f"{where} answered that SMTP AUTH is disabled for {scope}: {reply}",
        )
    if exc.code == 535:
        return CheckFailed(
            Reason.AUTHENTICATION_REJECTED,
            f"{where} rejected the token: {reply}; the app needs SMTP.SendAsApp, a service principal "
            "in Exchange and FullAccess on the mailbox",
        )
    return CheckFailed(Reason.UNEXPECTED_RESPONSE, f"{where} answered AUTH XOAUTH2 with {reply}")


async def _send(smtp: aiosmtplib.SMTP, message: Message, where: str, secrets: tuple[str, ...]) -> str:
    mail = email.message.EmailMessage()
    mail["From"] = message.sender
    mail["To"] = ", ".join(message.to)
    mail["Subject"] = message.subject
    mail["Date"] = email.utils.formatdate(usegmt=True)
    mail["Message-ID"] = email.utils.make_msgid(domain=message.sender.rsplit("@", 1)[-1])
    mail.set_content(message.body)
    try:
        _, answer = await smtp.send_message(mail)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        replies = "; ".join(_reply(r, secrets) for r in exc.recipients)
        raise CheckFailed(Reason.SEND_REJECTED, f"{where} refused the recipient: {replies}") from None
    except (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPDataError, aiosmtplib.SMTPRecipientRefused) as exc:
        raise CheckFailed(
            Reason.SEND_REJECTED, f"{where} refused the test message: {_reply(exc, secrets)}"
        ) from None
    return quote_reply(answer, secrets)


# -- the relay's upstream submission -------------------------------------------------------------------


class SubmitFailed(Exception):
    """A relayed message was not accepted upstream. ``code``/``text`` are what to tell the relay's
    client (token-free); ``auth_rejected`` marks a ``535`` to AUTH XOAUTH2 (a fresh token may help)."""

    def __init__(self, code: int, text: str, *, auth_rejected: bool = False) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text
        self.auth_rejected = auth_rejected


@dataclass(slots=True)
class Upstream:
    """An authenticated session with the server, reusable for several messages."""

    smtp: aiosmtplib.SMTP
    secrets: tuple[str, ...] = field(repr=False)
    where: str
    opened: float
    messages: int = 0

    async def close(self) -> None:
        await hang_up(self.smtp)


async def open_upstream(target: SmtpTarget, username: str, token: str, *, now: float) -> Upstream:
    """Connect, STARTTLS (or implicit TLS) and AUTH XOAUTH2; raises :class:`SubmitFailed`.

    Connection and TLS failures are temporary (``451 4.4.x``/``4.7.0``); a ``535`` to AUTH is
    ``auth_rejected`` (a fresh token may help).
    """
    auth_blob = base64.b64encode(f"user={username}\x01auth=Bearer {token}\x01\x01".encode()).decode()
    secrets = (token, auth_blob, *proxy_secrets(target.proxy_url))
    where = target.describe()
    context = tls_context(target.ca_pem)
    sock = None
    if target.proxy_url:
        try:
            sock = await _tunnel(target)
        except CheckFailed as exc:
            raise SubmitFailed(451, f"4.4.1 {exc.message}") from None
    smtp = aiosmtplib.SMTP(
        hostname=target.host,
        port=None if sock else target.port,
        use_tls=target.implicit_tls,
        start_tls=False,
        tls_context=context,
        timeout=target.timeout,
        sock=sock,
    )
    try:
        try:
            await smtp.connect()
            await smtp.ehlo()
            if not target.implicit_tls:
                if not smtp.supports_extension("starttls"):
                    raise SubmitFailed(451, f"4.7.0 {where} does not offer STARTTLS")
                await smtp.starttls(tls_context=context)
                await smtp.ehlo()
        except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            detail = quote_reply(str(exc), secrets)[:200] or type(exc).__name__
            raise SubmitFailed(451, f"4.4.1 Cannot reach Exchange Online at {where} ({detail})") from None
        try:
            await smtp.auth_xoauth2(username, token)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise SubmitFailed(
                451,
                f"4.7.0 Exchange Online refused the relay's token: {_reply(exc, secrets)}",
                auth_rejected=exc.code == 535,
            ) from None
    except SubmitFailed:
        await hang_up(smtp)
        raise
    except BaseException as exc:
        await hang_up(smtp)
        if isinstance(exc, Exception):
            raise _submit_failure(exc, secrets, where) from None
        raise
    return Upstream(smtp=smtp, secrets=secrets, where=where, opened=now)


class StaleSession(SubmitFailed):
    """A reused session was gone before anything of the message was sent: safe to retry at once."""


async def send_on(
    upstream: Upstream, *, sender: str, recipients: tuple[str, ...], data: bytes
) -> tuple[int, str]:
    """MAIL, RCPT, DATA on an open session; returns the server's (code, text) for DATA.

    All or nothing: a refused recipient refuses the whole message (``SubmitFailed`` with that reply,
    temporary if any refusal is) after an RSET, so the relay never reports a message as accepted when
    part of it was dropped. Raises :class:`StaleSession` when the session died before MAIL was
    answered (nothing of the message reached the server)."""
    smtp, secrets = upstream.smtp, upstream.secrets
    upstream.messages += 1
    try:
        try:
            await smtp.mail(sender)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            raise StaleSession(451, f"4.4.2 {quote_reply(str(exc), secrets)[:120]}") from None
        refused: list[tuple[int, str]] = []
        for rcpt in recipients:
            try:
                await smtp.rcpt(rcpt)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused.append((exc.code, quote_reply(exc.message, secrets)))
        if refused:
            with contextlib.suppress(aiosmtplib.SMTPException):
                await smtp.rset()
            temporary = [r for r in refused if 400 <= r[0] < 500]
            code, text = (temporary or refused)[0]
            raise SubmitFailed(code, text)
        answer = await smtp.data(data)
        return answer.code, quote_reply(answer.message, secrets)
    except SubmitFailed:
        raise
    except Exception as exc:
        if isinstance(exc, aiosmtplib.SMTPResponseException) and 400 <= exc.code < 600:
            # A refused MAIL or DATA: the session itself stays usable after RSET.
            with contextlib.suppress(aiosmtplib.SMTPException):
                await smtp.rset()
        raise _submit_failure(exc, secrets, upstream.where) from None


def _submit_failure(exc: Exception, secrets: tuple[str, ...], where: str) -> SubmitFailed:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        code = exc.code if 400 <= exc.code < 600 else 451
        return SubmitFailed(code, quote_reply(exc.message, secrets) or "4.3.0 no reply text")
    if isinstance(exc, (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError)):
        detail = quote_reply(str(exc), secrets)[:200] or type(exc).__name__
        if isinstance(exc, ssl.SSLError):
            return SubmitFailed(451, f"4.7.0 TLS with {where} failed ({exc.reason or 'handshake'})")
        return SubmitFailed(451, f"4.4.2 Exchange Online dropped the session at {where} ({detail})")
    return SubmitFailed(451, f"4.3.0 {quote_reply(str(exc), secrets)[:200] or type(exc).__name__}")
