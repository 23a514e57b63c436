"""services/feed.py: what the reconciler is told after events, re-lists, pauses and resumes.

The reconciler here is a recorder of the calls (the interface the feed is written against, see
``Reconciling``); the token cache is the real one. No informer runs: the tests call the callbacks the
informers call, in the orders a watch can produce.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

import kubernetes

from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.clients.watching import ApiConnection
from smtp_oauth_operator.services.feed import Feed


class Recorder:
    def __init__(self, refs: set[tuple[str, str, str]]) -> None:
        self.refs = refs
        self.calls: list[tuple[Any, ...]] = []
        self.paused = False

    def observe(self, body: Mapping[str, Any]) -> None:
        self.calls.append(("observe", body["metadata"]["name"]))

    def forget(self, namespace: str, name: str) -> None:
        self.calls.append(("forget", name))

    def resync(self, bodies: Iterable[Mapping[str, Any]]) -> None:
        self.calls.append(("resync", sorted(b["metadata"]["name"] for b in bodies)))

    def poke(self, kind: str, namespace: str, name: str) -> None:
        self.calls.append(("poke", kind, name))

    def is_referenced(self, kind: str, namespace: str, name: str) -> bool:
        return (kind, namespace, name) in self.refs

    async def pause(self) -> None:
        self.paused = True
        self.calls.append(("pause",))

    def resume(self) -> None:
        self.paused = False
        self.calls.append(("resume",))


def _obj(name: str, version: str = "1", namespace: str = "mail") -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name, "resourceVersion": version}}


def _feed(
    refs: set[tuple[str, str, str]], namespaces: list[str] | None = None
) -> tuple[Feed, Recorder, TokenProvider]:
    configuration = kubernetes.client.Configuration()
    configuration.host = "https://127.0.0.1:9"
    recorder = Recorder(refs)
    tokens = TokenProvider()
    return Feed(ApiConnection(configuration), recorder, tokens, namespaces), recorder, tokens


def test_a_relist_pokes_exactly_the_referenced_objects_that_changed_or_vanished() -> None:
    feed, rec, _ = _feed({("Secret", "mail", "a"), ("Secret", "mail", "b"), ("Secret", "mail", "c")})
    feed._fresh = {("Secret", None), ("ConfigMap", None)}  # as after start()
    feed._resync_sources(
        "Secret", None, [_obj("a", "1"), _obj("b", "1"), _obj("c", "1"), _obj("helm-release", "1")]
    )
    assert rec.calls == [], "the first list after a start pokes nothing: every resource gets a first pass"

    feed._source_event("Secret", "MODIFIED", _obj("a", "2"))
    feed._source_event("Secret", "MODIFIED", _obj("helm-release", "2"))
    assert rec.calls == [("poke", "Secret", "a")]
    rec.calls.clear()

    # The watch broke; meanwhile b changed, c was deleted, a and the unreferenced one did not matter.
    feed._resync_sources("Secret", None, [_obj("a", "2"), _obj("b", "5"), _obj("helm-release", "9")])
    assert rec.calls == [("poke", "Secret", "b"), ("poke", "Secret", "c")]
    rec.calls.clear()

    # c is back (re-created): a change for its users; nothing else moved.
    feed._resync_sources("Secret", None, [_obj("a", "2"), _obj("b", "5"), _obj("c", "11")])
    assert rec.calls == [("poke", "Secret", "c")]


def test_only_referenced_objects_are_remembered() -> None:
    feed, rec, _ = _feed({("ConfigMap", "mail", "trust")})
    feed._resync_sources("ConfigMap", None, [_obj(f"other-{i}") for i in range(1000)] + [_obj("trust")])
    feed._source_event("ConfigMap", "ADDED", _obj("yet-another"))
    assert feed._versions["ConfigMap"] == {("mail", "trust"): "1"}
    assert rec.calls == [("poke", "ConfigMap", "trust")], "not seen before this re-list: maybe changed"


def test_config_events_and_resyncs_reach_the_reconciler_and_the_token_cache() -> None:
    feed, rec, tokens = _feed(set())
    tokens._bind("mail/a", ("app-1",))
    tokens._bind("mail/b", ("app-2",))
    feed._resync_configs(None, [_obj("a"), _obj("b")])
    feed._config_event("MODIFIED", _obj("a", "2"))
    feed._config_event("DELETED", _obj("a", "3"))
    assert rec.calls == [("resync", ["a", "b"]), ("observe", "a"), ("forget", "a")]
    assert tokens._bound == {"mail/b": ("app-2",)}
    feed._resync_configs(None, [_obj("c")])  # b was deleted while the watch was down
    assert tokens._bound == {}


def test_pause_stops_the_informers_and_the_reconciler_resume_starts_them() -> None:
    async def scenario() -> None:
        feed, rec, tokens = _feed(set())
        feed.start()  # the informers fail to connect (nothing listens on port 9) and back off
        assert feed.running
        feed.start()
        assert len(feed._tasks) == 3, "started twice"
        tasks = list(feed._tasks)
        tokens._bind("mail/a", ("app-1",))

        await feed.pause()
        assert not feed.running
        assert all(t.done() for t in tasks)
        assert rec.calls == [("pause",)]
        assert tokens._bound == {}

        feed.resume()
        assert rec.calls == [("pause",), ("resume",)]
        assert feed.running
        feed.resume()  # kopf resumed an operator that was never paused: the reconciler runs already
        assert rec.calls == [("pause",), ("resume",)]
        await feed.stop()
        await feed.informers[0].api.close()

    asyncio.run(scenario())


def test_with_namespaces_a_relist_of_one_drops_only_its_own() -> None:
    feed, rec, _ = _feed({("Secret", "a", "s"), ("Secret", "b", "s")}, ["a", "b"])
    assert len(feed.informers) == 6  # three kinds per namespace: a forbidden one stops only its own
    feed._resync_configs("a", [_obj("x", namespace="a"), _obj("y", namespace="a")])
    feed._resync_configs("b", [_obj("z", namespace="b")])
    feed._config_event("ADDED", _obj("w", namespace="b"))
    rec.calls.clear()

    feed._resync_configs("a", [_obj("x", namespace="a")])  # y went while a's watch was down
    assert rec.calls == [("forget", "y"), ("observe", "x")], "b's resources must stay"
    rec.calls.clear()
    feed._resync_configs("b", [_obj("z", namespace="b")])  # w went
    assert rec.calls == [("forget", "w"), ("observe", "z")]

    rec.calls.clear()
    feed._resync_sources("Secret", "a", [_obj("s", "1", "a")])
    feed._resync_sources("Secret", "b", [_obj("s", "1", "b")])
    rec.calls.clear()
    feed._resync_sources("Secret", "a", [])  # a's Secret vanished; b's is not a's business
    assert rec.calls == [("poke", "Secret", "s")]
    assert feed._versions["Secret"] == {("b", "s"): "1"}


def _config(name: str, secret: str, namespace: str = "mail") -> dict[str, Any]:
    body = _obj(name, namespace=namespace)
    body["spec"] = {
        "username": "no-reply@contoso.com",
        "identity": {
            "tenantId": "0d9b8c6e-1f2a-4b3c-9d8e-7f6a5b4c3d2e",
            "clientId": "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
            "clientSecret": {"secretKeyRef": {"name": secret, "key": "client-secret"}},
        },
    }
    return body


def test_a_secret_listed_before_its_config_and_deleted_in_a_watch_gap_is_poked() -> None:
    # kubectl apply of a directory: the Secret exists before the SmtpOAuthConfig that references it, so
    # the first Secret list holds it unreferenced, and no event about it follows until it is deleted
    # while the watch drops its events (then 410, re-list).
    feed, rec, _ = _feed(set())
    feed._fresh = {("Secret", None), ("ConfigMap", None)}  # as after start()
    feed._resync_sources("Secret", None, [_obj("exo-app", "3"), _obj("helm-release", "4")])
    rec.refs.add(("Secret", "mail", "exo-app"))  # what the reconciler indexes when it observes:
    feed._config_event("ADDED", _config("a", "exo-app"))
    assert rec.calls == [("observe", "a")]
    rec.calls.clear()

    feed._resync_sources("Secret", None, [_obj("helm-release", "4")])
    assert rec.calls == [("poke", "Secret", "exo-app")], "its users still hold Ready from before the deletion"
    rec.calls.clear()
    feed._resync_sources("Secret", None, [_obj("helm-release", "4")])
    assert rec.calls == [], "still gone: nothing changed since the last list"


def test_a_referenced_object_first_known_from_a_relist_is_poked_once_then_not_again() -> None:
    feed, rec, _ = _feed({("Secret", "a", "exo-app")}, ["a"])
    feed._fresh = {("Secret", "a"), ("ConfigMap", "a")}
    feed._resync_sources("Secret", "a", [])  # listed before the Secret and its config were created
    feed._resync_configs("a", [_config("x", "exo-app", namespace="a")])
    rec.calls.clear()

    feed._resync_sources("Secret", "a", [_obj("exo-app", "7", "a")])
    assert rec.calls == [("poke", "Secret", "exo-app")], "never known: maybe changed"
    rec.calls.clear()
    for _ in range(3):  # an API server restarting: re-lists of unchanged objects poke nobody
        feed._resync_sources("Secret", "a", [_obj("exo-app", "7", "a")])
    assert rec.calls == []
    assert feed._versions["Secret"] == {("a", "exo-app"): "7"}


def test_a_config_deleted_before_the_relist_leaves_nothing_behind() -> None:
    feed, rec, _ = _feed(set())
    feed._fresh = set()
    rec.refs.add(("Secret", "mail", "exo-app"))
    feed._config_event("ADDED", _config("a", "exo-app"))
    rec.refs.clear()  # the reconciler forgets it, and with it the reference
    feed._config_event("DELETED", _config("a", "exo-app"))
    rec.calls.clear()
    feed._resync_sources("Secret", None, [])
    assert rec.calls == []
    assert feed._versions["Secret"] == {}
