"""The reconciler: SmtpOAuthConfigs in a work queue with client-go's semantics, and a few workers.

kopf's watch feeds :meth:`Reconciler.observe` with every version of every resource (and
:meth:`Reconciler.resync` with a whole re-list), :meth:`Reconciler.poke` with changes to referenced
Secrets and ConfigMaps. Every method runs on the event loop, never in a thread: the handlers are
``async def``, so kopf calls them on the loop, and a call from another thread raises.

The queue (services/workqueue.py) guarantees that a resource is never handled by two workers, that a
change arriving during its pass means exactly one more pass afterwards, and that failures back off per
resource. Each resource has at most one due time: the next recheck, backoff retry or expiry threshold,
whichever is first. Ten thousand idle resources are ten thousand heap entries, not ten thousand loops.

The cache moves only forward. Kubernetes documents ``resourceVersion`` as opaque; etcd, the only
storage the API server has, makes it the store's modification revision, an integer that grows with
every write. When both versions are integers an older one is ignored (an old watch event arriving after
our own write must not bring back the pre-write status); when either is not, the newer event wins.

The status of a pass is written only when it differs from the stored one (one JSON merge patch), so
steady state costs no API writes. The status a pass computed stays *pending* until it is written: a
failed write is retried, with the same per-resource backoff as a failed read, before anything is
evaluated again. Events go out with the status that records them.

E-mails are at most once, across restarts too, by writing the intent first: a test that would send
a test message records its trigger (status.testMessageTrigger, services/evaluation.py) before it runs,
and an alarm e-mail goes out only after the pass's status, with ``lastAlarm.sending``, is written; a
second write replaces ``sending`` with ``notified``. A failed intent write sends nothing (the pass is
retried with backoff). A process that finds an intent without its outcome does not send again: it tests
without the message, or records the alarm e-mail's outcome as unknown (domain/status.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.clients.kube import Kube, KubeUnavailable
from smtp_oauth_operator.clients.metrics import Metrics
from smtp_oauth_operator.domain.reasons import CheckFailed
from smtp_oauth_operator.domain.renewal import references
from smtp_oauth_operator.domain.spec import RECHECK_ANNOTATION
from smtp_oauth_operator.domain.status import Alarm
from smtp_oauth_operator.services.connection import send_mail
from smtp_oauth_operator.services.discovery import GraphDiscovery
from smtp_oauth_operator.services.evaluation import TEST_MESSAGE_TRIGGER, Pass, evaluate
from smtp_oauth_operator.services.renewal import Renewer
from smtp_oauth_operator.services.workqueue import AsyncWorkQueue, ShutDown, WorkQueue

__all__ = ["Reconciler"]

logger = logging.getLogger(__name__)
Key = tuple[str, str]
RefKey = tuple[str, str, str]  # kind, namespace, name
RETRY_ON_API_ERROR = 15.0  # seconds, doubled per failure up to 5 minutes
MAX_RETRY_ON_API_ERROR = 300.0
# A pass's token requests and SMTP sessions have their own deadlines (services/connection.py: twice
# their timeouts, at most 300 s each, for the test and the alarm e-mail); this backstop catches the
# rest (an API call that never returns), so that no worker is held for ever.
PASS_DEADLINE = 45 * 60.0
HEARTBEAT = 1.0
MAX_LOOP_LAG = 30.0


@dataclass(frozen=True, slots=True)
class _Mail:
    """An alarm e-mail, sent once the status announcing it (``lastAlarm.sending``) is written."""

    body: dict[str, Any]
    result: Pass
    alarm: Alarm


@dataclass(slots=True)
class _Entry:
    packed: bytes  # the latest body, see _pack()
    trigger: tuple[Any, ...]
    version: int | None  # metadata.resourceVersion, when it is an integer
    refs: set[RefKey] = field(default_factory=set)
    # The status the last pass decided and has not written yet, with the Events that go with it.
    pending: dict[str, Any] | None = None
    pending_events: list[tuple[str, str, str]] = field(default_factory=list)
    mail: _Mail | None = None  # to send once ``pending`` is written
    write_failed: bool = False  # the last pass failed on a status write (for its log line)

    @property
    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.packed)
        return body

    def keep(self, body: Mapping[str, Any]) -> bool:
        """Adopt ``body`` if it is newer than what we hold; returns whether it was."""
        version = _version(body)
        if self.version is not None and version is not None and version <= self.version:
            return False
        self.packed = _pack(body)
        self.trigger = _trigger(body)
        self.version = version
        return True


def _version(body: Mapping[str, Any]) -> int | None:
    value = (body.get("metadata") or {}).get("resourceVersion")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _key(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return (str(meta.get("namespace")), str(meta.get("name")))


def _trigger(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What, in a watch event, asks for a pass (status-only changes are our own writes)."""
    meta = body.get("metadata") or {}
    return (meta.get("generation"), (meta.get("annotations") or {}).get(RECHECK_ANNOTATION), meta.get("uid"))


def _refs(namespace: str, body: Mapping[str, Any]) -> set[RefKey]:
    return {(kind, namespace, name) for kind, name in references(body)}


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
    """The JSON merge patch from ``old`` to ``new``: objects are merged key by key by the API server,
    so a key dropped from one (``lastAlarm.sending``) must be patched to None."""
    patch: dict[str, Any] = {}
    for k, v in new.items():
        was = old.get(k)
        if was == v:
            continue
        patch[k] = _status_patch(was, v) if isinstance(was, Mapping) and isinstance(v, Mapping) else v
    patch.update({k: None for k in old if k not in new})
    return patch


class Reconciler:
    """Loop-only: construct it, and call every method, on the event loop it runs on."""

    def __init__(
        self,
        kube: Kube,
        tokens: TokenProvider,
        metrics: Metrics,
        *,
        workers: int = 8,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        relay_endpoint: str | None = None,
        monotonic: Callable[[], float] | None = None,
        jitter: Callable[[], float] = lambda: random.uniform(0.9, 1.1),  # noqa: S311 - not cryptographic
        pass_deadline: float = PASS_DEADLINE,
        max_loop_lag: float = MAX_LOOP_LAG,
    ) -> None:
        self.kube = kube
        self.tokens = tokens
        self.metrics = metrics
        self.discovery = GraphDiscovery()  # Graph reads shared by every resource of an app registration
        self.renewer = Renewer(kube, self.discovery)
        self.clock = clock
        self.relay_endpoint = relay_endpoint or ""  # the chart's relay Service, shown in status.relay
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._monotonic = monotonic or self._loop.time
        self._jitter = jitter
        self.pass_deadline = pass_deadline
        self.max_loop_lag = max_loop_lag
        self._entries: dict[Key, _Entry] = {}
        self._by_ref: dict[RefKey, set[Key]] = {}
        self._queue = self._new_queue()
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: dict[int, tuple[Key, float]] = {}  # worker → (key, since)
        self._heartbeat: asyncio.Task[None] | None = None
        self._beat = self._loop.time()
        self._stall = 0.0  # the last stall of the loop longer than max_loop_lag ...
        self._stalled_until = 0.0  # ... reported by the probe until then
        self._paused = False
        self.passes = 0  # for tests and the benchmark
        self.writes = 0

    def _new_queue(self) -> AsyncWorkQueue[Key]:
        queue: WorkQueue[Key] = WorkQueue(
            self._monotonic,
            base_delay=RETRY_ON_API_ERROR,
            max_delay=MAX_RETRY_ON_API_ERROR,
            jitter=self._jitter,
        )
        return AsyncWorkQueue(queue, self._loop)

    def _on_loop(self) -> None:
        # kopf runs a plain (sync) handler in a thread; reconciler state is not thread-safe.
        if threading.get_ident() != self._thread:
            raise RuntimeError("the reconciler must be called on its event loop (use async handlers)")

    # -- feeding ---------------------------------------------------------------------------------

    def observe(self, body: Mapping[str, Any]) -> None:
        """A watched version of a SmtpOAuthConfig."""
        self._on_loop()
        if self._paused:
            return
        key = _key(body)
        entry = self._entries.get(key)
        trigger = _trigger(body)
        if entry is None or entry.trigger[2] != trigger[2]:
            # New, or deleted and re-created under the same name: nothing of the old one applies.
            if entry is not None:
                self._index(key, entry, set())
            entry = self._entries[key] = _Entry(_pack(body), trigger, _version(body))
            self._index(key, entry, _refs(key[0], body))
            self._queue.add(key)
            return
        before = entry.trigger
        if not entry.keep(body):
            return  # older than (or the same as) what we hold
        self._index(key, entry, _refs(key[0], body))
        if entry.trigger != before:
            self._queue.add(key)

    def forget(self, namespace: str, name: str) -> None:
        """The resource was deleted."""
        self._on_loop()
        key = (namespace, name)
        entry = self._entries.pop(key, None)
        self._queue.remove(key)
        if entry is not None:
            self._index(key, entry, set())
        self.metrics.forget(namespace, name)

    def resync(self, bodies: Iterable[Mapping[str, Any]]) -> None:
        """A complete (re)list: what it does not hold was deleted meanwhile."""
        self._on_loop()
        if self._paused:
            return
        bodies = list(bodies)
        listed = {_key(body) for body in bodies}
        for key in [k for k in self._entries if k not in listed]:
            self.forget(*key)
        for body in bodies:
            self.observe(body)

    def is_referenced(self, kind: str, namespace: str, name: str) -> bool:
        return (kind, namespace, name) in self._by_ref

    def poke(self, kind: Literal["Secret", "ConfigMap"], namespace: str, name: str) -> None:
        """A referenced Secret or ConfigMap changed (or appeared, or vanished): re-run its users."""
        self._on_loop()
        for key in sorted(self._by_ref.get((kind, namespace, name), ())):
            self._queue.add(key)

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

    # -- running ---------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.health() is None

    def health(self) -> str | None:
        """None when healthy, else why not (for the liveness probe)."""
        if self._paused:
            return None  # a standby replica is alive with no workers
        if not self._tasks:
            return "the reconciler's workers are not running"
        dead = [t.get_name() for t in self._tasks if t.done()]
        if dead:
            return f"reconciler worker(s) stopped: {', '.join(dead)}"
        now = self._loop.time()
        if self._heartbeat is None or self._heartbeat.done():
            return "the event loop heartbeat stopped"
        if now - self._beat > self.max_loop_lag:
            return f"the event loop did not run for {now - self._beat:.0f} s"
        if now < self._stalled_until:
            return f"the event loop stalled for {self._stall:.1f} s"
        stuck = [k for k, since in self._busy.values() if now - since > self.pass_deadline + 60]
        if stuck:
            return f"a pass over {stuck[0][0]}/{stuck[0][1]} outlived its deadline"
        return None

    def start(self) -> None:
        self._paused = False
        self._tasks = [
            asyncio.create_task(self._work(i), name=f"reconciler-{i}") for i in range(self._workers)
        ]
        self._beat = self._loop.time()
        self._heartbeat = asyncio.create_task(self._tick(), name="reconciler-heartbeat")

    async def _tick(self) -> None:
        """Measure the loop's lag: how late a short sleep wakes up. While the loop is blocked the
        probe itself cannot answer (the kubelet's timeout fails it); for ``max_loop_lag`` seconds
        afterwards the probe still reports the stall (a probe that waited in the socket meanwhile
        must not use it up), so a stall that long adds up to the kubelet's failure threshold."""
        interval = min(HEARTBEAT, self.max_loop_lag / 4)
        while True:
            expected = self._loop.time() + interval
            await asyncio.sleep(interval)
            self._beat = self._loop.time()
            lag = self._beat - expected
            if lag > self.max_loop_lag:
                self._stall = lag
                self._stalled_until = self._beat + self.max_loop_lag

    async def _halt(self, grace: float) -> None:
        self._queue.shutdown()
        workers, self._tasks = self._tasks, []
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            workers.append(self._heartbeat)
            self._heartbeat = None
        if grace > 0 and workers:
            # A pass in flight ends (its e-mail and the status that records it go together).
            await asyncio.wait(workers, timeout=grace)
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._busy.clear()

    async def stop(self, grace: float = 10.0) -> None:
        """Shut down: a pass in flight may end (within ``grace``), then the workers are cancelled."""
        await self._halt(grace)

    async def pause(self, grace: float = 30.0) -> None:
        """Another replica is active: stop every timer and worker, drop the cache and its metrics.
        The caller re-lists after :meth:`resume` and feeds :meth:`resync`."""
        self._on_loop()
        self._paused = True
        await self._halt(grace)
        for key in list(self._entries):
            self.metrics.forget(*key)
        self._entries.clear()
        self._by_ref.clear()

    def resume(self) -> None:
        self._on_loop()
        if not self._paused:
            return
        self._queue = self._new_queue()
        self.start()

    @property
    def paused(self) -> bool:
        return self._paused

    async def _work(self, worker: int) -> None:
        queue = self._queue
        while True:
            try:
                key = await queue.get()
            except ShutDown:
                return
            self._busy[worker] = (key, self._loop.time())
            try:
                await self.process(key)
            finally:
                self._busy.pop(worker, None)
                queue.done(key)

    async def process_next(self) -> Key | None:
        """Process one ready key, if any (tests drive the reconciler this way, without workers)."""
        key = self._queue.queue.get()
        if key is None:
            return None
        try:
            await self.process(key)
        finally:
            self._queue.done(key)
        return key

    async def process(self, key: Key) -> None:
        """One pass over ``key`` (which the queue handed out), and its requeue."""
        entry = self._entries.get(key)
        if entry is None:
            return
        try:
            async with asyncio.timeout(self.pass_deadline):
                delay = await self.reconcile(key, entry)
        except (KubeUnavailable, CheckFailed, TimeoutError) as exc:
            if self._entries.get(key) is entry:
                wait = self._queue.add_rate_limited(key)
                detail = str(exc) or f"the pass did not end within {self.pass_deadline:.0f} s"
                if entry.pending is not None or entry.write_failed:
                    logger.warning(
                        "Could not write the status of %s/%s (%s); retrying in %.0f s", *key, detail, wait
                    )
                else:
                    logger.warning(
                        "API server trouble while reconciling %s/%s (%s); retrying in %.0f s",
                        *key,
                        detail,
                        wait,
                    )
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must not stop the worker or spin: log (no secrets reach exception text from
            # our clients) and retry this resource later.
            if self._entries.get(key) is entry:
                wait = self._queue.add_rate_limited(key)
                logger.exception("Unexpected error while reconciling %s/%s; retrying in %.0f s", *key, wait)
            return
        if self._entries.get(key) is not entry:
            return  # deleted (or re-created) meanwhile
        self._queue.forget(key)
        if delay is not None:
            self._queue.add_after(key, max(delay, 1.0))

    async def reconcile(self, key: Key, entry: _Entry) -> float | None:
        """One pass; returns the delay until the next one (None: wait for a change).

        A status still pending from an earlier pass is written first; until it is, nothing is
        evaluated (which could send its e-mail again)."""
        entry.write_failed = False
        if entry.pending is not None:
            await self._flush(key, entry)
            if self._entries.get(key) is not entry:
                return None
        self.passes += 1
        body = entry.body
        evaluated = entry.trigger

        async def before_message(trigger: str) -> bool:
            return await self._write(key, entry, {TEST_MESSAGE_TRIGGER: trigger})

        result = await evaluate(
            body,
            self.kube,
            self.tokens,
            now=self.clock(),
            discovery=self.discovery,
            renewer=self.renewer,
            before_message=before_message,
            relay_endpoint=self.relay_endpoint,
        )
        if self._entries.get(key) is not entry:
            return None  # deleted during the pass: no status, no metric series
        self._record(key, result)
        await self._decide(key, entry, body, result)
        await self._flush(key, entry)
        if self._entries.get(key) is not entry:
            return None
        if entry.trigger != evaluated:
            # Seen during the pass (a watch event, or our own patch's response): this pass did not
            # evaluate it, so one more pass does (the queue runs it after this one).
            self._queue.add(key)
        if result.next_due is None:
            return None
        return (result.next_due - self.clock()).total_seconds()

    def _record(self, key: Key, result: Pass) -> None:
        namespace, name = key
        ready = result.decision.ready
        self.metrics.ready.labels(namespace, name).set(1 if ready.get("status") == "True" else 0)
        expires = result.decision.status.get("clientSecretExpiresAt")
        if result.spec is not None and result.inputs and result.expires_at:
            self.metrics.expiration.labels(namespace, name).set(result.expires_at.timestamp())
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

    async def _decide(self, key: Key, entry: _Entry, body: Mapping[str, Any], result: Pass) -> None:
        """Make the status and Events of this pass pending, with its alarm e-mail, if any, announced
        in ``lastAlarm.sending`` (sent by _flush once that is written)."""
        decision = result.decision
        alarm = decision.alarm
        last = decision.status.get("lastAlarm")
        entry.mail = None
        if (
            alarm is not None
            and result.spec is not None
            and result.spec.notify_to
            and result.inputs is not None
            and isinstance(last, dict)
        ):
            last = {k: v for k, v in last.items() if k != "notified"}
            decision.status["lastAlarm"] = {**last, "sending": True}
            entry.mail = _Mail(dict(body), result, alarm)
        entry.pending = decision.status
        entry.pending_events = [(e.type, e.reason, e.message) for e in decision.events]

    async def _write(self, key: Key, entry: _Entry, patch: Mapping[str, Any]) -> bool:
        """Patch the status; False when the resource is gone (a 404 forgets it) or was replaced.
        Raises KubeUnavailable or CheckFailed."""
        if self._entries.get(key) is not entry:
            return False
        try:
            updated = await self.kube.patch_status(key[0], key[1], patch)
        except (KubeUnavailable, CheckFailed):
            entry.write_failed = True
            raise
        self.writes += 1
        if self._entries.get(key) is not entry:
            return False
        if updated is None:
            logger.info("%s/%s is gone (404 on its status); forgetting it", *key)
            self.forget(*key)
            return False
        # Our own write is the latest version we know (forward only: a newer trigger it carries is
        # compared by the caller with what the pass evaluated).
        entry.keep(updated)
        # Indexed again even for a status-only write: a renewal's switch changes the Secret in use.
        self._index(key, entry, _refs(key[0], updated))
        return True

    async def _flush(self, key: Key, entry: _Entry) -> None:
        """Write the pending status (raises KubeUnavailable or CheckFailed, and it stays pending),
        then post its Events; then send the alarm e-mail it announced and record its outcome."""
        assert entry.pending is not None
        if self._entries.get(key) is not entry:
            return  # deleted (or re-created) during the pass: its status is not ours
        body = entry.body
        patch = _status_patch(body.get("status") or {}, entry.pending)
        if patch and not await self._write(key, entry, patch):
            return
        events, entry.pending, entry.pending_events = entry.pending_events, None, []
        for type_, reason, message in events:
            await self.kube.post_event(body, type_, reason, message)
        mail, entry.mail = entry.mail, None
        if mail is not None:
            await self._send(key, entry, mail)

    async def _send(self, key: Key, entry: _Entry, mail: _Mail) -> None:
        """The alarm e-mail, after the write announcing it; its outcome becomes the pending status.
        Interrupted before that is written (a crash, a stop), the outcome stays unknown for good."""
        spec = mail.result.spec
        assert spec is not None
        failure = await self._notify(mail.body, mail.result, mail.alarm.subject, mail.alarm.body)
        status = dict(entry.body.get("status") or {})
        last = {k: v for k, v in (status.get("lastAlarm") or {}).items() if k != "sending"}
        entry.pending = {**status, "lastAlarm": {**last, "notified": failure is None}}
        if failure is not None and not mail.alarm.retry:
            entry.pending_events = [
                (
                    "Warning",
                    "AlarmNotificationFailed",
                    f"Could not e-mail the {mail.alarm.kind} alarm to {', '.join(spec.notify_to)}: "
                    f"{failure.reason}: {failure.message}; retrying with the next checks.",
                )
            ]
        await self._flush(key, entry)

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
