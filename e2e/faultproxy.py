"""A fault-injecting HTTPS proxy between the operator and the kube-apiserver.

Why: the operator's promises (no lost change, no repeated alarm, no ghost) are about what it does when
the API server misbehaves, and a real API server misbehaves only when it is made to. This proxy sits
where the API server would be: the operator gets a kubeconfig pointing at it (HTTPS with the proxy's
own CA, a ServiceAccount's bearer token that the proxy passes on), so both of its clients — the
``kubernetes`` client and kopf's aiohttp — run their real code paths, TLS included. Everything is
forwarded to the real kube-apiserver unless a rule says otherwise.

Rules match on the Kubernetes verb (``GET LIST WATCH CREATE UPDATE PATCH DELETE``), resource,
subresource, namespace and name, as the API server's own request-info parser sees them, and do one of:

- ``status``: answer with an HTTP error and a ``Status`` body (500, 503, 409, 403, 429, …);
- ``gone``: what the API server says to a stale ``resourceVersion``: HTTP 410 ``Expired`` on a list,
  an ``ERROR`` event with code 410 on a watch (HTTP 200, then the event, then the end of the stream);
- ``stall``: accept the request and answer nothing (a black hole) until the rule is removed, then
  reset the connection;
- ``reset``: reset the TCP connection (RST) without an answer;
- ``drop-events`` (watches): keep the stream open but forward no event, as a partitioned watch.

:meth:`FaultProxy.end_watches` ends the watches open now (with a 410 ``ERROR`` event, a reset or a
clean end of stream). Counters say what was seen and what was injected. The server runs on its own
event loop in a daemon thread, so a test drives it from ordinary synchronous code::

    with FaultProxy(cp.server, cp.ca_file, workdir) as proxy:
        proxy.write_kubeconfig(path, token)
        rule = proxy.inject("PATCH", "smtpoauthconfigs", subresource="status", action="status", code=500)
        ...
        rule.remove()
        print(rule.injected, proxy.seen("PATCH", "smtpoauthconfigs", "status"))
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web

from smtp_oauth_operator.testing.pki import CertificateAuthority

__all__ = ["Action", "FaultProxy", "RequestInfo", "Rule", "request_info"]

Action = Literal["status", "gone", "stall", "reset", "drop-events"]
ACTIONS: frozenset[str] = frozenset({"status", "gone", "stall", "reset", "drop-events"})
ANY = "*"
_DROP = frozenset({"drop-events"})
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# The API server's own list (k8s.io/apiserver/pkg/endpoints/request/requestinfo.go): these words after
# namespaces/NAME are subresources of the namespace, not resources in it.
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
_REASONS = {
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


# ------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class RequestInfo:
    """What a request is, in the API server's terms (``verb`` is ``LIST``/``WATCH`` for collections)."""

    verb: str
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    resource_version: str = ""

    @property
    def is_resource(self) -> bool:
        return bool(self.resource)


def request_info(method: str, path: str, query: Mapping[str, list[str]]) -> RequestInfo:
    """Classify a request the way kube-apiserver's RequestInfoFactory does (enough of it for rules)."""
    parts = [p for p in path.split("/") if p]
    rv = (query.get("resourceVersion") or [""])[0]
    watch = (query.get("watch") or [""])[0].lower() in {"true", "1"}
    if not parts or parts[0] not in {"api", "apis"}:
        return RequestInfo(verb=method.upper())
    # /api/v1/... or /apis/GROUP/VERSION/...
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    if rest and rest[0] == "watch":  # the old /watch/ path prefix
        watch = True
        rest = rest[1:]
    namespace = ""
    if len(rest) >= 2 and rest[0] == "namespaces":
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
        else:  # the namespace object itself (or its status/finalize)
            namespace = ""
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    if resource == "namespaces" and name:
        namespace = name
    method = method.upper()
    verbs = {"POST": "CREATE", "PUT": "UPDATE", "PATCH": "PATCH", "DELETE": "DELETE"}
    verb = ("WATCH" if watch else "GET" if name else "LIST") if method == "GET" else verbs.get(method, method)
    return RequestInfo(verb, resource, subresource, namespace, name, rv)


def _status_body(code: int, message: str) -> bytes:
    try:
        reason = _REASONS.get(code) or HTTPStatus(code).phrase.replace(" ", "")
    except ValueError:
        reason = ""
    return json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
    ).encode()


def _gone_event(rv: str) -> bytes:
    status = json.loads(
        _status_body(410, f"too old resource version: {rv or 0} (injected by the fault proxy)")
    )
    return json.dumps({"type": "ERROR", "object": status}).encode() + b"\n"


# ------------------------------------------------------------------------------------------ rules


@dataclass(eq=False)
class Rule:
    """One fault; ``injected`` counts the requests (or watch events, for ``drop-events``) it hit."""

    verb: str
    resource: str
    subresource: str | None  # None: the resource itself only; "*": any
    namespace: str | None
    name: str | None
    action: Action
    code: int
    times: int | None
    stale_only: bool
    proxy: FaultProxy = field(repr=False)
    injected: int = 0
    active: bool = True
    _released: asyncio.Event | None = field(default=None, repr=False)

    def matches(self, info: RequestInfo) -> bool:
        if not self.active or (self.times is not None and self.injected >= self.times):
            return False
        if self.verb != ANY and info.verb not in self.verb.split("|"):
            return False
        if self.resource != ANY and info.resource != self.resource:
            return False
        if self.subresource is None:
            if info.subresource:
                return False
        elif self.subresource != ANY and info.subresource != self.subresource:
            return False
        if self.namespace is not None and info.namespace != self.namespace:
            return False
        if self.name is not None and info.name != self.name:
            return False
        return not (self.stale_only and info.resource_version in {"", "0"})

    def remove(self) -> None:
        """Lift the fault; requests it stalls are released (their connections reset)."""
        self.proxy.remove(self)

    def __enter__(self) -> Rule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass(eq=False)
class _Watch:
    info: RequestInfo
    ended: asyncio.Event
    how: str = ""


# ------------------------------------------------------------------------------------------ the proxy


class FaultProxy:
    """HTTPS on 127.0.0.1 in front of ``upstream`` (the kube-apiserver URL, verified with ``ca_file``)."""

    def __init__(self, upstream: str, ca_file: str | Path, workdir: str | Path, *, port: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self._upstream_ca = str(ca_file)
        self._workdir = Path(workdir)
        self._requested_port = port
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._watches: set[_Watch] = set()
        self._transports: set[asyncio.BaseTransport] = set()  # client connections, closed on stop
        self._seen: Counter[tuple[str, str, str]] = Counter()
        self._answered: Counter[tuple[str, str, str, int]] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port = 0
        self.ca: CertificateAuthority | None = None
        self.kubeconfig: Path | None = None  # the last one written

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> FaultProxy:
        if self._loop is not None:
            return self
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority.create("smtp-oauth-operator fault proxy CA", directory=self._workdir)
        cert = self.ca.issue("127.0.0.1", "localhost")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._astart(cert.server_context()), loop).result(timeout=30)
        return self

    async def _astart(self, server_ssl: ssl.SSLContext) -> None:
        client_ssl = ssl.create_default_context(cafile=self._upstream_ca)
        # No keep-alive upstream: a connection pooled across an API-server restart would turn into an
        # error the real network would not produce.
        connector = aiohttp.TCPConnector(ssl=client_ssl, force_close=True, limit=0)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None)
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._requested_port, ssl_context=server_ssl)
        await site.start()
        sockets = site._server.sockets if site._server is not None else ()  # type: ignore[union-attr]
        self._port = int(sockets[0].getsockname()[1])

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        with self._lock:
            rules = list(self._rules)
            self._rules.clear()
        for rule in rules:
            self._release(rule)
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._astop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()
        self._loop = None

    async def _astop(self) -> None:
        for watch in list(self._watches):
            watch.how = "reset"
            watch.ended.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        for transport in list(self._transports):
            transport.abort()
        await asyncio.sleep(0.2)  # let the aborts and closes run before the loop goes

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- where it is
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._port}"

    def write_kubeconfig(self, path: str | Path, token: str, namespace: str | None = None) -> Path:
        """A kubeconfig for a bearer token that points at the proxy (trusting the proxy's CA)."""
        assert self.ca is not None, "not started"
        context: dict[str, str] = {"cluster": "faultproxy", "user": "faultproxy-user"}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "faultproxy",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca.cert_pem.encode()).decode(),
                    },
                }
            ],
            "users": [{"name": "faultproxy-user", "user": {"token": token}}],
            "contexts": [{"name": "faultproxy", "context": context}],
            "current-context": "faultproxy",
        }
        target = Path(path)
        target.write_text(json.dumps(config, indent=2) + "\n")
        target.chmod(0o600)
        self.kubeconfig = target
        return target

    # ---------------------------------------------------------------- control (from any thread)
    def inject(
        self,
        verb: str = ANY,
        resource: str = ANY,
        *,
        subresource: str | None = ANY,
        namespace: str | None = None,
        name: str | None = None,
        action: Action = "status",
        code: int = 500,
        times: int | None = None,
        stale_only: bool | None = None,
    ) -> Rule:
        """Add a fault; ``verb`` may list several (``"PATCH|UPDATE"``). ``gone`` applies only to
        requests that carry a ``resourceVersion`` (as the API server's) unless ``stale_only=False``."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        rule = Rule(
            verb=verb.upper(),
            resource=resource,
            subresource=subresource,
            namespace=namespace,
            name=name,
            action=action,
            code=410 if action == "gone" else code,
            times=times,
            stale_only=(action == "gone") if stale_only is None else stale_only,
            proxy=self,
        )
        if action == "stall":
            assert self._loop is not None, "not started"
            rule._released = self._call(asyncio.Event)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            rule.active = False
            if rule in self._rules:
                self._rules.remove(rule)
        self._release(rule)

    def clear(self) -> None:
        with self._lock:
            rules = list(self._rules)
        for rule in rules:
            self.remove(rule)

    def end_watches(
        self,
        resource: str = ANY,
        *,
        how: Literal["gone", "reset", "close"] = "gone",
        namespace: str | None = None,
    ) -> int:
        """End the watches open now on ``resource``: with a 410 ``ERROR`` event (the client must re-list),
        a connection reset, or a clean end of the stream. Returns how many were ended."""

        def end() -> int:
            ended = 0
            for watch in list(self._watches):
                if resource not in (ANY, watch.info.resource):
                    continue
                if namespace is not None and watch.info.namespace != namespace:
                    continue
                if not watch.ended.is_set():
                    watch.how = how
                    watch.ended.set()
                    ended += 1
            return ended

        return int(self._call(end))

    def open_watches(self, resource: str = ANY) -> int:
        return int(
            self._call(
                lambda: sum(
                    1 for w in self._watches if resource in (ANY, w.info.resource) and not w.ended.is_set()
                )
            )
        )

    def seen(self, verb: str = ANY, resource: str = ANY, subresource: str | None = ANY) -> int:
        """Requests received that match (``subresource=None``: the resource itself only)."""
        with self._lock:
            return sum(
                n
                for (v, r, s), n in self._seen.items()
                if verb in (ANY, v)
                and resource in (ANY, r)
                and (subresource == ANY or (subresource or "") == s)
            )

    def answered(self, code: int) -> int:
        """Responses with this HTTP status forwarded or injected."""
        with self._lock:
            return sum(n for (_, _, _, c), n in self._answered.items() if c == code)

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"fault proxy: condition not met in {timeout:.0f}s")
            time.sleep(0.1)

    # ---------------------------------------------------------------- internals
    def _call(self, fn: Any) -> Any:
        """Run ``fn`` on the proxy's loop and return its result."""
        assert self._loop is not None, "not started"

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    def _release(self, rule: Rule) -> None:
        event = rule._released
        if event is not None and self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(event.set)

    def _match(self, info: RequestInfo, actions: frozenset[str] = ACTIONS) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.action in actions and rule.matches(info):
                    rule.injected += 1
                    return rule
        return None

    def _count(self, info: RequestInfo, code: int) -> None:
        with self._lock:
            self._answered[(info.verb, info.resource, info.subresource, code)] += 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        info = request_info(request.method, request.path, parse_qs(request.query_string))
        if request.transport is not None:
            self._transports.add(request.transport)
            self._transports = {t for t in self._transports if not t.is_closing()}
        with self._lock:
            self._seen[(info.verb, info.resource, info.subresource)] += 1
        rule = self._match(info, ACTIONS - _DROP)
        if rule is not None:
            if rule.action == "status":
                self._count(info, rule.code)
                return web.Response(
                    status=rule.code,
                    body=_status_body(rule.code, f"injected by the fault proxy: HTTP {rule.code}"),
                    content_type="application/json",
                )
            if rule.action == "gone":
                self._count(info, 410 if info.verb != "WATCH" else 200)
                if info.verb == "WATCH":
                    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
                    await response.prepare(request)
                    await response.write(_gone_event(info.resource_version))
                    await response.write_eof()
                    return response
                return web.Response(
                    status=410,
                    body=_status_body(410, "The provided resourceVersion is too old (injected)"),
                    content_type="application/json",
                )
            if rule.action == "stall":
                assert rule._released is not None
                await rule._released.wait()
            self._count(info, 0)
            return self._reset(request)
        return await self._forward(request, info)

    @staticmethod
    def _reset(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        # aiohttp finds the transport closed and writes nothing.
        return web.Response(status=500)

    async def _forward(self, request: web.Request, info: RequestInfo) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        if info.verb == "WATCH":
            headers.pop("Accept-Encoding", None)  # the proxy reads the stream line by line
        body = await request.read() if request.can_read_body else None
        if body is not None and "Content-Type" not in request.headers:
            # The kubernetes client sends JSON without saying so, which the API server accepts;
            # aiohttp would label it application/octet-stream, which the API server refuses.
            headers["Content-Type"] = "application/json"
        url = f"{self.upstream}{request.path_qs}"
        try:
            upstream = await self._session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            )
        except (aiohttp.ClientError, OSError):
            # The API server is down (restarting): the client sees what it would see without us.
            self._count(info, 0)
            return self._reset(request)
        async with upstream:
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
            self._count(info, upstream.status)
            if info.verb != "WATCH" or upstream.status != 200:
                try:
                    data = await upstream.read()
                except (aiohttp.ClientError, OSError):
                    return self._reset(request)
                return web.Response(status=upstream.status, body=data, headers=out_headers)
            return await self._stream(request, info, upstream, out_headers)

    async def _stream(
        self,
        request: web.Request,
        info: RequestInfo,
        upstream: aiohttp.ClientResponse,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        headers.pop("Content-Encoding", None)
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(request)
        watch = _Watch(info, asyncio.Event())
        self._watches.add(watch)
        ended = asyncio.create_task(watch.ended.wait())
        last_rv = info.resource_version
        try:
            while True:
                line_task = asyncio.create_task(upstream.content.readline())
                done, _ = await asyncio.wait({line_task, ended}, return_when=asyncio.FIRST_COMPLETED)
                if ended in done:
                    line_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await line_task
                    if watch.how == "reset":
                        return self._reset(request)
                    if watch.how == "gone":
                        await response.write(_gone_event(last_rv))
                    break
                try:
                    line = line_task.result()
                except (aiohttp.ClientError, OSError):
                    return self._reset(request)  # the API server went away mid-stream
                if not line:
                    break
                with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                    last_rv = json.loads(line)["object"]["metadata"]["resourceVersion"] or last_rv
                if self._match(info, _DROP) is not None:
                    continue
                await response.write(line)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the client went away
        finally:
            ended.cancel()
            self._watches.discard(watch)
        return response
