"""Informers of our own: list, then watch from the list's resourceVersion, for one kind of object.

kopf watches what its handlers name with full objects and does not tell a handler when a re-list is
complete, so a resource deleted while a watch was down stayed in memory for ever, and every Secret in
scope arrived with its data. An :class:`Informer` here:

- lists in pages (``limit``), then hands the complete list to ``on_resync`` as ONE call, so the
  consumer can drop whatever the list did not return (410 Gone, an API-server restart, a resume);
- then watches from the list's resourceVersion with bookmarks, calling ``on_event`` per change, and
  re-opens the watch from the latest resourceVersion when the server ends it (``timeoutSeconds``);
- re-lists after 410 Gone or any failure of the watch (connection lost, 5xx, an unreadable line),
  after a backoff of 1, 2, 4 … 60 s for failures (410 re-lists at once);
- for ``metadata_only`` kinds asks for ``PartialObjectMetadata`` (the API server leaves out ``data``)
  and keeps only namespace, name, uid and resourceVersion of each object, so memory does not depend on
  the size, labels or annotations of objects nobody references.

The connection settings are the ``kubernetes`` client's (in-cluster or kubeconfig, see kube.py);
the HTTP client is aiohttp (kopf's), so a watch is a coroutine that a pause simply cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kubernetes

__all__ = [
    "CONFIGMAPS",
    "SECRETS",
    "ApiConnection",
    "Gone",
    "Informer",
    "Kind",
    "WatchFailed",
]

logger = logging.getLogger(__name__)

JSON = "application/json"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
MAX_BACKOFF = 60.0


@dataclass(frozen=True, slots=True)
class Kind:
    """A namespaced resource as the API serves it, and how much of each object we want."""

    name: str  # "Secret", "SmtpOAuthConfig": for logs and for the consumer
    group: str  # "" for the core group
    version: str
    plural: str
    metadata_only: bool = False

    def path(self, namespace: str | None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{base}/namespaces/{namespace}/{self.plural}" if namespace else f"{base}/{self.plural}"


SECRETS = Kind("Secret", "", "v1", "secrets", metadata_only=True)
CONFIGMAPS = Kind("ConfigMap", "", "v1", "configmaps", metadata_only=True)


class WatchFailed(Exception):
    """A list or watch failed (HTTP error, connection lost, an unreadable answer): re-list later."""


class Gone(WatchFailed):
    """410 Gone: the resourceVersion is too old (compacted, or a new API server); re-list now."""


class ApiConnection:
    """aiohttp with the ``kubernetes`` client's configuration: server, TLS, credentials, proxy."""

    def __init__(self, configuration: kubernetes.client.Configuration) -> None:
        self.configuration = configuration
        self.host = str(configuration.host).rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        cfg = self.configuration
        if not self.host.startswith("https"):
            return False
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
        if not cfg.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file or None)
        return context

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=0)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
            # aiohttp returns before the TLS transports have closed (aiohttp#1925); let them.
            await asyncio.sleep(0.25)

    async def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": "smtp-oauth-operator"}
        # What the kubernetes client itself sends (a bearer token); its refresh hook re-reads a rotated
        # in-cluster token or runs a kubeconfig's exec plugin: file and process I/O, off the loop.
        settings = await asyncio.to_thread(self.configuration.auth_settings)
        for auth in dict[str, Any](settings).values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[str(auth["key"])] = str(auth["value"])
        return headers

    def _request_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.configuration.proxy:
            args["proxy"] = self.configuration.proxy
        if getattr(self.configuration, "tls_server_name", None):
            args["server_hostname"] = self.configuration.tls_server_name
        return args

    async def get(self, path: str, params: Mapping[str, str], accept: str, timeout: float) -> Any:  # noqa: ASYNC109 - per request, passed to aiohttp
        try:
            async with self.session().get(
                self.host + path,
                params=dict(params),
                headers=await self._headers(accept),
                timeout=aiohttp.ClientTimeout(total=timeout),
                **self._request_args(),
            ) as response:
                if response.status != 200:
                    raise _http_error(f"GET {path}", response.status, await response.read())
                return await response.json(loads=json.loads, content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise WatchFailed(f"GET {path}: {type(exc).__name__}") from None

    async def stream(
        self,
        path: str,
        params: Mapping[str, str],
        accept: str,
        timeout: float,  # noqa: ASYNC109
    ) -> AsyncIterator[Any]:
        """The JSON lines of a watch, parsed, until the server ends the stream."""
        try:
            async with self.session().get(
                self.host + path,
                params=dict(params),
                headers=await self._headers(accept),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout),
                **self._request_args(),
            ) as response:
                if response.status != 200:
                    raise _http_error(f"watch {path}", response.status, await response.read())
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield json.loads(line)
                if buffer.strip():
                    yield json.loads(buffer)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise WatchFailed(f"watch {path}: {type(exc).__name__}") from None


def _http_error(what: str, status: int, body: bytes) -> WatchFailed:
    # The API server's Status message names the forbidden call and the user, as kubectl shows it; it
    # carries no object data.
    reason = message = ""
    with contextlib.suppress(ValueError, AttributeError):
        answer = json.loads(body)
        reason, message = str(answer.get("reason") or ""), str(answer.get("message") or "")[:300]
    text = f"{what}: HTTP {status}" + (f" {reason}" if reason else "") + (f": {message}" if message else "")
    return Gone(text) if status == 410 else WatchFailed(text)


def _slim(obj: Mapping[str, Any], metadata_only: bool) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    if metadata_only:
        keep = ("namespace", "name", "uid", "resourceVersion")
        return {"metadata": {k: meta[k] for k in keep if k in meta}}
    if "managedFields" in meta:
        # Nothing reads them; they are half of a parsed SmtpOAuthConfig.
        return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    return dict(obj)


OnResync = Callable[[list[dict[str, Any]]], None]
OnEvent = Callable[[str, dict[str, Any]], None]


class Informer:
    """List + watch of one kind in one namespace (``None``: cluster-wide).

    ``on_resync(objects)`` gets the complete list after each (re)list; ``on_event(type, object)`` each
    ADDED, MODIFIED or DELETED after it. Both are called on the event loop. :meth:`run` runs until
    cancelled. One informer per namespace (``-n a -n b``), so that a namespace the operator may not
    read (a missing Role) stops only its own informers.
    """

    def __init__(
        self,
        api: ApiConnection,
        kind: Kind,
        namespace: str | None,
        *,
        on_resync: OnResync,
        on_event: OnEvent,
        page_size: int = 250,
        watch_timeout: int = 300,
    ) -> None:
        self.api = api
        self.kind = kind
        self.namespace = namespace
        self.on_resync = on_resync
        self.on_event = on_event
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.lists = 0  # complete (re)lists so far: for tests and logs

    @property
    def where(self) -> str:
        return "cluster-wide" if self.namespace is None else f"in {self.namespace}"

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                version = await self._list()
                failures = 0
                await self._watch(self.namespace, version)
            except Gone as exc:
                logger.info("%s: %s; listing again", self.kind.name, exc)
            except WatchFailed as exc:
                failures += 1
                delay = min(2.0 ** (failures - 1), MAX_BACKOFF)
                logger.warning(
                    "%s list/watch failed (%s); listing again in %.0f s", self.kind.name, exc, delay
                )
                await asyncio.sleep(delay)

    async def _list(self) -> str:
        objects: list[dict[str, Any]] = []
        accept = METADATA_LIST if self.kind.metadata_only else JSON
        params = {"limit": str(self.page_size)}
        while True:
            page = await self.api.get(self.kind.path(self.namespace), params, accept, timeout=60)
            objects.extend(_slim(item, self.kind.metadata_only) for item in page.get("items") or ())
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                break
            params = {"limit": str(self.page_size), "continue": str(meta["continue"])}
        self.lists += 1
        logger.debug("%s: listed %d %s", self.kind.name, len(objects), self.where)
        self.on_resync(objects)
        return str(meta.get("resourceVersion") or "")

    async def _watch(self, namespace: str | None, version: str) -> None:
        accept = METADATA if self.kind.metadata_only else JSON
        while True:
            params = {
                "watch": "true",
                "allowWatchBookmarks": "true",
                "timeoutSeconds": str(self.watch_timeout),
                "resourceVersion": version,
            }
            stream = self.api.stream(self.kind.path(namespace), params, accept, self.watch_timeout + 30)
            opened = asyncio.get_running_loop().time()
            async for event in stream:
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    code = obj.get("code")
                    text = f"watch {self.kind.plural}: {code} {obj.get('reason') or ''}".rstrip()
                    raise Gone(text) if code == 410 else WatchFailed(text)
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.on_event(str(kind), _slim(obj, self.kind.metadata_only))
            if asyncio.get_running_loop().time() - opened < 1.0:
                # Not the server's timeout: something in between closes watches; do not spin.
                raise WatchFailed(f"watch {self.kind.plural}: closed at once")
            # The server closed the watch at timeoutSeconds: resume where we are, no re-list.
