"""Misbehaving network peers for the classic failures, plus an HTTP CONNECT proxy.

Why: the operator's value is telling *which* thing is broken — a port nobody listens on, a host
that accepts and then says nothing, something that is not an SMTP server at all, or a corporate
proxy in the path. Those conditions are cheap to reproduce for real on the loopback interface,
so the tests never need to fake a socket error. Every peer binds to 127.0.0.1, runs in daemon
threads, holds connections for a bounded time (``hold``), stops itself after ``lifetime`` seconds
even if a test forgets to, and releases everything on :meth:`stop` (or leaving the ``with`` block).
"""

from __future__ import annotations

import base64
import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from types import TracebackType
from typing import Self

__all__ = [
    "GarbageSmtpServer",
    "HttpConnectProxy",
    "SilentServer",
    "closed_port",
]

_LOOPBACK = "127.0.0.1"


def closed_port(host: str = _LOOPBACK) -> int:
    """A port on ``host`` with nothing listening: connecting to it is refused.

    The port was free an instant ago (the kernel handed it out and we released it); nothing else
    in the test process binds ports without asking for port 0, so it stays closed in practice.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class _TcpServer:
    """Accept loop in a daemon thread, one daemon thread per connection, bounded lifetimes."""

    name = "peer"

    def __init__(self, *, port: int = 0, hold: float = 120.0, lifetime: float | None = 900.0) -> None:
        self.host = _LOOPBACK
        self._requested_port = port
        self.hold = hold
        self.lifetime = lifetime
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        self._connections = 0

    def start(self) -> Self:
        if self._listener is not None:
            return self
        self._stopping.clear()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((self.host, self._requested_port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"{self.name}:{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection; wait (briefly) for the threads."""
        self._stopping.set()
        accept_thread = self._accept_thread
        if accept_thread is not None and accept_thread is not threading.current_thread():
            accept_thread.join(timeout=5)
        with self._lock:
            sockets = list(self._sockets)
            threads = list(self._threads)
        for sock in sockets:  # wakes the connection threads; they close their own sockets
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)
        with self._lock:
            leftovers = list(self._sockets)
        for sock in leftovers:
            with contextlib.suppress(OSError):
                sock.close()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        self._accept_thread = None

    def __enter__(self) -> Self:
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
        if self._listener is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return int(self._listener.getsockname()[1])

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._connections

    def _accept_loop(self) -> None:
        assert self._listener is not None
        deadline = None if self.lifetime is None else time.monotonic() + self.lifetime
        try:
            while not self._stopping.is_set():
                if deadline is not None and time.monotonic() > deadline:
                    break
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    break
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                thread = threading.Thread(
                    target=self._connection, args=(conn,), name=f"{self.name}-conn", daemon=True
                )
                with self._lock:
                    self._connections += 1
                    self._sockets.add(conn)
                    self._threads.add(thread)
                thread.start()
        finally:
            with contextlib.suppress(OSError):
                self._listener.close()
            if not self._stopping.is_set():  # lifetime ran out: end open connections too
                threading.Thread(target=self.stop, daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        try:
            self.serve(conn)
        except (OSError, ValueError):  # peer reset, or the socket was closed under us by stop()
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._sockets.discard(conn)
                self._threads.discard(threading.current_thread())

    def track(self, sock: socket.socket) -> None:
        """Register an extra socket (e.g. a proxy's upstream) to be closed on :meth:`stop`."""
        with self._lock:
            self._sockets.add(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def serve(self, conn: socket.socket) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _wait_readable(self, conn: socket.socket, deadline: float) -> bool:
        """Wait until ``conn`` is readable, the deadline passes or the server stops."""
        with selectors.DefaultSelector() as selector:
            selector.register(conn, selectors.EVENT_READ)
            while not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if selector.select(min(remaining, 0.1)):
                    return True
        return False


class SilentServer(_TcpServer):
    """Accepts TCP connections and never sends a byte (not even a TLS handshake reply).

    Point an SMTP client at it for a greeting timeout, or an HTTPS client for a read timeout.
    Whatever the client sends is read and discarded; a connection is held for ``hold`` seconds.
    """

    name = "silent-server"

    def __init__(self, *, port: int = 0, hold: float = 120.0, lifetime: float | None = 900.0) -> None:
        super().__init__(port=port, hold=hold, lifetime=lifetime)
        self._received = 0

    @property
    def bytes_received(self) -> int:
        with self._lock:
            return self._received

    def serve(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.hold
        while self._wait_readable(conn, deadline):
            chunk = conn.recv(65536)
            if not chunk:
                return
            with self._lock:
                self._received += len(chunk)


class GarbageSmtpServer(_TcpServer):
    """Something on the SMTP port that is not (quite) an SMTP server.

    By default it greets properly (``220 … ESMTP``) and answers the first command (EHLO) with a
    line that is not an SMTP reply (``HTTP/1.1 400 Bad Request``), then closes. ``replies`` is a
    script of raw replies sent verbatim, one per received line (``bytes`` as is; ``str`` gets CRLF
    appended); the connection closes when the script runs out. ``greet_with_garbage=True`` sends a
    non-SMTP banner (an SSH identification string) instead of the 220 greeting; ``greeting=None``
    sends no greeting at all. Received lines are kept in :attr:`received`.
    """

    name = "garbage-smtp"
    SMTP_GREETING = b"220 mail.example.test ESMTP ready\r\n"
    GARBAGE_GREETING = b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13.5\r\n"
    GARBAGE_REPLY = b"HTTP/1.1 400 Bad Request\r\n"

    def __init__(
        self,
        replies: Sequence[bytes | str] | None = None,
        *,
        greeting: bytes | str | None = SMTP_GREETING,
        greet_with_garbage: bool = False,
        port: int = 0,
        hold: float = 60.0,
        lifetime: float | None = 900.0,
    ) -> None:
        super().__init__(port=port, hold=hold, lifetime=lifetime)
        self.greeting = _raw(self.GARBAGE_GREETING if greet_with_garbage else greeting)
        self.replies = [_raw(r) or b"" for r in (replies if replies is not None else [self.GARBAGE_REPLY])]
        self._received: list[bytes] = []

    @property
    def received(self) -> list[bytes]:
        """Every line clients sent (without CRLF), across connections."""
        with self._lock:
            return list(self._received)

    def serve(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.hold
        if self.greeting:
            conn.sendall(self.greeting)
        buffer = b""
        script = list(self.replies)
        while script:
            while b"\n" not in buffer:
                if len(buffer) > 65536 or not self._wait_readable(conn, deadline):
                    return
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            line, _, buffer = buffer.partition(b"\n")
            with self._lock:
                self._received.append(line.rstrip(b"\r"))
            conn.sendall(script.pop(0))


def _raw(value: bytes | str | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return (value if value.endswith("\r\n") else value + "\r\n").encode("utf-8")


class HttpConnectProxy(_TcpServer):
    """An HTTP ``CONNECT`` tunnelling proxy on loopback (what ``spec.proxy.url`` points at).

    requests tunnels ``https://`` through CONNECT, and an SMTP client can open its socket through
    it too. Counts established :attr:`tunnels` and records every requested target
    (``host:port``) in :attr:`targets`. Options: ``credentials=(user, password)`` demands
    ``Proxy-Authorization: Basic`` (407 otherwise); ``reject_status=403`` (or 502, …) refuses
    every CONNECT; targets outside ``allowed_hosts`` (loopback by default) get 403; an upstream
    that refuses the connection gets 502. Anything but CONNECT gets 405. ``coalesce=True`` waits for
    the upstream's first bytes (an SMTP greeting) and sends them in the same segment as the ``200``,
    as a busy proxy may: a client that reads past the reply loses them. :attr:`authorizations`
    records every ``Proxy-Authorization`` value received (None when absent).
    """

    name = "connect-proxy"

    def __init__(
        self,
        *,
        credentials: tuple[str, str] | None = None,
        reject_status: int | None = None,
        allowed_hosts: Sequence[str] = ("127.0.0.1", "localhost", "::1"),
        port: int = 0,
        hold: float = 300.0,
        lifetime: float | None = 900.0,
        connect_timeout: float = 10.0,
        coalesce: bool = False,
    ) -> None:
        super().__init__(port=port, hold=hold, lifetime=lifetime)
        self.credentials = credentials
        self.coalesce = coalesce
        self._authorizations: list[str | None] = []
        self.reject_status = reject_status
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.connect_timeout = connect_timeout
        self._targets: list[str] = []
        self._tunnels = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no credentials)."""
        return f"http://{self.host}:{self.port}"

    @property
    def url_with_credentials(self) -> str:
        if self.credentials is None:
            return self.url
        user, password = self.credentials
        return f"http://{user}:{password}@{self.host}:{self.port}"

    @property
    def targets(self) -> list[str]:
        """Every CONNECT target requested (``host:port``), accepted or not."""
        with self._lock:
            return list(self._targets)

    @property
    def authorizations(self) -> list[str | None]:
        """The Proxy-Authorization header of every CONNECT, in order (None when absent)."""
        with self._lock:
            return list(self._authorizations)

    @property
    def tunnels(self) -> int:
        """Tunnels established (CONNECT answered 200 and upstream connected)."""
        with self._lock:
            return self._tunnels

    def _reply(
        self, conn: socket.socket, status: int, headers: dict[str, str] | None = None, tail: bytes = b""
    ) -> None:
        reason = "Connection established" if status == 200 else HTTPStatus(status).phrase
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if status != 200:
            lines += ["Content-Length: 0", "Connection: close"]
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + tail)

    def serve(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.connect_timeout
        head = b""
        while b"\r\n\r\n" not in head:
            if len(head) > 16384 or not self._wait_readable(conn, deadline):
                return
            chunk = conn.recv(16384)
            if not chunk:
                return
            head += chunk
        head, _, early = head.partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split()
        if len(parts) != 3:
            self._reply(conn, 400)
            return
        method, target, _version = parts
        if method.upper() != "CONNECT":
            self._reply(conn, 405, {"Allow": "CONNECT"})
            return
        with self._lock:
            self._targets.append(target)
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        with self._lock:
            self._authorizations.append(headers.get("proxy-authorization"))
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            if headers.get("proxy-authorization") != expected:
                self._reply(conn, 407, {"Proxy-Authenticate": 'Basic realm="fake-proxy"'})
                return
        if self.reject_status is not None:
            self._reply(conn, self.reject_status)
            return
        host, sep, port_text = target.rpartition(":")
        host = host.strip("[]")
        if not sep or not port_text.isdigit():
            self._reply(conn, 400)
            return
        if host.lower() not in self.allowed_hosts:
            self._reply(conn, 403)
            return
        try:
            upstream = socket.create_connection((host, int(port_text)), timeout=self.connect_timeout)
        except OSError:
            self._reply(conn, 502)
            return
        self.track(upstream)
        try:
            upstream.settimeout(None)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            first = b""
            # A server that speaks first (SMTP) does so at once; a TLS server waits for the client.
            if self.coalesce and self._wait_readable(upstream, time.monotonic() + 0.5):
                first = upstream.recv(65536)
            self._reply(conn, 200, tail=first)
            with self._lock:
                self._tunnels += 1
            if early:
                upstream.sendall(early)
            self._pump(conn, upstream)
        finally:
            self.untrack(upstream)
            with contextlib.suppress(OSError):
                upstream.close()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        deadline = time.monotonic() + self.hold
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ)
            selector.register(upstream, selectors.EVENT_READ)
            while not self._stopping.is_set() and time.monotonic() < deadline:
                for key, _ in selector.select(0.1):
                    source = key.fileobj
                    assert isinstance(source, socket.socket)
                    data = source.recv(65536)
                    if not data:
                        return
                    peers[source].sendall(data)
