"""The relay's pure rules with a fake clock: local limits, the failed-login delay, reply mapping."""

from __future__ import annotations

from smtp_oauth_operator.domain.relay import (
    LoginThrottle,
    MailboxLimits,
    credentials_match,
    merge_refusals,
    one_line,
    upstream_answer,
)

MBX = "alerts@contoso.com"


def test_messages_per_minute_slide() -> None:
    limits = MailboxLimits()
    for i in range(3):
        assert limits.take(MBX, 1, per_minute=3, per_day=100, now=100.0 + i) is None
    refusal = limits.take(MBX, 1, per_minute=3, per_day=100, now=110.0)
    assert refusal is not None
    assert str(refusal) == f"451 4.7.0 Rate limit: {MBX} may send 3 messages a minute; try again in 50 s"
    assert limits.check_message(MBX.upper(), 3, 159.0) is not None  # the same mailbox, any case
    assert limits.check_message(MBX, 3, 160.0) is None  # the first one left the window
    assert limits.check_message("other@contoso.com", 3, 110.0) is None


def test_recipients_per_day_and_refused_takes_count_nothing() -> None:
    limits = MailboxLimits()
    assert limits.take(MBX, 8, per_minute=100, per_day=10, now=0.0) is None
    assert limits.check_recipients(MBX, 2, 10, 1.0) is None
    assert limits.check_recipients(MBX, 3, 10, 1.0) is not None
    assert limits.take(MBX, 3, per_minute=100, per_day=10, now=2.0) is not None
    assert limits.take(MBX, 2, per_minute=100, per_day=10, now=3.0) is None  # the refused 3 were not counted
    assert limits.take(MBX, 1, per_minute=100, per_day=10, now=4.0) is not None
    assert limits.take(MBX, 10, per_minute=100, per_day=10, now=86_404.0) is None  # a day after the last


def test_failed_logins_double_up_to_the_cap_and_success_clears() -> None:
    throttle = LoginThrottle(base=1.0, cap=8.0, window=900.0)
    assert [throttle.failed("10.0.0.1", float(t)) for t in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert throttle.failed("10.0.0.2", 6.0) == 1.0  # per address
    assert throttle.failures("10.0.0.1", 905.5) == 0  # all outside the window
    assert throttle.failed("10.0.0.1", 906.0) == 1.0
    throttle.succeeded("10.0.0.2")
    assert throttle.failures("10.0.0.2", 7.0) == 0


def test_throttle_memory_is_bounded() -> None:
    throttle = LoginThrottle(max_addresses=3)
    for i in range(10):
        throttle.failed(f"10.0.0.{i}", float(i))
    assert sum(throttle.failures(f"10.0.0.{i}", 10.0) for i in range(10)) == 3


def test_credentials_compare_user_case_insensitively_and_password_exactly() -> None:
    assert credentials_match("Grafana", "pw", "grafana", "pw")
    assert not credentials_match("grafana", "PW", "grafana", "pw")
    assert not credentials_match("grafana2", "pw", "grafana", "pw")


def test_upstream_answers() -> None:
    queued = "2.6.0 <abc@host> [InternalId=1, Hostname=H] 10 bytes in 0.012, 80.123 KB/sec Queued mail for delivery"
    assert upstream_answer(250, queued) == f"250 {queued}"
    assert upstream_answer(251, "") == "250 2.0.0 OK"
    assert upstream_answer(451, "4.3.2 Temporary server error.\nPlease try again later") == (
        "451 4.3.2 Temporary server error. Please try again later"
    )
    assert upstream_answer(554, "5.2.252 SendAsDenied;\r\n\x07x") == "554 5.2.252 SendAsDenied; ?x"
    assert upstream_answer(550, "") == "550 5.0.0 Exchange Online refused the message"
    assert upstream_answer(354, "go ahead") == "451 4.3.0 Exchange Online answered 354 go ahead"
    assert one_line("a" * 1000) == "a" * 400


def test_merge_refusals_prefers_temporary() -> None:
    assert merge_refusals([(550, "5.1.1 unknown"), (452, "4.5.3 too many")]) == (452, "4.5.3 too many")
    assert merge_refusals([(550, "5.1.1 unknown"), (553, "5.1.3 bad")]) == (550, "5.1.1 unknown")


def test_readiness_is_the_operators_ready_condition_for_this_generation() -> None:
    from smtp_oauth_operator.services.relay_feed import readiness  # noqa: PLC0415

    def body(generation: int, observed: int, status: str, reason: str = "Tested") -> dict[str, object]:
        condition = {"type": "Ready", "status": status, "reason": reason, "observedGeneration": observed}
        return {"metadata": {"generation": generation}, "status": {"conditions": [condition]}}

    assert readiness(body(3, 3, "True")) == (True, "Tested")
    assert readiness(body(3, 3, "False", "AuthenticationRejected")) == (False, "AuthenticationRejected")
    assert readiness(body(4, 3, "True")) == (False, "NotYetTested")  # the spec changed since the test
    assert readiness({"metadata": {"generation": 1}}) == (False, "NotYetTested")
