"""The reconciler: a work queue of SmtpOAuthConfigs, a few workers, and one timer per resource.

kopf's watch feeds :meth:`Reconciler.observe` with every version of every resource and
:meth:`Reconciler.poke` with changes to referenced Secrets and ConfigMaps. A resource is queued when
something that matters changed (a new generation, the recheck annotation, a referenced object) or when
its timer fires. Each resource has at most one timer, set to its next due time: the next recheck, the
next backoff retry or the next expiry threshold, whichever is first. Ten thousand idle resources are
ten thousand ``TimerHandle``s in the event loop's heap, not ten thousand loops waking up.

The status of a pass is written only when it differs from the stored one (one JSON merge patch), so
steady state costs no API writes. Events go out on transitions (domain/status.py decides which).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.clients.kube import Kube, KubeUnavailable
from smtp_oauth_operator.clients.metrics import Metrics
from smtp_oauth_operator.domain.reasons import CheckFailed
from smtp_oauth_operator.domain.spec import RECHECK_ANNOTATION, SpecError, parse_spec
from smtp_oauth_operator.services.connection import send_mail
from smtp_oauth_operator.services.evaluation import Pass, evaluate

__all__ = ["Reconciler"]

logger = logging.getLogger(__name__)
Key = tuple[str, str]
RefKey = tuple[str, str, str]  # kind, namespace, name
RETRY_ON_API_ERROR = 15.0  # seconds, doubled per failure up to 5 minutes


@dataclass(slots=True)
class _Entry:
    packed: bytes  # the latest body, see _pack()
    trigger: tuple[Any, ...]
    refs: set[RefKey] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None
    queued: bool = False
    running: bool = False
    again: bool = False  # observed while running: run once more afterwards
    api_failures: int = 0

    @property
    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.packed)
        return body

    def keep(self, body: Mapping[str, Any]) -> None:
        self.packed = _pack(body)
        self.trigger = _trigger(body)


def _trigger(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What, in a watch event, asks for a pass (status-only changes are our own writes)."""
    meta = body.get("metadata") or {}
    return (meta.get("generation"), (meta.get("annotations") or {}).get(RECHECK_ANNOTATION), meta.get("uid"))


def _refs(namespace: str, spec: Any) -> set[RefKey]:
    try:
        parsed = parse_spec(spec)
    except SpecError:
        return set()
    return {(kind, namespace, name) for kind, name in parsed.referenced_objects()}


def _renewal_steps(kind: str) -> str:
    if kind == "ClientCertificate":
        return (
            "Steps: issue a new certificate (cert-manager renews it by itself), upload it in Entra ID > App "
            "registrations > Certificates & secrets, and update the TLS Secret.\n"
        )
    return (
        "Steps: in Entra ID > App registrations > Certificates & secrets, create a new client secret; "
        "update the Secret (or SealedSecret) and spec.identity.clientSecret.expiresAt.\n"
    )


def _pack(body: Mapping[str, Any]) -> bytes:
    """The body as kept between passes: compact JSON, without metadata.managedFields (which no pass
    reads). Parsed, a SmtpOAuthConfig is 26 KiB of dicts (11 KiB without managedFields); packed it
    is 2.5 KiB, and a pass parses it back in tens of microseconds."""
    meta = body.get("metadata") or {}
    if "managedFields" in meta:
        body = {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    return json.dumps(body, separators=(",", ":")).encode()


def _status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        tokens: TokenProvider,
        metrics: Metrics,
        *,
        workers: int = 8,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kube = kube
        self.tokens = tokens
        self.metrics = metrics
        self.clock = clock
        self._entries: dict[Key, _Entry] = {}
        self._by_ref: dict[RefKey, set[Key]] = {}
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self.passes = 0  # for tests and the benchmark
        self.writes = 0

    # -- feeding ---------------------------------------------------------------------------------

    def observe(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(_pack(body), _trigger(body))
            changed = True
        else:
            changed = entry.trigger != _trigger(body)
            entry.keep(body)
        self._index(key, entry, _refs(key[0], body.get("spec")))
        if changed:
            self._enqueue(key)

    def forget(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if entry.timer:
            entry.timer.cancel()
        self._index(key, entry, set())
        self.metrics.forget(namespace, name)

    def is_referenced(self, kind: str, namespace: str, name: str) -> bool:
        return (kind, namespace, name) in self._by_ref

    def poke(self, kind: Literal["Secret", "ConfigMap"], namespace: str, name: str) -> None:
        """A referenced Secret or ConfigMap changed (or appeared, or vanished): re-run its users."""
        for key in sorted(self._by_ref.get((kind, namespace, name), ())):
            self._enqueue(key)

    def _index(self, key: Key, entry: _Entry, refs: set[RefKey]) -> None:
        for ref in entry.refs - refs:
            users = self._by_ref.get(ref)
            if users is not None:
                users.discard(key)
                if not users:
                    del self._by_ref[ref]
        for ref in refs - entry.refs:
            self._by_ref.setdefault(ref, set()).add(key)
        entry.refs = refs

    def _enqueue(self, key: Key) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        if entry.running:
            entry.again = True
            return
        if entry.queued:
            return
        if entry.timer:
            entry.timer.cancel()
            entry.timer = None
        entry.queued = True
        self._queue.put_nowait(key)

    def _schedule(self, key: Key, delay: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        if entry.timer:
            entry.timer.cancel()
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(max(delay, 1.0), self._enqueue, key)

    # -- running ---------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(), name=f"reconciler-{i}") for i in range(self._workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for entry in self._entries.values():
            if entry.timer:
                entry.timer.cancel()

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            entry = self._entries.get(key)
            if entry is None:
                continue
            entry.queued = False
            entry.running = True
            try:
                delay = await self.reconcile(key, entry)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug must not stop the worker or spin: log (no secrets reach exception text from
                # our clients) and retry this resource later.
                logger.exception("Unexpected error while reconciling %s/%s; retrying in 60 s", *key)
                delay = 60.0
            finally:
                entry.running = False
            if key not in self._entries:
                continue
            if entry.again:
                entry.again = False
                self._enqueue(key)
            elif delay is not None:
                self._schedule(key, delay)

    async def reconcile(self, key: Key, entry: _Entry) -> float | None:
        """One pass; returns the delay until the next one (None: wait for a change)."""
        self.passes += 1
        body = entry.body
        now = self.clock()
        try:
            result = await evaluate(body, self.kube, self.tokens, now=now)
        except KubeUnavailable as exc:
            entry.api_failures += 1
            delay = min(RETRY_ON_API_ERROR * 2 ** (entry.api_failures - 1), 300.0)
            logger.warning(
                "API server trouble while reconciling %s/%s (%s); retrying in %.0f s", *key, exc, delay
            )
            jittered: float = delay * random.uniform(0.9, 1.1)  # noqa: S311 - not cryptographic
            return jittered
        entry.api_failures = 0
        await self._record(key, body, result)
        await self._write(key, entry, body, result)
        if result.next_due is None:
            return None
        return (result.next_due - self.clock()).total_seconds()

    async def _record(self, key: Key, body: Mapping[str, Any], result: Pass) -> None:
        namespace, name = key
        ready = result.decision.ready
        self.metrics.ready.labels(namespace, name).set(1 if ready.get("status") == "True" else 0)
        expires = result.decision.status.get("clientSecretExpiresAt")
        if result.spec is not None and (result.inputs and result.inputs.expires_at):
            self.metrics.expiration.labels(namespace, name).set(result.inputs.expires_at.timestamp())
        elif not expires:
            with contextlib.suppress(KeyError):
                self.metrics.expiration.remove(namespace, name)
        if result.test is not None:
            outcome = result.test.failure.reason if result.test.failure else "ConnectionTested"
            self.metrics.tests.labels(namespace, name, str(outcome)).inc()
            if result.test.duration:
                self.metrics.duration.observe(result.test.duration)
            level = logging.INFO if result.test.failure is None else logging.WARNING
            logger.log(
                level,
                "Tested %s/%s: %s (%.2f s)",
                namespace,
                name,
                result.test.failure.reason if result.test.failure else "ConnectionTested",
                result.test.duration,
            )

    async def _write(self, key: Key, entry: _Entry, body: Mapping[str, Any], result: Pass) -> None:
        decision = result.decision
        failure: CheckFailed | None = None
        alarm = decision.alarm
        if (
            alarm is not None
            and result.spec is not None
            and result.spec.notify_to
            and result.inputs is not None
        ):
            # E-mail first, so that whether it reached the admins is part of the one status write.
            failure = await self._notify(body, result, alarm.subject, alarm.body)
            if isinstance(decision.status.get("lastAlarm"), dict):
                decision.status["lastAlarm"] = {**decision.status["lastAlarm"], "notified": failure is None}
        old_status = body.get("status") or {}
        patch = _status_patch(old_status, decision.status)
        if patch:
            updated = await self.kube.patch_status(key[0], key[1], patch)
            self.writes += 1
            if updated is not None and key in self._entries:
                # Keep our own write as the latest known version, so that a pass before the watch
                # event arrives does not re-test on stale status.
                entry.keep(updated)
        for event in decision.events:
            await self.kube.post_event(body, event.type, event.reason, event.message)
        if failure is not None and alarm is not None and not alarm.retry and result.spec is not None:
            await self.kube.post_event(
                body,
                "Warning",
                "AlarmNotificationFailed",
                f"Could not e-mail the {alarm.kind} alarm to {', '.join(result.spec.notify_to)}: "
                f"{failure.reason}: {failure.message}; retrying with the next checks.",
            )

    async def _notify(
        self, body: Mapping[str, Any], result: Pass, subject: str, text: str
    ) -> CheckFailed | None:
        assert result.spec is not None
        assert result.inputs is not None
        meta = body.get("metadata") or {}
        where = f"{meta.get('namespace')}/{meta.get('name')}"
        text = (
            f"{text}\n\nResource: SmtpOAuthConfig {where}\nApplication (client) ID: {result.spec.client_id}\n"
            f"Sender: {result.spec.username}\n\n" + _renewal_steps(result.spec.credential_kind)
        )
        try:
            await send_mail(result.spec, result.inputs, self.tokens, result.spec.notify_to, subject, text)
        except CheckFailed as exc:
            return exc
        return None
