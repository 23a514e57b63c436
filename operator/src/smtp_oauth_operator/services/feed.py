"""What the reconciler learns from the API server, and when it stops learning (a paused replica).

Three informers (clients/watching.py): SmtpOAuthConfigs with full objects, Secrets and ConfigMaps as
metadata only. A SmtpOAuthConfig event is observed or forgotten; each (re)list of them is one
``resync`` with the complete list, so a resource deleted while the watch was down is dropped with
its timer and metric series. A Secret or ConfigMap event pokes the resources that reference it (the
pass then reads the object fresh); nothing of it is kept but, for referenced ones, its
resourceVersion, so that after a re-list exactly the referenced objects that changed (or vanished)
meanwhile are poked.

"Referenced" is the reconciler's index (``is_referenced``); the feed learns which keys to ask about
from the lists and events of Secrets and ConfigMaps and from the specs of the SmtpOAuthConfigs it
hands over. A reference the feed learns from a spec starts as *never known* (a Secret listed while
nothing referenced it, as ``kubectl apply`` of a directory creates it before its SmtpOAuthConfig):
the next re-list pokes its users whether it holds the object (maybe changed) or not (deleted during
the watch gap). A re-list of objects whose versions the feed knows pokes nobody, so an API-server
restart is no re-test storm. Memory: a key and a version per referenced object, nothing per other.

:meth:`Feed.pause` stops the informers and the reconciler (timers, workers, cache) and forgets every
token; :meth:`Feed.resume` starts them again, and the first list is the resync. Everything here runs
on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.clients.watching import CONFIGMAPS, SECRETS, ApiConnection, Informer, Kind
from smtp_oauth_operator.domain.renewal import references
from smtp_oauth_operator.domain.spec import GROUP, KIND, PLURAL, VERSION

__all__ = ["CONFIGS", "Feed", "Reconciling"]

logger = logging.getLogger(__name__)

CONFIGS = Kind(KIND, GROUP, VERSION, PLURAL)
SourceKind = Literal["Secret", "ConfigMap"]
Key = tuple[str, str]


class Reconciling(Protocol):
    """What the feed needs of the reconciler (services/reconciler.py)."""

    def observe(self, body: Mapping[str, Any]) -> None: ...
    def forget(self, namespace: str, name: str) -> None: ...
    def resync(self, bodies: Iterable[Mapping[str, Any]]) -> None: ...
    def poke(self, kind: SourceKind, namespace: str, name: str) -> None: ...
    def is_referenced(self, kind: str, namespace: str, name: str) -> bool: ...
    async def pause(self) -> None: ...
    def resume(self) -> None: ...
    @property
    def paused(self) -> bool: ...


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _owner(key: Key) -> str:
    return f"{key[0]}/{key[1]}"  # as services/connection.py names a resource to the token cache


class Feed:
    def __init__(
        self,
        api: ApiConnection,
        reconciler: Reconciling,
        tokens: TokenProvider,
        namespaces: Sequence[str] | None,
        *,
        page_size: int = 250,
        watch_timeout: int = 300,
    ) -> None:
        self.reconciler = reconciler
        self.tokens = tokens
        self._tasks: list[asyncio.Task[None]] = []
        self.paused = False
        scopes: list[str | None] = list(namespaces) if namespaces else [None]
        self._cluster_wide = scopes == [None]
        # the SmtpOAuthConfigs each namespace's informer last listed or saw (namespaced mode)
        self._configs: dict[str | None, set[Key]] = {scope: set() for scope in scopes}
        # resourceVersion of each referenced Secret / ConfigMap, as last seen; None: never known
        self._versions: dict[SourceKind, dict[Key, str | None]] = {"Secret": {}, "ConfigMap": {}}
        self._fresh: set[tuple[SourceKind, str | None]] = set()  # next list is the first since (re)start
        self.informers: list[Informer] = []
        for scope in scopes:
            self.informers.append(
                Informer(
                    api,
                    CONFIGS,
                    scope,
                    on_resync=functools.partial(self._resync_configs, scope),
                    on_event=self._config_event,
                    page_size=page_size,
                    watch_timeout=watch_timeout,
                )
            )
            for kind in (SECRETS, CONFIGMAPS):
                name: SourceKind = "Secret" if kind is SECRETS else "ConfigMap"
                self.informers.append(
                    Informer(
                        api,
                        kind,
                        scope,
                        on_resync=functools.partial(self._resync_sources, name, scope),
                        on_event=functools.partial(self._source_event, name),
                        page_size=page_size,
                        watch_timeout=watch_timeout,
                    )
                )

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def start(self) -> None:
        if self._tasks:
            return
        self.paused = False
        self._fresh = {
            (kind, informer.namespace) for informer in self.informers for kind in ("Secret", "ConfigMap")
        }
        for versions in self._versions.values():
            versions.clear()
        for keys in self._configs.values():
            keys.clear()
        self._tasks = [
            asyncio.create_task(informer.run(), name=f"informer for {informer.kind.plural} {informer.where}")
            for informer in self.informers
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def pause(self) -> None:
        """Another replica is active: no watch, no timer, no worker, no cache, no token here."""
        self.paused = True
        await self.stop()
        await self.reconciler.pause()
        self.tokens.clear()

    def resume(self) -> None:
        """Work (again): at start-up the reconciler is running already, after a pause it is not."""
        if self.reconciler.paused:
            self.reconciler.resume()
        self.start()

    # -- SmtpOAuthConfigs ------------------------------------------------------------------------

    def _resync_configs(self, scope: str | None, bodies: list[dict[str, Any]]) -> None:
        listed = {_key(body) for body in bodies}
        if logger.isEnabledFor(logging.DEBUG):
            for key in sorted(listed):
                logger.debug("SmtpOAuthConfig %s/%s listed", *key)
        if self._cluster_wide:
            self.reconciler.resync(bodies)
            self.tokens.retain(_owner(key) for key in listed)
            for body in bodies:
                self._note_references(body)
            return
        # One namespace's list says nothing about the others: drop what it no longer holds, keep theirs.
        for key in sorted(self._configs[scope] - listed):
            self.reconciler.forget(*key)
            self.tokens.release(_owner(key))
        for body in bodies:
            self.reconciler.observe(body)
            self._note_references(body)
        self._configs[scope] = listed

    def _config_event(self, type_: str, body: dict[str, Any]) -> None:
        key = _key(body)
        logger.debug("SmtpOAuthConfig %s/%s %s", *key, type_)
        keys = self._configs.get(key[0]) if not self._cluster_wide else None
        if type_ == "DELETED":
            self.reconciler.forget(*key)
            self.tokens.release(_owner(key))
            if keys is not None:
                keys.discard(key)
        else:
            self.reconciler.observe(body)
            self._note_references(body)
            if keys is not None:
                keys.add(key)

    def _note_references(self, body: Mapping[str, Any]) -> None:
        """Remember, as never known, the objects ``body`` made referenced that the feed has no version of."""
        namespace = _key(body)[0]
        for kind, name in references(body):
            key = (namespace, name)
            if key not in self._versions[kind] and self.reconciler.is_referenced(kind, *key):
                self._versions[kind][key] = None

    # -- referenced Secrets and ConfigMaps ------------------------------------------------------

    def _source_event(self, kind: SourceKind, type_: str, obj: dict[str, Any]) -> None:
        key = _key(obj)
        versions = self._versions[kind]
        if not self.reconciler.is_referenced(kind, *key):
            versions.pop(key, None)
            return
        if type_ == "DELETED":
            versions.pop(key, None)
        else:
            versions[key] = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        self.reconciler.poke(kind, *key)

    def _resync_sources(self, kind: SourceKind, scope: str | None, objs: list[dict[str, Any]]) -> None:
        listed: dict[Key, str | None] = {
            key: str((obj.get("metadata") or {}).get("resourceVersion") or "")
            for obj in objs
            if self.reconciler.is_referenced(kind, *(key := _key(obj)))
        }
        versions = self._versions[kind]
        known = {k: v for k, v in versions.items() if scope is None or k[0] == scope}
        # Still referenced and not listed: deleted during the gap, or absent all along (then not known).
        vanished = {k for k in known.keys() - listed.keys() if self.reconciler.is_referenced(kind, *k)}
        if (kind, scope) in self._fresh:
            # After a (re)start every resource gets a first pass anyway, which reads its objects.
            self._fresh.discard((kind, scope))
        else:
            changed = {k for k, v in listed.items() if k not in known or known[k] != v} | vanished
            for key in sorted(changed):
                self.reconciler.poke(kind, *key)
        for key in known:
            del versions[key]
        versions.update(listed)
