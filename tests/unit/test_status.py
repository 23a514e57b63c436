"""domain/status.py: conditions, transitions, Events and alarms, pass after pass with a fixed clock."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from smtp_oauth_operator.domain.expiry import evaluate
from smtp_oauth_operator.domain.protection import assess
from smtp_oauth_operator.domain.reasons import CheckFailed, ConditionType, Reason
from smtp_oauth_operator.domain.status import ConnectionTestResult, Decision, Observation, decide

T0 = datetime(2027, 5, 1, 12, 0, tzinfo=UTC)
EXPIRES = datetime(2027, 5, 31, tzinfo=UTC)
SEALED = {
    "ownerReferences": [{"apiVersion": "bitnami.com/v1alpha1", "kind": "SealedSecret", "name": "exo-app"}],
    "labels": {"velero.io/exclude-from-backup": "true"},
}


def observe(
    now: datetime = T0,
    *,
    failure: CheckFailed | None = None,
    tested: bool = True,
    expires: datetime | None = EXPIRES,
    metadata: dict[str, Any] | None = None,
    policy: str = "Warn",
    generation: int = 1,
) -> Observation:
    test = ConnectionTestResult(
        failure, now, 0.2, "fp", "https://idp/t/oauth2/v2.0/token", "s", "h:587 (StartTLS)"
    )
    return Observation(
        generation=generation,
        now=now,
        client_id="app-id",
        secret_name="mail/exo-app",
        test=test if tested else None,
        expiry=evaluate(expires, now, (30, 14, 7, 1)),
        protection=assess("mail/exo-app", metadata if metadata is not None else SEALED, policy),
        policy=policy,
        handled_recheck=None,
        next_test_time=now + timedelta(hours=1),
        consecutive_failures=1 if failure else 0,
    )


def cond(decision: Decision, ctype: ConditionType) -> dict[str, Any]:
    return next(c for c in decision.status["conditions"] if c["type"] == ctype)


def reasons(decision: Decision) -> list[str]:
    return [e.reason for e in decision.events]


def test_success_sets_every_condition_and_one_event() -> None:
    d = decide(None, observe())
    assert cond(d, ConditionType.READY)["status"] == "True"
    assert cond(d, ConditionType.READY)["reason"] == "ConnectionTested"
    for step in (
        ConditionType.SECRET_RESOLVED,
        ConditionType.TOKEN_ACQUIRED,
        ConditionType.SMTP_AUTHENTICATED,
    ):
        assert cond(d, step)["status"] == "True"
    assert cond(d, ConditionType.SECRET_PROTECTED)["reason"] == "Protected"
    assert cond(d, ConditionType.CREDENTIAL_EXPIRING)["status"] == "True"  # 30 days before: the window opens
    assert all(c["observedGeneration"] == 1 for c in d.status["conditions"])
    assert reasons(d) == ["ConnectionTestSucceeded", "ClientSecretExpiringSoon"]
    assert d.status["tokenEndpoint"] == "https://idp/t/oauth2/v2.0/token"


def test_same_outcome_again_is_the_same_status_and_no_event() -> None:
    first = decide(None, observe())
    later = T0 + timedelta(minutes=5)
    second = decide(first.status, replace(observe(later), test=None, next_test_time=T0 + timedelta(hours=1)))
    assert second.events == []
    assert second.status == first.status | {"nextTestTime": first.status["nextTestTime"]}


def test_last_transition_time_moves_only_on_flips() -> None:
    first = decide(None, observe())
    bad = CheckFailed(Reason.INVALID_CLIENT_SECRET, "refused")
    t1 = T0 + timedelta(hours=1)
    second = decide(first.status, observe(t1, failure=bad))
    assert cond(second, ConditionType.READY)["lastTransitionTime"] == "2027-05-01T13:00:00Z"
    assert cond(second, ConditionType.SECRET_RESOLVED)["lastTransitionTime"] == "2027-05-01T12:00:00Z"
    assert cond(second, ConditionType.TOKEN_ACQUIRED)["status"] == "False"
    assert cond(second, ConditionType.SMTP_AUTHENTICATED) | {} == cond(
        second, ConditionType.SMTP_AUTHENTICATED
    )
    assert cond(second, ConditionType.SMTP_AUTHENTICATED)["reason"] == "NotTested"
    assert reasons(second) == ["ConnectionTestFailed"]
    assert "Put the client secret's Value" in second.events[0].message


def test_failure_reason_change_posts_a_new_event_same_reason_does_not() -> None:
    a = decide(None, observe(failure=CheckFailed(Reason.THROTTLED, "429")))
    b = decide(a.status, observe(T0 + timedelta(minutes=1), failure=CheckFailed(Reason.THROTTLED, "429")))
    c = decide(
        b.status,
        observe(T0 + timedelta(minutes=2), failure=CheckFailed(Reason.IDENTITY_PROVIDER_UNAVAILABLE, "503")),
    )
    assert "ConnectionTestFailed" in reasons(a)
    assert "ConnectionTestFailed" not in reasons(b)
    assert reasons(c) == ["ConnectionTestFailed"]


def test_expiry_alarm_once_per_threshold_and_survives_restart() -> None:
    status: dict[str, Any] | None = None
    seen: list[tuple[str, int | None]] = []
    now = EXPIRES - timedelta(days=31)
    while now < EXPIRES + timedelta(days=2):
        d = decide(status, observe(now, tested=status is None))
        for e in d.events:
            if e.reason.startswith("ClientSecret"):
                last = d.status.get("lastAlarm", {})
                seen.append((e.reason, last.get("thresholdDays")))
        status = d.status
        now += timedelta(hours=6)
    assert seen == [
        ("ClientSecretExpiringSoon", 30),
        ("ClientSecretExpiringSoon", 14),
        ("ClientSecretExpiringSoon", 7),
        ("ClientSecretExpiringSoon", 1),
        ("ClientSecretExpired", None),
    ]
    assert status is not None
    assert [h["type"] for h in status["alarmHistory"]][-1] == "ClientSecretExpired"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ClientSecretExpired")


def test_created_three_days_before_expiry_alarms_once_at_seven() -> None:
    d = decide(None, observe(EXPIRES - timedelta(days=3)))
    assert reasons(d).count("ClientSecretExpiringSoon") == 1
    assert d.alarm is not None
    assert d.status["lastAlarm"]["thresholdDays"] == 7
    assert "in 3 days" in d.alarm.body


def test_rotation_later_clears_and_posts_rotated() -> None:
    first = decide(None, observe(EXPIRES - timedelta(days=3)))
    later = EXPIRES + timedelta(days=365)
    second = decide(first.status, observe(EXPIRES - timedelta(days=2), expires=later))
    assert "ClientSecretRotated" in reasons(second)
    assert cond(second, ConditionType.CREDENTIAL_EXPIRING)["status"] == "False"
    assert "lastAlarm" not in second.status


def test_date_moved_earlier_raises_the_new_threshold() -> None:
    first = decide(None, observe(EXPIRES - timedelta(days=20)))
    earlier = EXPIRES - timedelta(days=17)  # now 3 days away
    second = decide(first.status, observe(EXPIRES - timedelta(days=20), expires=earlier))
    assert "ClientSecretRotated" not in reasons(second)
    assert second.status["lastAlarm"]["thresholdDays"] == 7


def test_idp_expired_wins_over_the_spec_date() -> None:
    d = decide(None, observe(failure=CheckFailed(Reason.CLIENT_SECRET_EXPIRED, "AADSTS7000222")))
    assert cond(d, ConditionType.CREDENTIAL_EXPIRING)["reason"] == "Expired"
    assert cond(d, ConditionType.READY)["reason"] == "ClientSecretExpired"


def test_unknown_expiry_and_unprotected_secret() -> None:
    d = decide(None, observe(expires=None, metadata={}))
    assert cond(d, ConditionType.CREDENTIAL_EXPIRING)["status"] == "Unknown"
    assert cond(d, ConditionType.SECRET_PROTECTED)["reason"] == "NotSealed"
    assert cond(d, ConditionType.READY)["status"] == "True"  # Warn: Ready unaffected
    assert "SecretNotProtected" in reasons(d)
    again = decide(d.status, observe(T0 + timedelta(minutes=1), expires=None, metadata={}))
    assert "SecretNotProtected" not in reasons(again)


def test_require_policy_blocks_ready() -> None:
    unlabelled = {"ownerReferences": SEALED["ownerReferences"]}
    d = decide(None, observe(metadata=unlabelled, policy="Require"))
    assert cond(d, ConditionType.SECRET_PROTECTED)["reason"] == "NotExcludedFromBackup"
    assert "spec.template.metadata.labels" in cond(d, ConditionType.SECRET_PROTECTED)["message"]
    assert cond(d, ConditionType.READY)["reason"] == "SecretNotProtected"


def test_generation_is_recorded() -> None:
    d = decide(None, observe(generation=7))
    assert d.status["observedGeneration"] == 7
    assert {c["observedGeneration"] for c in d.status["conditions"]} == {7}


def test_failed_alarm_email_is_retried_without_a_new_event() -> None:
    first = decide(None, observe(EXPIRES - timedelta(days=3)))
    assert first.alarm is not None
    assert not first.alarm.retry
    first.status["lastAlarm"]["notified"] = False  # what the reconciler records when the e-mail failed
    again = decide(first.status, observe(EXPIRES - timedelta(days=3) + timedelta(hours=1), tested=False))
    assert again.alarm is not None
    assert again.alarm.retry
    assert again.alarm.kind == "ClientSecretExpiringSoon"
    assert "ClientSecretExpiringSoon" not in reasons(again)
    first.status["lastAlarm"]["notified"] = True
    done = decide(first.status, observe(EXPIRES - timedelta(days=3) + timedelta(hours=1), tested=False))
    assert done.alarm is None


def test_an_alarm_e_mail_interrupted_while_sending_is_not_sent_again() -> None:
    first = decide(None, observe(EXPIRES - timedelta(days=3)))
    assert first.alarm is not None
    # What the reconciler writes before sending; a process that stopped before the outcome left it.
    first.status["lastAlarm"]["sending"] = True
    later = EXPIRES - timedelta(days=3) + timedelta(minutes=5)
    after = decide(first.status, observe(later, tested=False))
    assert after.alarm is None, "at most once: an e-mail whose outcome is unknown is not sent again"
    assert "sending" not in after.status["lastAlarm"]
    assert "notified" not in after.status["lastAlarm"], "the outcome stays unknown"
    assert after.status["lastAlarm"]["type"] == "ClientSecretExpiringSoon"
    unknown = [e for e in after.events if e.reason == "AlarmNotificationUnknown"]
    assert len(unknown) == 1
    assert unknown[0].type == "Warning"
    assert "inbox" in unknown[0].message
    assert "ClientSecretExpiringSoon" not in reasons(after), "the alarm itself is not raised again"
    # Recorded: the next pass says nothing more.
    again = decide(after.status, observe(later + timedelta(minutes=5), tested=False))
    assert again.alarm is None
    assert "AlarmNotificationUnknown" not in reasons(again)


def test_relay_endpoint_is_in_status_only_while_given_and_goes_when_not() -> None:
    endpoint = "smtp-smtp-oauth-operator-relay.mail-system.svc:587"
    relayed = decide(None, replace(observe(), relay_endpoint=endpoint))
    assert relayed.status["relay"] == {"endpoint": endpoint}
    # A later pass with nothing new keeps it as it is (no write of its own).
    again = decide(
        relayed.status, replace(observe(T0 + timedelta(minutes=5), tested=False), relay_endpoint=endpoint)
    )
    assert again.status["relay"] == {"endpoint": endpoint}
    # Relay disabled in the spec (or not installed): the field goes, whatever the previous status held.
    disabled = decide(again.status, observe(T0 + timedelta(minutes=10), tested=False))
    assert "relay" not in disabled.status
    assert "relay" not in decide(None, observe()).status
