"""The reconciler under API faults and dead peers, with the real local Entra ID and Exchange stand-ins.

The API server is tests/fakeapi.py (our own Kube interface); msal, requests and aiosmtplib talk TLS to
the stand-ins. The clock of the work queue is fake, so retries are stepped, not slept.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.fakeapi import FakeApi

from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.clients.kube import KubeUnavailable
from smtp_oauth_operator.clients.metrics import Metrics
from smtp_oauth_operator.domain.reasons import CheckFailed, Reason
from smtp_oauth_operator.domain.spec import parse_spec
from smtp_oauth_operator.services.connection import resolve, run
from smtp_oauth_operator.services.reconciler import Reconciler
from smtp_oauth_operator.testing.peers import SilentServer

from .conftest import CANARY, TENANT, Peers

NS = "mail"
ADMIN = "admin@contoso.com"
OPS = "ops@contoso.com"


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def _api(peers: Peers, *, threaded: bool = False) -> FakeApi:
    api = FakeApi(threaded=threaded)
    api.put_configmap(NS, "trust", {"ca.pem": peers.ca.cert_pem})
    api.put_secret(NS, "exo-app", {"client-secret": CANARY})
    return api


def _expiring_spec(peers: Peers) -> dict[str, Any]:
    expires = (datetime.now(UTC) + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return peers.spec(
        **{
            "alarms.notify.to": [ADMIN],
            "testMessage.to": OPS,
            "identity.clientSecret.expiresAt": expires,
        }
    )


def _to(peers: Peers, address: str) -> int:
    return sum(1 for m in peers.smtp.messages if address in m.rcpt_tos)


async def test_failing_status_writes_never_repeat_the_alarm_or_the_test_message(peers: Peers) -> None:
    api = _api(peers)
    clock = FakeClock()
    reconciler = Reconciler(api, TokenProvider(), Metrics(), monotonic=clock, jitter=lambda: 1.0)  # type: ignore[arg-type]
    # What the API server may do to a status patch: 403 (RBAC), 5xx, a timeout.
    api.patch_faults = [
        CheckFailed(Reason.ACCESS_DENIED, "the operator's ServiceAccount may not patch (HTTP 403 Forbidden)"),
        KubeUnavailable("patch smtpoauthconfigs/status mail/mail: HTTP 500 Internal Server Error"),
        KubeUnavailable("patch smtpoauthconfigs/status mail/mail: ReadTimeoutError"),
        KubeUnavailable("patch smtpoauthconfigs/status mail/mail: HTTP 503 Service Unavailable"),
        CheckFailed(Reason.ACCESS_DENIED, "the operator's ServiceAccount may not patch (HTTP 403 Forbidden)"),
    ]
    created = api.create(NS, "mail", _expiring_spec(peers))
    reconciler.observe(created)
    assert await reconciler.process_next() == (NS, "mail")
    # Nothing is sent before the status says it will be (at most once, also across a restart).
    assert (_to(peers, ADMIN), _to(peers, OPS)) == (0, 0)

    for _ in range(len(api.patch_faults) + 1):
        # Meanwhile: a re-list returns the resource without our status, a Secret event pokes it.
        reconciler.resync([api.get(NS, "mail")])
        reconciler.poke("Secret", NS, "exo-app")
        assert await reconciler.process_next() == (NS, "mail")
        due = reconciler._queue.queue.due((NS, "mail"))
        if due is not None:
            clock.now = due

    status = api.get(NS, "mail")["status"]
    assert status["lastAlarm"]["type"] == "ClientSecretExpiringSoon"
    assert status["lastAlarm"]["notified"] is True
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Ready"] == ["ConnectionTested"]
    assert (_to(peers, ADMIN), _to(peers, OPS)) == (1, 1), "an e-mail was sent again"
    assert [e[2] for e in api.events].count("ClientSecretExpiringSoon") == 1


@pytest.mark.parametrize("written", [0, 1, 2, 3], ids=lambda n: f"killed-after-{n}-writes")
async def test_an_operator_killed_at_any_status_write_never_repeats_an_e_mail(
    peers: Peers, written: int
) -> None:
    """SIGKILL while a status write of the pass fails (an API outage): the next process must not
    send again what the first one may have sent (issue 10: operator-sigkill)."""
    api = _api(peers)
    clock = FakeClock()
    first = Reconciler(api, TokenProvider(), Metrics(), monotonic=clock, jitter=lambda: 1.0)  # type: ignore[arg-type]
    # The first ``written`` status writes land, every later one fails; then the process dies.
    api.patch_faults = [None] * written + [
        KubeUnavailable("patch smtpoauthconfigs/status mail/mail: ReadTimeoutError")
    ] * 10
    first.observe(api.create(NS, "mail", _expiring_spec(peers)))
    assert await first.process_next() == (NS, "mail")
    before = (_to(peers, ADMIN), _to(peers, OPS))
    assert max(before) <= 1
    del first  # SIGKILL: its memory (the pending status) is gone
    logins = len(peers.smtp.auth_attempts)

    api.patch_faults = []
    second = Reconciler(api, TokenProvider(), Metrics(), monotonic=clock, jitter=lambda: 1.0)  # type: ignore[arg-type]
    second.observe(api.get(NS, "mail"))
    while await second.process_next() is not None:
        pass
    sent = (_to(peers, ADMIN), _to(peers, OPS))
    assert max(sent) <= 1, f"an e-mail was sent again after the restart: {before} → {sent}"
    status = api.get(NS, "mail")["status"]
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Ready"] == ["ConnectionTested"]
    assert status["lastAlarm"]["type"] == "ClientSecretExpiringSoon"
    assert "sending" not in status["lastAlarm"]
    assert "testMessageTrigger" not in status
    reasons = [e[2] for e in api.events]
    assert reasons.count("ClientSecretExpiringSoon") == 1
    if written == 0:
        # Nothing had been sent: the restarted process sends both, once.
        assert before == (0, 0)
        assert sent == (1, 1)
        assert status["lastAlarm"]["notified"] is True
    if written == 1:
        # The test message left, its test's result was not written: the login is tested again, alone.
        assert len(peers.smtp.auth_attempts) > logins
    if written == 2:
        # The alarm e-mail left between the write announcing it and the one recording its outcome:
        # the next process does not know whether it arrived, says so, and does not send it again.
        assert sent == (1, 1)
        assert "notified" not in status["lastAlarm"]
        assert reasons.count("AlarmNotificationUnknown") == 1
    else:
        assert "AlarmNotificationUnknown" not in reasons


async def test_a_black_holed_identity_provider_does_not_delay_healthy_resources(peers: Peers) -> None:
    # The fake API blocks a thread of asyncio's default pool per call, as a synchronous client does:
    # if MSAL's requests shared that pool, the healthy resource's reads and writes would queue behind
    # the black-holed token requests (30 s each).
    api = _api(peers, threaded=True)
    reconciler = Reconciler(api, TokenProvider(), Metrics(), workers=24)  # type: ignore[arg-type]
    reconciler.start()
    try:
        with SilentServer(hold=60) as hole:
            for i in range(16):
                spec = peers.spec(
                    **{
                        "identity.authorityHost": f"https://127.0.0.1:{hole.port}",
                        "identity.clientId": f"22222222-2222-4222-8222-{i:012d}",
                        "identity.timeoutSeconds": 30,
                    }
                )
                reconciler.observe(api.create(NS, f"dark-{i}", spec))
            deadline = time.monotonic() + 10
            while hole.connections < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert hole.connections >= 4, "the black-holed token requests did not start"
            started = time.monotonic()
            reconciler.observe(api.create(NS, "healthy", peers.spec()))
            while time.monotonic() - started < 20:
                status = api.configs[(NS, "healthy")].get("status") or {}
                if status.get("conditions"):
                    break
                await asyncio.sleep(0.05)
            took = time.monotonic() - started
            print(f"healthy resource Ready in {took:.2f} s beside 16 black-holed ones")
            assert status.get("conditions"), f"no status for the healthy resource after {took:.0f} s"
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            assert (ready["status"], ready["reason"]) == ("True", "ConnectionTested"), ready
            # Functional bound, not a benchmark: far below the 30 s the black hole holds a request.
            assert took < 10, f"the healthy resource waited {took:.1f} s behind the black hole"
            assert hole.connections == 4, "one identity provider holds at most its share of the pool"
    finally:
        await reconciler.stop()


async def test_the_token_step_deadline_is_identity_provider_unreachable(peers: Peers) -> None:
    peers.idp.hang(tenant=TENANT)
    api = _api(peers)
    spec = parse_spec(peers.spec())
    inputs = await resolve(spec, NS, 1, api)
    started = time.monotonic()
    result = await run(spec, inputs, TokenProvider(), where="mail/mail", deadline=0.5)
    assert time.monotonic() - started < 5
    assert result.failure is not None
    assert result.failure.reason is Reason.IDENTITY_PROVIDER_UNREACHABLE
    assert result.failure.transient
    assert "did not issue a token within 0.5 s" in result.failure.message


async def test_the_smtp_step_deadline_is_smtp_connection_timeout(peers: Peers) -> None:
    with SilentServer(hold=30) as silent:
        api = _api(peers)
        spec = parse_spec(peers.spec(**{"smtp.port": silent.port}))
        inputs = await resolve(spec, NS, 1, api)
        result = await run(spec, inputs, TokenProvider(), where="mail/mail", deadline=0.5)
    assert result.failure is not None
    assert result.failure.reason is Reason.SMTP_CONNECTION_TIMEOUT
    assert result.failure.transient
    assert "did not end within 0.5 s" in result.failure.message
