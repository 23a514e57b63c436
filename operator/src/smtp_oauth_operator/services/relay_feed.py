"""The relay's view of the cluster (``smtp-oauth-operator relay`` without ``-f``): read-only.

Two informers (clients/watching.py): SmtpOAuthConfigs with full objects, Secrets as metadata only.
Every relayed configuration becomes a :class:`~smtp_oauth_operator.services.relay.Route`; its
readiness is the operator's ``Ready`` condition for the current generation (the relay never tests a
configuration itself and never writes to the API). A change to a Secret a route uses (its relay login,
its client secret, a CA bundle in a Secret) rebuilds that route from a fresh read; each (re)list of
the configurations drops the routes it no longer returns. Any replica serves any configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from smtp_oauth_operator.clients.kube import Kube, KubeUnavailable
from smtp_oauth_operator.clients.watching import SECRETS, ApiConnection, Informer, Kind
from smtp_oauth_operator.domain.reasons import CheckFailed
from smtp_oauth_operator.domain.renewal import renewed_spec, state_of
from smtp_oauth_operator.domain.spec import GROUP, KIND, PLURAL, VERSION, SpecError, parse_spec
from smtp_oauth_operator.services.relay import RelayInputError, Route, RouteError, Routes, build_route

__all__ = ["RelayFeed", "connect", "readiness"]

logger = logging.getLogger(__name__)

CONFIGS = Kind(KIND, GROUP, VERSION, PLURAL)
Key = tuple[str, str]
RETRY = 5.0


def readiness(body: Mapping[str, Any]) -> tuple[bool, str]:
    """The operator's verdict on this generation: (Ready, reason). A spec changed since the last test
    is not Ready until the operator has tested it."""
    metadata = body.get("metadata") or {}
    status = body.get("status") or {}
    generation = metadata.get("generation")
    for condition in status.get("conditions") or ():
        if condition.get("type") != "Ready":
            continue
        reason = str(condition.get("reason") or "Unknown")
        if generation is not None and condition.get("observedGeneration") not in (None, generation):
            return False, "NotYetTested"
        return condition.get("status") == "True", reason
    return False, "NotYetTested"


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _secrets_of(body: Mapping[str, Any]) -> set[Key]:
    namespace = _key(body)[0]
    try:
        spec = renewed_spec(parse_spec(body.get("spec")), state_of(body))
    except SpecError:
        return set()
    names = {spec.credential_secret} if spec.credential_secret is not None else set()
    if spec.relay is not None:
        names.add(spec.relay.credentials_secret)
    names |= {r.name for r in (spec.identity_ca, spec.smtp_ca) if r is not None and r.kind == "Secret"}
    return {(namespace, n) for n in names}


class RelayFeed:
    def __init__(self, routes: Routes, kube: Kube, api: ApiConnection, namespaces: Sequence[str]) -> None:
        self.routes = routes
        self.kube = kube
        self.api = api
        self.bodies: dict[Key, dict[str, Any]] = {}
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._versions: dict[Key, str] = {}
        self._listed = False
        self.synced = asyncio.Event()  # the first list is in and every route of it built (or failed)
        # One informer pair per namespace (or one cluster-wide), as the operator's feed: a namespace the
        # relay may not read stops only its own watches, and each (re)list speaks only for its scope.
        scopes: list[str | None] = list(namespaces) if namespaces else [None]
        self._unlisted: set[str | None] = set(scopes)
        self.informers: list[Informer] = []
        for scope in scopes:
            self.informers.append(
                Informer(
                    api,
                    CONFIGS,
                    scope,
                    on_resync=functools.partial(self._resync, scope),
                    on_event=self._event,
                )
            )
            self.informers.append(
                Informer(
                    api,
                    SECRETS,
                    scope,
                    on_resync=functools.partial(self._resync_secrets, scope),
                    on_event=self._secret_event,
                )
            )

    async def run(self) -> None:
        runs = [asyncio.create_task(i.run(), name=f"relay informer {i.kind.plural}") for i in self.informers]
        try:
            await asyncio.gather(*runs)
        finally:
            for task in [*runs, *self._tasks.values()]:
                task.cancel()
            for task in [*runs, *self._tasks.values()]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.api.close()
            self.kube.close()

    # -- configurations ------------------------------------------------------------------------

    def _resync(self, scope: str | None, bodies: list[dict[str, Any]]) -> None:
        listed = {_key(b): b for b in bodies}
        for key in [k for k in self.bodies if _within(k, scope) and k not in listed]:
            self._drop(key)
        for key, body in listed.items():
            self._observe(key, body)
        self._unlisted.discard(scope)
        self._listed = not self._unlisted
        self._check_synced()

    def _check_synced(self) -> None:
        if self._listed and not self._tasks and not self.synced.is_set():
            self.synced.set()

    def _event(self, kind: str, body: dict[str, Any]) -> None:
        key = _key(body)
        if kind == "DELETED":
            self._drop(key)
        else:
            self._observe(key, body)

    def _observe(self, key: Key, body: dict[str, Any]) -> None:
        old = self.bodies.get(key)
        self.bodies[key] = body
        if old is not None and _same(old, body) and key not in self._tasks:
            return  # a re-list repeats what we have: nothing to read again
        self._rebuild(key)

    def _drop(self, key: Key) -> None:
        self.bodies.pop(key, None)
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
        self.routes.remove(*key)

    def _rebuild(self, key: Key) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
        self._tasks[key] = asyncio.create_task(self._build(key), name=f"relay route {key[0]}/{key[1]}")

    async def _build(self, key: Key) -> None:
        try:
            while key in self.bodies:
                body = self.bodies[key]
                ready, reason = readiness(body)
                try:
                    route: Route | None = await build_route(body, self.kube, ready=ready, reason=reason)
                except (KubeUnavailable, CheckFailed) as exc:
                    logger.warning("relay: cannot read what %s/%s references (%s); retrying", *key, exc)
                    await asyncio.sleep(RETRY)
                    continue
                except RouteError as exc:
                    logger.warning("relay: not served: %s", exc)
                    self.routes.remove(*key)
                    return
                if route is None:
                    self.routes.remove(*key)
                else:
                    previous = self.routes.get(key)
                    self.routes.put(route)
                    if previous is None or (previous.ready, previous.login) != (route.ready, route.login):
                        logger.info(
                            "relay: %s/%s serves login %r: %s (%s)",
                            *key,
                            route.login,
                            "Ready" if route.ready else "not Ready",
                            route.reason,
                        )
                return
        finally:
            if self._tasks.get(key) is asyncio.current_task():
                del self._tasks[key]
            self._check_synced()

    # -- Secrets (metadata only) -------------------------------------------------------------------

    def _referenced(self, secret: Key) -> list[Key]:
        return [key for key, body in self.bodies.items() if secret in _secrets_of(body)]

    def _resync_secrets(self, scope: str | None, objects: list[dict[str, Any]]) -> None:
        seen = {_key(o): str((o.get("metadata") or {}).get("resourceVersion") or "") for o in objects}
        before = {k: v for k, v in self._versions.items() if _within(k, scope)}
        changed = {k for k, v in before.items() if seen.get(k) != v}
        changed |= {k for k in seen if k not in before}
        for key in before:
            del self._versions[key]
        self._versions.update(seen)
        for secret in changed:
            for key in self._referenced(secret):
                self._rebuild(key)

    def _secret_event(self, kind: str, obj: dict[str, Any]) -> None:
        secret = _key(obj)
        if kind == "DELETED":
            self._versions.pop(secret, None)
        else:
            self._versions[secret] = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        for key in self._referenced(secret):
            self._rebuild(key)


def _within(key: Key, scope: str | None) -> bool:
    return scope is None or key[0] == scope


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return (a.get("metadata") or {}).get("resourceVersion") == (b.get("metadata") or {}).get(
        "resourceVersion"
    )


def connect(routes: Routes, namespaces: Sequence[str]) -> RelayFeed:
    """A feed for ``routes`` from the API server (in-cluster config, else the kubeconfig)."""
    try:
        kube = Kube.from_environment()
    except Exception as exc:  # kubernetes.config.ConfigException, file errors: no cluster to watch
        raise RelayInputError(f"no cluster configuration (in-cluster or kubeconfig): {exc}") from None
    return RelayFeed(routes, kube, ApiConnection(kube.api_client.configuration), namespaces)
