"""Client-secret expiry on the real control plane (issue 4): condition, Events, alarm e-mails, metrics."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from e2e.fixtures import Dev, Namespace, OperatorProcess, wait_until
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

ADMIN = "admin@contoso.com"
EXPIRY_METRIC = "smtpoauth_client_secret_expiration_timestamp_seconds"


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(rfc3339: str) -> float:
    return datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def _in(days: float) -> str:
    return _rfc3339(datetime.now(UTC) + timedelta(days=days))


def _wait_events(ns: Namespace, name: str, reason: str, count: int = 1, timeout: float = 30) -> None:
    wait_until(
        lambda: ns.count_events(name, reason) >= count,
        timeout=timeout,
        what=f"{count} {reason} Event(s) for {name}",
    )


def _recheck_and_wait(ns: Namespace, name: str, value: str) -> None:
    ns.kubectl("annotate", "smtpoauthconfig", name, f"smtpoauth.dev/recheck={value}", "--overwrite")
    wait_until(
        lambda: ns.config(name)["status"].get("handledRecheck") == value,
        timeout=30,
        what=f"{name} to handle recheck {value}",
    )


def _alarm_mails(dev: Dev, app: Any) -> list[Any]:
    return [m for m in dev.messages(app) if ADMIN in m.rcpt_tos]


def test_expiring_soon_alarms_once_mails_the_admin_and_clears_on_rotation(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = dev.new_app()
    expires = _in(3)
    ns.secret(app.secret)
    clientsecret = dev.spec(app)["identity"]["clientSecret"]
    spec = dev.spec(app, alarms={"notify": {"to": [ADMIN]}})
    spec["identity"]["clientSecret"] = {**clientsecret, "expiresAt": expires}
    ns.smtp_oauth_config("mail", spec)

    obj = ns.wait_for_condition("mail", "CredentialExpiring", "True", "ExpiringSoon")
    cond = ns.condition(obj, "CredentialExpiring")
    assert cond is not None
    assert "in 2 days" in cond["message"], cond  # 3 days minus the seconds since
    assert app.client_id in cond["message"]
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    status = ns.config("mail")["status"]
    assert status["clientSecretExpiresAt"] == expires
    assert status["lastAlarm"]["type"] == "ClientSecretExpiringSoon"
    assert status["lastAlarm"]["thresholdDays"] == 7  # the most urgent threshold crossed, not 30 and 14 too

    _wait_events(ns, "mail", "ClientSecretExpiringSoon")
    events = [e for e in ns.events_for("mail") if e["reason"] == "ClientSecretExpiringSoon"]
    assert len(events) == 1, events
    assert events[0]["type"] == "Warning"
    assert "in 2 days" in events[0]["message"]
    table = ns.kubectl("events", "--for", "smtpoauthconfig/mail").stdout
    assert "ClientSecretExpiringSoon" in table

    # The alarm e-mail went out through this very configuration, to the admin.
    wait_until(lambda: _alarm_mails(dev, app), timeout=30, what="the alarm e-mail")
    mails = _alarm_mails(dev, app)
    assert len(mails) == 1, [m.message["Subject"] for m in mails]
    mail = mails[0]
    assert mail.rcpt_tos == (ADMIN,)
    assert mail.authenticated_as == dev.endpoints.mailbox
    subject = str(mail.message["Subject"])
    assert subject.startswith("[smtp-oauth-operator]"), subject
    assert app.client_id in subject
    assert "expires in 2 days" in subject
    body = mail.message.get_content()
    assert f"{ns.name}/mail" in body
    assert expires[:10] in body

    describe = ns.kubectl("describe", "smtpoauthconfig", "mail").stdout
    assert "Alarm History" in describe
    assert "ClientSecretExpiringSoon" in describe

    # An operator restart raises no second Event and sends no second e-mail.
    operator.restart()
    wait_until(lambda: operator.seen_since_start(ns.name, "mail"), timeout=30, what="the re-list")
    time.sleep(3)
    assert ns.count_events("mail", "ClientSecretExpiringSoon") == 1
    assert len(_alarm_mails(dev, app)) == 1
    # The restarted process exports the resource again without re-testing it: alerts stay armed.
    text = wait_until(
        lambda: (t := operator.metrics()) and _series(t, "smtpoauth_ready", ns.name, "mail") and t,
        timeout=10,
        what="the metrics after the restart",
    )
    assert _series(text, "smtpoauth_ready", ns.name, "mail") == [1.0]
    assert _series(text, EXPIRY_METRIC, ns.name, "mail") == [_epoch(expires)]

    # A rotation: the date moves a year ahead.
    later = _in(365)
    patch = {"spec": {"identity": {"clientSecret": {"expiresAt": later}}}}
    ns.kubectl("patch", "smtpoauthconfig", "mail", "--type=merge", "-p", json.dumps(patch))
    ns.wait_for_condition("mail", "CredentialExpiring", "False", "NotExpiring")
    _wait_events(ns, "mail", "ClientSecretRotated")
    rotated = [e for e in ns.events_for("mail") if e["reason"] == "ClientSecretRotated"]
    assert len(rotated) == 1
    assert rotated[0]["type"] == "Normal"
    status = ns.config("mail")["status"]
    assert status["clientSecretExpiresAt"] == later
    assert "lastAlarm" not in status
    assert ns.count_events("mail", "ClientSecretExpiringSoon") == 1
    assert len(_alarm_mails(dev, app)) == 1  # a rotation is good news: no alarm e-mail


def test_expires_at_key_reads_the_date_from_the_secret(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = dev.new_app()
    soon = _in(3)
    ns.secret(app.secret, extra={"expires-at": soon})
    spec = dev.spec(app)
    spec["identity"]["clientSecret"]["expiresAtKey"] = "expires-at"
    ns.smtp_oauth_config("mail", spec)
    obj = ns.wait_for_condition("mail", "CredentialExpiring", "True", "ExpiringSoon")
    assert obj["status"]["clientSecretExpiresAt"] == soon
    _wait_events(ns, "mail", "ClientSecretExpiringSoon")

    # Rotation in one commit: value and date change together in the Secret.
    new_secret = dev.new_secret()
    dev.idp.add_secret(app.tenant_id, app.client_id, new_secret)
    later = _in(365)
    ns.secret(new_secret, extra={"expires-at": later})
    obj = ns.wait_for_condition("mail", "CredentialExpiring", "False", "NotExpiring")
    assert obj["status"]["clientSecretExpiresAt"] == later
    _wait_events(ns, "mail", "ClientSecretRotated")
    assert ns.condition(ns.config("mail"), "Ready")["status"] == "True"  # type: ignore[index]


def test_a_date_already_past_means_expired(ns: Namespace, dev: Dev, operator: OperatorProcess) -> None:
    app = dev.new_app()
    ns.secret(app.secret)
    spec = dev.spec(app)
    spec["identity"]["clientSecret"]["expiresAt"] = _in(-1)
    ns.smtp_oauth_config("mail", spec)
    obj = ns.wait_for_condition("mail", "Ready", "False", "ClientSecretExpired")
    cond = ns.condition(obj, "CredentialExpiring")
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("True", "Expired")
    _wait_events(ns, "mail", "ClientSecretExpired")
    expired = [e for e in ns.events_for("mail") if e["reason"] == "ClientSecretExpired"]
    assert len(expired) == 1
    assert expired[0]["type"] == "Warning"
    assert "ClientSecretExpired" in ns.kubectl("get", "smtpoauthconfig", "mail").stdout
    # Another check (here forced) does not raise the alarm again.
    _recheck_and_wait(ns, "mail", "again")
    assert ns.count_events("mail", "ClientSecretExpired") == 1


def test_identity_provider_saying_expired_wins(ns: Namespace, dev: Dev, operator: OperatorProcess) -> None:
    app = dev.new_app(expired=True)  # Entra answers AADSTS7000222
    ns.secret(app.secret)
    spec = dev.spec(app)
    spec["identity"]["clientSecret"]["expiresAt"] = _in(365)  # whatever the spec claims
    ns.smtp_oauth_config("mail", spec)
    obj = ns.wait_for_condition("mail", "Ready", "False", "ClientSecretExpired")
    assert "AADSTS7000222" in ns.condition(obj, "TokenAcquired")["message"]  # type: ignore[index]
    cond = ns.condition(obj, "CredentialExpiring")
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("True", "Expired"), cond
    requests = dev.idp.token_requests_for(app.client_id)
    assert requests >= 1
    _wait_events(ns, "mail", "ClientSecretExpired")
    _recheck_and_wait(ns, "mail", "again")
    assert dev.idp.token_requests_for(app.client_id) > requests  # really asked Entra ID again
    assert ns.count_events("mail", "ClientSecretExpired") == 1


def _series(text: str, metric: str, namespace: str, name: str) -> list[float]:
    values = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == metric
                and sample.labels.get("namespace") == namespace
                and sample.labels.get("name") == name
            ):
                values.append(sample.value)
    return values


def test_metrics_follow_the_resource_and_go_with_it(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = dev.new_app()
    expires = _in(90)
    ns.secret(app.secret)
    spec = dev.spec(app)
    spec["identity"]["clientSecret"]["expiresAt"] = expires
    ns.smtp_oauth_config("mail", spec)
    ns.kubectl("wait", "--for=condition=Ready", "smtpoauthconfig/mail", "--timeout=30s")

    expiry_metric = EXPIRY_METRIC
    text = wait_until(
        lambda: (t := operator.metrics()) and _series(t, "smtpoauth_ready", ns.name, "mail") == [1.0] and t,
        timeout=10,
        what="smtpoauth_ready = 1",
    )
    expected = _epoch(expires)
    assert _series(text, expiry_metric, ns.name, "mail") == [expected]
    assert _series(text, "smtpoauth_connection_tests_total", ns.name, "mail") == [1.0]

    ns.kubectl("delete", "smtpoauthconfig", "mail", "--wait=true", "--timeout=30s")
    wait_until(
        lambda: f'namespace="{ns.name}"' not in operator.metrics(),
        timeout=30,
        what="the deleted resource's series to disappear",
    )
    text = operator.metrics()
    assert _series(text, expiry_metric, ns.name, "mail") == []
    assert _series(text, "smtpoauth_ready", ns.name, "mail") == []
    # No family keeps a series of the deleted resource (counters and histograms included), whatever
    # the exposition's label order; and none comes back once a pass that was running has ended.
    time.sleep(2)
    leftovers = [
        sample.name
        for family in text_string_to_metric_families(operator.metrics())
        for sample in family.samples
        if sample.labels.get("namespace") == ns.name
    ]
    assert leftovers == []


def test_a_failed_alarm_email_is_an_event_and_is_retried(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = dev.new_app(grant=False)  # a token, but no FullAccess on the mailbox: 535 5.7.3
    ns.secret(app.secret)
    spec = dev.spec(app, alarms={"notify": {"to": [ADMIN]}})
    spec["identity"]["clientSecret"]["expiresAt"] = _in(3)
    ns.smtp_oauth_config("mail", spec)
    ns.wait_for_condition("mail", "Ready", "False", "AuthenticationRejected")
    ns.wait_for_condition("mail", "CredentialExpiring", "True", "ExpiringSoon")
    _wait_events(ns, "mail", "AlarmNotificationFailed")
    failed = next(e for e in ns.events_for("mail") if e["reason"] == "AlarmNotificationFailed")
    assert failed["type"] == "Warning"
    assert ADMIN in failed["message"]
    assert ns.count_events("mail", "ClientSecretExpiringSoon") == 1
    operator.check_alive()
    assert _alarm_mails(dev, app) == []

    # The mailbox permission is fixed; the next check sends the alarm that could not be sent.
    dev.exchange.grant(dev.endpoints.mailbox, app.client_id)
    ns.kubectl("annotate", "smtpoauthconfig", "mail", "smtpoauth.dev/recheck=1", "--overwrite")
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    wait_until(lambda: _alarm_mails(dev, app), timeout=30, what="the alarm e-mail, retried")
    mails = _alarm_mails(dev, app)
    assert len(mails) == 1
    assert "expires in 2 days" in str(mails[0].message["Subject"])
    # Retrying the e-mail is not a second alarm.
    assert ns.count_events("mail", "ClientSecretExpiringSoon") == 1


def test_the_next_threshold_is_alarmed_on_time(ns: Namespace, dev: Dev, operator: OperatorProcess) -> None:
    """No poll loop: the resource's timer is set to its next threshold and fires then."""
    app = dev.new_app()
    ns.secret(app.secret)
    threshold_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=15)
    spec = dev.spec(app, alarms={"warnBeforeDays": [1]})
    spec["identity"]["clientSecret"]["expiresAt"] = _rfc3339(threshold_at + timedelta(days=1))
    ns.smtp_oauth_config("mail", spec)
    ns.wait_for_condition("mail", "CredentialExpiring", "False", "NotExpiring")
    assert ns.count_events("mail", "ClientSecretExpiringSoon") == 0
    attempts = len(dev.auth_attempts(app))
    ns.wait_for_condition("mail", "CredentialExpiring", "True", "ExpiringSoon", timeout=40)
    crossed = datetime.now(UTC)
    assert crossed >= threshold_at
    assert (crossed - threshold_at).total_seconds() < 10, crossed - threshold_at
    _wait_events(ns, "mail", "ClientSecretExpiringSoon")
    assert ns.config("mail")["status"]["lastAlarm"]["thresholdDays"] == 1
    assert len(dev.auth_attempts(app)) == attempts  # a threshold is not a reason to re-test
