"""services/reconciler.py on a fake API (our own Kube interface) and a fake clock: its races, in order.

No network: the resources here reference a Secret that does not exist (SecretNotFound), so a pass
reads, decides and writes status without a connection test. E-mails are in
tests/integration/test_reconciler_faults.py, against the real local peers.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import kopf
import pytest
from tests.fakeapi import FakeApi

from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.clients.kube import KubeUnavailable
from smtp_oauth_operator.clients.metrics import Metrics
from smtp_oauth_operator.domain.reasons import CheckFailed, Reason
from smtp_oauth_operator.handlers import startup
from smtp_oauth_operator.services.reconciler import Reconciler

NS = "mail"
SPEC: dict[str, Any] = {
    "username": "no-reply@contoso.com",
    "identity": {
        "tenantId": "0d9b8c6e-1f2a-4b3c-9d8e-7f6a5b4c3d2e",
        "clientId": "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
        "clientSecret": {"secretKeyRef": {"name": "exo-app", "key": "client-secret"}},
    },
}


# Reported once per generation: a second pass writes nothing, so every write counted is one we caused.
INVALID: dict[str, Any] = {"username": "not-an-address"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


def series(metrics: Metrics, name: str) -> list[str]:
    return [
        f"{sample.name}{sorted(sample.labels.items())}"
        for metric in metrics.registry.collect()
        for sample in metric.samples
        if sample.labels.get("name") == name
    ]


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
async def workers(api: FakeApi) -> AsyncIterator[Reconciler]:
    reconciler = Reconciler(api, TokenProvider(), Metrics(), workers=4)  # type: ignore[arg-type]
    reconciler.start()
    yield reconciler
    await reconciler.stop()


def driven(api: FakeApi, clock: FakeClock) -> Reconciler:
    """A reconciler without workers: the test hands out keys (process_next) and moves the clock."""
    return Reconciler(api, TokenProvider(), Metrics(), monotonic=clock, jitter=lambda: 1.0)  # type: ignore[arg-type]


# -- defect 1: state touched off the event loop -------------------------------------------------


async def test_kopf_handlers_run_on_the_event_loop() -> None:
    # kopf runs a plain function in a worker thread; only a coroutine runs on the loop. Every handler
    # the operator registers (watches, probes, start-up) is checked, whichever module holds it.
    importlib.import_module("smtp_oauth_operator.main")
    registry = kopf.get_default_registry()
    ours = [
        handler.fn
        for part in (registry._watching, registry._changing, registry._activities, registry._spawning)
        for handler in part.get_all_handlers()
        if handler.fn.__module__.startswith("smtp_oauth_operator.")
    ]
    assert ours, "no handlers registered"
    plain = [f"{fn.__module__}.{fn.__name__}" for fn in ours if not inspect.iscoroutinefunction(fn)]
    assert not plain, f"kopf would run these in a thread: {plain}"


async def test_the_reconciler_refuses_calls_from_another_thread(api: FakeApi) -> None:
    reconciler = Reconciler(api, TokenProvider(), Metrics())  # type: ignore[arg-type]
    body = api.create(NS, "a", SPEC)
    for call in (
        lambda: reconciler.observe(body),
        lambda: reconciler.forget(NS, "a"),
        lambda: reconciler.poke("Secret", NS, "exo-app"),
        lambda: reconciler.resync([body]),
    ):
        with pytest.raises(RuntimeError, match="event loop"):
            await asyncio.to_thread(call)
    assert not reconciler.is_referenced("Secret", NS, "exo-app")


async def test_a_change_landing_during_a_pass_runs_exactly_one_more_pass(
    api: FakeApi, workers: Reconciler
) -> None:
    api.gate.clear()
    workers.observe(api.create(NS, "a", SPEC))
    await api.reading.wait()  # the first pass is reading
    for _ in range(3):
        workers.observe(api.edit(NS, "a"))  # generation 2, 3, 4 while it runs
        workers.poke("Secret", NS, "exo-app")
    await asyncio.sleep(0.01)
    assert workers.passes == 1, "a second worker must not take a resource that is being processed"
    api.gate.set()
    await until(lambda: api.get(NS, "a").get("status", {}).get("observedGeneration") == 4, "generation 4")
    await asyncio.sleep(0.05)
    assert workers.passes == 2


# -- defect 5: going backwards ---------------------------------------------------------------------


async def test_a_newer_generation_in_our_patch_response_is_evaluated(
    api: FakeApi, workers: Reconciler
) -> None:
    api.gate.clear()
    first = api.create(NS, "a", SPEC)
    workers.observe(first)
    await api.reading.wait()
    second = api.edit(NS, "a")  # the user's edit lands; its watch event is not delivered yet
    api.gate.set()
    # Our patch's response carries generation 2: adopting it must not count as having tested it.
    await until(lambda: workers.passes >= 1 and api.patches != [], "the first write")
    workers.observe(second)  # the watch event arrives late (older than the patch response)
    await until(
        lambda: api.get(NS, "a")["status"].get("observedGeneration") == 2, "generation 2 evaluated", timeout=2
    )


async def test_an_older_watch_event_after_our_write_is_ignored(api: FakeApi, workers: Reconciler) -> None:
    before = api.create(NS, "a", INVALID)
    workers.observe(before)
    await until(lambda: len(api.patches) == 1, "the first write")
    await until(lambda: workers.passes == 1 and not workers._busy, "the pass to end")
    workers.observe(before)  # a stale event (from a re-list) without our status
    workers._queue.add((NS, "a"))  # any pass now
    await until(lambda: workers.passes == 2 and not workers._busy, "the second pass")
    assert len(api.patches) == 1, "the stale event put the pre-write status back in the cache"


async def test_an_older_body_with_a_new_uid_replaces_the_entry(api: FakeApi) -> None:
    clock = FakeClock()
    reconciler = driven(api, clock)
    reconciler.observe(api.create(NS, "a", SPEC))
    assert await reconciler.process_next() == (NS, "a")
    api.delete(NS, "a")
    reconciler.observe(api.create(NS, "a", SPEC))  # re-created under the same name
    assert await reconciler.process_next() == (NS, "a")


async def test_resource_versions_that_are_not_integers_count_as_newer(api: FakeApi) -> None:
    # Opaque by the API's contract: the integer order is etcd's; anything else must not stall us.
    reconciler = driven(api, FakeClock())
    body = api.create(NS, "a", INVALID)
    body["metadata"]["resourceVersion"] = "opaque-b"
    reconciler.observe(body)
    assert await reconciler.process_next() == (NS, "a")
    edited = api.edit(NS, "a")
    edited["metadata"]["resourceVersion"] = "opaque-a"
    reconciler.observe(edited)
    assert await reconciler.process_next() == (NS, "a")


# -- defect 4: a failed status write repeats nothing and backs off ---------------------------------


async def test_a_failed_status_write_is_retried_with_backoff_before_any_new_evaluation(
    api: FakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    reconciler = driven(api, clock)
    api.patch_faults = [
        KubeUnavailable("patch smtpoauthconfigs/status mail/a: HTTP 503 Service Unavailable"),
        CheckFailed(Reason.ACCESS_DENIED, "the operator's ServiceAccount may not patch (HTTP 403 Forbidden)"),
        KubeUnavailable("patch smtpoauthconfigs/status mail/a: HTTP 500 Internal Server Error"),
    ]
    reconciler.observe(api.create(NS, "a", INVALID))
    assert await reconciler.process_next() == (NS, "a")
    assert reconciler.passes == 1
    waits = []
    for expected in (15.0, 30.0, 60.0):
        due = reconciler._queue.queue.due((NS, "a"))
        assert due is not None
        waits.append(due - clock.now)
        clock.advance(expected - 0.01)
        assert await reconciler.process_next() is None
        clock.advance(0.01)
        assert await reconciler.process_next() == (NS, "a")
    assert waits == [15.0, 30.0, 60.0]
    assert reconciler.passes == 2, "nothing is evaluated again before the pending status is written"
    assert len(api.patches) == 4
    assert api.patches[0][1] == api.patches[3][1], "the retry writes the same status"
    assert api.get(NS, "a")["status"]["conditions"][0]["reason"] == "InvalidSpec"
    assert [e[2] for e in api.events] == ["ConnectionTestFailed"], "Events go out once, with the write"
    troubles = [r for r in caplog.records if "Could not write the status of" in r.getMessage()]
    assert len(troubles) == 3
    assert all(r.exc_info is None for r in troubles), "an expected API error is one line, no traceback"
    # A success resets the rate limit.
    assert reconciler._queue.queue.failures((NS, "a")) == 0


async def test_a_404_on_the_status_write_forgets_the_resource(api: FakeApi) -> None:
    clock = FakeClock()
    reconciler = driven(api, clock)
    reconciler.observe(api.create(NS, "a", SPEC))
    api.delete(NS, "a")  # deleted; the DELETED event is lost (a watch ended)
    assert await reconciler.process_next() == (NS, "a")
    assert not reconciler.is_referenced("Secret", NS, "exo-app")
    assert series(reconciler.metrics, "a") == []
    clock.advance(10_000)
    assert await reconciler.process_next() is None


async def test_a_resource_deleted_during_its_pass_gets_no_status_and_no_metric_series(
    api: FakeApi, workers: Reconciler
) -> None:
    api.gate.clear()
    workers.observe(api.create(NS, "a", SPEC))
    await api.reading.wait()
    api.delete(NS, "a")
    workers.forget(NS, "a")
    api.gate.set()
    await until(lambda: workers.passes == 1 and not workers._busy, "the pass to end")
    assert api.patches == []
    assert series(workers.metrics, "a") == []


# -- defect 3: a re-list is a full resync ----------------------------------------------------------


async def test_resync_drops_what_the_list_did_not_return(api: FakeApi) -> None:
    clock = FakeClock()
    reconciler = driven(api, clock)
    a, b = api.create(NS, "a", SPEC), api.create(NS, "b", {**SPEC, "username": "b@contoso.com"})
    reconciler.resync([a, b])
    assert {await reconciler.process_next(), await reconciler.process_next()} == {(NS, "a"), (NS, "b")}
    assert series(reconciler.metrics, "b") != []
    reconciler._queue.add_after((NS, "b"), 60)
    api.delete(NS, "b")
    reconciler.resync([api.get(NS, "a")])
    assert series(reconciler.metrics, "b") == []
    assert reconciler._queue.queue.due((NS, "b")) is None
    clock.advance(3600)
    handed = [await reconciler.process_next() for _ in range(3)]
    assert (NS, "b") not in handed


# -- pause / resume and the liveness probe --------------------------------------------------------


async def test_pause_stops_workers_and_timers_and_drops_the_cache(api: FakeApi, workers: Reconciler) -> None:
    workers.observe(api.create(NS, "a", SPEC))
    await until(lambda: api.patches != [], "the first write")
    await workers.pause()
    assert workers.paused
    assert workers.health() is None, "a standby replica is alive"
    assert series(workers.metrics, "a") == []
    assert not workers.is_referenced("Secret", NS, "exo-app")
    workers.observe(api.edit(NS, "a"))  # ignored while paused
    await asyncio.sleep(0.02)
    assert workers.passes == 1
    workers.resume()
    workers.resync([api.get(NS, "a")])
    await until(lambda: api.get(NS, "a")["status"]["observedGeneration"] == 2, "a pass after resume")
    assert workers.health() is None


async def test_a_dead_worker_fails_the_liveness_probe(api: FakeApi, workers: Reconciler) -> None:
    memo = kopf.Memo()
    memo.reconciler = workers
    assert await startup.reconciler_alive(memo=memo) == "ok"
    workers._tasks[1].cancel()
    await asyncio.sleep(0)
    with pytest.raises(kopf.PermanentError, match="reconciler-1"):
        await startup.reconciler_alive(memo=memo)


async def test_a_stalled_loop_fails_the_liveness_probe(api: FakeApi) -> None:
    reconciler = Reconciler(api, TokenProvider(), Metrics(), max_loop_lag=0.2)  # type: ignore[arg-type]
    reconciler.start()
    try:
        await asyncio.sleep(0.01)
        assert reconciler.health() is None
        time.sleep(0.3)  # the point: something blocks the loop
        assert "event loop did not run" in (reconciler.health() or "")
        await asyncio.sleep(0.06)  # the heartbeat wakes up, 0.3 s late
        assert "event loop stalled for" in (reconciler.health() or "")
        assert "event loop stalled for" in (reconciler.health() or ""), "not used up by one probe"
        await asyncio.sleep(0.25)
        assert reconciler.health() is None, "healthy again max_loop_lag after the stall"
    finally:
        await reconciler.stop()


async def test_a_pass_outliving_its_deadline_fails_the_liveness_probe(api: FakeApi) -> None:
    reconciler = Reconciler(api, TokenProvider(), Metrics(), pass_deadline=0.1)  # type: ignore[arg-type]
    reconciler._busy[0] = ((NS, "a"), asyncio.get_running_loop().time() - 61)
    reconciler.start()
    try:
        assert "outlived its deadline" in (reconciler.health() or "")
    finally:
        await reconciler.stop()


async def test_a_pass_deadline_frees_the_worker_and_backs_off(api: FakeApi) -> None:
    clock = FakeClock()
    reconciler = Reconciler(
        api, TokenProvider(), Metrics(), monotonic=clock, jitter=lambda: 1.0, pass_deadline=0.05
    )  # type: ignore[arg-type]
    api.gate.clear()  # every read hangs
    reconciler.observe(api.create(NS, "a", SPEC))
    assert await asyncio.wait_for(reconciler.process_next(), 2) == (NS, "a")
    assert reconciler._queue.queue.due((NS, "a")) == clock.now + 15.0


async def test_the_secret_a_renewal_switched_to_is_referenced_too(api: FakeApi) -> None:
    """A deleted or edited {name}-renewed must cause a pass, like the spec's own Secret (not indexed before)."""
    reconciler = Reconciler(api, TokenProvider(), Metrics())  # type: ignore[arg-type]
    spec = copy.deepcopy(SPEC)
    spec["identity"]["discovery"] = {"graph": True}
    spec["identity"]["clientSecret"]["renewal"] = {}
    body = api.create(NS, "a", spec)
    reconciler.observe(body)
    assert reconciler.is_referenced("Secret", NS, "exo-app")
    assert not reconciler.is_referenced("Secret", NS, "a-renewed")
    switched = copy.deepcopy(body)
    switched["metadata"]["resourceVersion"] = str(int(body["metadata"]["resourceVersion"]) + 1)
    switched["status"] = {"renewal": {"kind": "ClientSecret", "phase": "Active", "secretName": "a-renewed"}}
    reconciler.observe(switched)  # a status-only change: no pass needed, but the index follows it
    assert reconciler.is_referenced("Secret", NS, "a-renewed")
    assert reconciler.is_referenced("Secret", NS, "exo-app")  # the SealedSecret may update it; still watched
