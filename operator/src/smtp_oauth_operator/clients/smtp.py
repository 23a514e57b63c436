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

__all__ = ["Message", "SmtpResult", "SmtpTarget", "authenticate", "tls_context"]

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
        await _hang_up(smtp)


async def _hang_up(smtp: aiosmtplib.SMTP) -> None:
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
