"""The relay's cluster feed without a cluster: the informers' callbacks driven by hand, the objects read from
an in-memory source (what the check CLI reads manifests with), the routes it builds checked."""

from __future__ import annotations

import asyncio
from typing import Any

from smtp_oauth_operator.cli import ManifestSource
from smtp_oauth_operator.services.relay import Routes
from smtp_oauth_operator.services.relay_feed import RelayFeed

NS = "mail"


def _config(
    name: str, *, login_secret: str, generation: int = 1, ready: str = "True", namespace: str = NS
) -> dict[str, Any]:
    return {
        "apiVersion": "smtpoauth.dev/v1alpha1",
        "kind": "SmtpOAuthConfig",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "generation": generation,
            "resourceVersion": str(generation),
        },
        "spec": {
            "username": "alerts@contoso.com",
            "identity": {
                "tenantId": "0d9b8c6e-1f2a-4b3c-9d8e-7f6a5b4c3d2e",
                "clientId": "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
                "clientSecret": {"secretKeyRef": {"name": "exo-app", "key": "client-secret"}},
            },
            "relay": {"enabled": True, "credentialsSecretRef": {"name": login_secret}},
        },
        "status": {
            "conditions": [
                {"type": "Ready", "status": ready, "reason": "ConnectionTested", "observedGeneration": 1}
            ]
        },
    }


def _secret(name: str, data: dict[str, str], version: str = "1", namespace: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": version},
        "stringData": data,
    }


async def _settle(feed: RelayFeed) -> None:
    for _ in range(50):
        if not feed._tasks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("routes still being built")


async def test_routes_follow_lists_events_and_secret_changes() -> None:
    source = ManifestSource(
        [
            _secret("exo-app", {"client-secret": "s"}),
            _secret("login-a", {"username": "grafana", "password": "pw1"}),
        ]
    )
    routes = Routes()
    feed = RelayFeed(routes, source, None, [NS])  # type: ignore[arg-type]  # any ObjectSource reads
    feed._resync(NS, [_config("a", login_secret="login-a")])
    await _settle(feed)
    assert feed.synced.is_set()
    route = routes.find("GRAFANA")
    assert route is not None
    assert route.ready
    assert route.password == "pw1"

    # The password is rotated: the Secret's event rebuilds the route from a fresh read.
    source._objects[("Secret", NS, "login-a")] = ManifestSource(
        [_secret("login-a", {"username": "grafana", "password": "pw2"}, "2")]
    )._objects[("Secret", NS, "login-a")]
    feed._secret_event("MODIFIED", {"metadata": {"name": "login-a", "namespace": NS, "resourceVersion": "2"}})
    await _settle(feed)
    assert routes.find("grafana").password == "pw2"  # type: ignore[union-attr]

    # A new generation the operator has not tested yet is not Ready.
    feed._event("MODIFIED", _config("a", login_secret="login-a", generation=2))
    await _settle(feed)
    assert routes.find("grafana").ready is False  # type: ignore[union-attr]

    # A re-list without it (deleted while the watch was down) drops it.
    feed._resync(NS, [])
    await _settle(feed)
    assert routes.find("grafana") is None
    assert len(routes) == 0


async def test_a_login_claimed_twice_serves_neither_and_a_missing_secret_is_not_served() -> None:
    source = ManifestSource(
        [
            _secret("exo-app", {"client-secret": "s"}),
            _secret("login-a", {"username": "grafana", "password": "a"}),
            _secret("login-b", {"username": "grafana", "password": "b"}),
        ]
    )
    routes = Routes()
    feed = RelayFeed(routes, source, None, [NS])  # type: ignore[arg-type]
    feed._resync(
        NS,
        [
            _config("a", login_secret="login-a"),
            _config("b", login_secret="login-b"),
            _config("c", login_secret="nope"),
        ],
    )
    await _settle(feed)
    assert routes.find("grafana") is None
    assert len(routes) == 2
    feed._event("DELETED", _config("b", login_secret="login-b"))
    await _settle(feed)
    assert routes.find("grafana").name == "a"  # type: ignore[union-attr]


async def test_a_namespace_relist_speaks_only_for_its_namespace() -> None:
    """With ``-n mail -n ops`` each namespace has its own informers: a re-list of one must not drop the
    other's routes, and the relay is synced only once every namespace has been listed."""
    source = ManifestSource(
        [
            _secret("exo-app", {"client-secret": "s"}),
            _secret("login-a", {"username": "grafana", "password": "a"}),
            _secret("exo-app", {"client-secret": "s"}, namespace="ops"),
            _secret("login-b", {"username": "kibana", "password": "b"}, namespace="ops"),
        ]
    )
    routes = Routes()
    feed = RelayFeed(routes, source, None, [NS, "ops"])  # type: ignore[arg-type]
    feed._resync(NS, [_config("a", login_secret="login-a")])
    await _settle(feed)
    assert not feed.synced.is_set()  # "ops" not listed yet: not ready to answer logins
    feed._resync("ops", [_config("b", login_secret="login-b", namespace="ops")])
    await _settle(feed)
    assert feed.synced.is_set()
    feed._resync(NS, [_config("a", login_secret="login-a")])  # mail's watch re-lists
    await _settle(feed)
    assert routes.find("kibana") is not None
    assert routes.find("grafana") is not None
    feed._resync("ops", [])
    await _settle(feed)
    assert routes.find("kibana") is None
    assert routes.find("grafana") is not None
