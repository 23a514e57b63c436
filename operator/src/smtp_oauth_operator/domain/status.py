"""The one place where ``status`` and the Events of a pass are decided.

:func:`decide` takes the previous status and what this pass observed (a connection test, or none
when the last one is still fresh; the expiry state; the Secret's protection) and returns the new
status plus the Events and the alarm to send. It is pure: the reconciler writes the result only if it
differs from what is stored, so a pass that changes nothing makes no API write.

Conditions follow the Kubernetes API conventions: metav1.Condition shape, ``observedGeneration`` on
each, ``lastTransitionTime`` moved only when ``status`` flips. ``Ready`` is the first failing check of
an ordered chain (the connection test, then expiry, then the secret policy), as in cert-manager.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from smtp_oauth_operator.domain.discovery import Discovery, mismatch
from smtp_oauth_operator.domain.expiry import ExpiryState, days_phrase, format_date
from smtp_oauth_operator.domain.protection import Protection
from smtp_oauth_operator.domain.reasons import CheckFailed, ConditionType, Reason, info
from smtp_oauth_operator.domain.renewal import condition as renewal_condition
from smtp_oauth_operator.domain.spec import parse_time

__all__ = [
    "Alarm",
    "ConnectionTestResult",
    "Decision",
    "Event",
    "Observation",
    "decide",
    "timestamp",
]

STEPS = (ConditionType.SECRET_RESOLVED, ConditionType.TOKEN_ACQUIRED, ConditionType.SMTP_AUTHENTICATED)
_STEP_OK = {
    ConditionType.SECRET_RESOLVED: (Reason.RESOLVED, "The Secret and trust bundles were read."),
    ConditionType.TOKEN_ACQUIRED: (Reason.TOKEN_ISSUED, "Entra ID issued an access token."),
    ConditionType.SMTP_AUTHENTICATED: (
        Reason.AUTHENTICATED,
        "The SMTP server accepted AUTH XOAUTH2 after TLS.",
    ),
}
MAX_HISTORY = 20
_RESOLVED_MESSAGE = {
    "ClientCertificate": "The TLS Secret's certificate and key, and the trust bundles, were read and checked.",
    "WorkloadIdentity": "No Secret to read (workload identity federation); the trust bundles were read.",
}


def timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class ConnectionTestResult:
    """The outcome of one connection test."""

    failure: CheckFailed | None
    tested_at: datetime
    duration: float
    fingerprint: str
    token_endpoint: str | None = None
    scope: str | None = None
    smtp_endpoint: str | None = None
    sent: bool = False


@dataclass(frozen=True, slots=True)
class Observation:
    generation: int
    now: datetime
    client_id: str
    secret_name: str
    test: ConnectionTestResult | None
    expiry: ExpiryState
    protection: Protection | None
    policy: str
    handled_recheck: str | None
    next_test_time: datetime | None
    consecutive_failures: int
    credential: str = "ClientSecret"  # spec.credential_kind
    certificate: Mapping[str, str] | None = None  # status.clientCertificate (public facts only)
    discovery_enabled: bool = False  # spec.identity.discovery.graph
    discovery: Discovery | None = None  # None: Graph not read this pass (the credential is unresolved)
    typed_expires_at: datetime | None = None  # expiresAt / expiresAtKey, to compare with Graph's
    relay_endpoint: str | None = None  # spec.relay enabled and the operator knows the relay's endpoint
    renewal_enabled: bool = False  # spec.identity.clientSecret.renewal
    renewal: Mapping[str, Any] | None = (
        None  # the new status.renewal after this pass's step (None: unchanged)
    )


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Alarm:
    """An expiry alarm to e-mail to spec.alarms.notify.to."""

    kind: str  # ClientSecretExpiringSoon or ClientSecretExpired
    subject: str
    body: str
    retry: bool = False  # an earlier e-mail for this alarm failed; a failure again posts no new Event


@dataclass(slots=True)
class Decision:
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    alarm: Alarm | None = None

    @property
    def ready(self) -> Mapping[str, Any]:
        return _find(self.status.get("conditions", []), ConditionType.READY) or {}


def _find(conditions: Sequence[Mapping[str, Any]], ctype: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == ctype), None)


def _condition(
    previous: Sequence[Mapping[str, Any]],
    ctype: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> dict[str, Any]:
    old = _find(previous, ctype)
    moved = old is None or old.get("status") != status or not old.get("lastTransitionTime")
    return {
        "type": str(ctype),
        "status": status,
        "reason": str(reason),
        "message": message,
        "lastTransitionTime": timestamp(now) if moved else old["lastTransitionTime"],  # type: ignore[index]
        "observedGeneration": generation,
    }


def _step_conditions(
    prev_conditions: Sequence[Mapping[str, Any]], test: ConnectionTestResult
) -> dict[ConditionType, tuple[str, str, str]]:
    failed_at = test.failure.condition if test.failure else None
    if failed_at is ConditionType.READY:  # a failure before any step (an invalid spec)
        failed_at = ConditionType.SECRET_RESOLVED
    steps: dict[ConditionType, tuple[str, str, str]] = {}
    reached = True
    for step in STEPS:
        if not reached:
            steps[step] = (
                "Unknown",
                Reason.NOT_TESTED,
                f"Not tested: {failed_at} failed first.",
            )
        elif step == failed_at and test.failure is not None:
            steps[step] = ("False", test.failure.reason, _sentence(test.failure.message))
            reached = False
        else:
            reason, message = _STEP_OK[step]
            steps[step] = ("True", reason, message)
    return steps


def _previous_steps(
    prev_conditions: Sequence[Mapping[str, Any]],
) -> dict[ConditionType, tuple[str, str, str]]:
    steps: dict[ConditionType, tuple[str, str, str]] = {}
    for step in STEPS:
        old = _find(prev_conditions, step)
        if old is None:
            steps[step] = ("Unknown", Reason.NOT_TESTED, "Not tested yet.")
        else:
            steps[step] = (str(old["status"]), str(old["reason"]), str(old.get("message", "")))
    return steps


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _parse(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return parse_time(str(value))
    except ValueError:
        return None


def decide(previous: Mapping[str, Any] | None, obs: Observation) -> Decision:
    """Compute the new status, Events and alarm from the previous status and this pass."""
    prev = dict(previous or {})
    prev_conditions: list[Mapping[str, Any]] = list(prev.get("conditions") or [])
    now = obs.now
    status: dict[str, Any] = {
        k: v
        for k, v in prev.items()
        if k
        in {
            "tokenEndpoint",
            "scope",
            "smtpEndpoint",
            "lastTestTime",
            "lastTestDurationSeconds",
            "observedFingerprint",
            "lastAlarm",
            "alarmHistory",
            "clientCertificate",
            "appCredentials",
            "expiryMismatch",
            "expirySource",
            "renewal",
        }
    }
    events: list[Event] = []
    alarm: Alarm | None = None

    # 1. The connection test's steps: this pass's test, or the previous one's conditions.
    if obs.test is not None:
        steps = _step_conditions(prev_conditions, obs.test)
        status["lastTestTime"] = timestamp(obs.test.tested_at)
        status["lastTestDurationSeconds"] = round(obs.test.duration, 3)
        status["observedFingerprint"] = obs.test.fingerprint
        for key, value in (
            ("tokenEndpoint", obs.test.token_endpoint),
            ("scope", obs.test.scope),
            ("smtpEndpoint", obs.test.smtp_endpoint),
        ):
            if value:
                status[key] = value
    else:
        steps = _previous_steps(prev_conditions)
    resolved = steps[ConditionType.SECRET_RESOLVED]
    if resolved[1] == Reason.RESOLVED and obs.credential in _RESOLVED_MESSAGE:
        steps[ConditionType.SECRET_RESOLVED] = (resolved[0], resolved[1], _RESOLVED_MESSAGE[obs.credential])
    test_failure = next(((s, r, m) for (s, r, m) in steps.values() if s == "False"), None)
    untested = all(s == "Unknown" for (s, _, _) in steps.values())

    # 2. Expiry. Entra ID's AADSTS7000222 means expired whatever the spec says.
    expiry = obs.expiry
    cert = obs.credential == "ClientCertificate"
    kind = "ClientCertificate" if cert else "ClientSecret"  # the alarm's and Events' prefix
    idp_says_expired = test_failure is not None and test_failure[1] in {
        Reason.CLIENT_SECRET_EXPIRED,
        Reason.CERTIFICATE_EXPIRED,
    }
    if cert:
        prev_expires = _parse((prev.get("clientCertificate") or {}).get("notAfter"))
        status.pop("clientSecretExpiresAt", None)
        if obs.certificate is not None:
            status["clientCertificate"] = dict(obs.certificate)
    else:
        prev_expires = _parse(prev.get("clientSecretExpiresAt"))
        status.pop("clientCertificate", None)
        if expiry.expires_at is not None:
            status["clientSecretExpiresAt"] = timestamp(expiry.expires_at)
        else:
            status.pop("clientSecretExpiresAt", None)
    # Graph's expiry against the typed one: a disagreement is said once per pair (remembered in status).
    discovered = obs.discovery
    mismatch_record = (
        mismatch(obs.typed_expires_at, discovered.expires_at)
        if obs.discovery_enabled and discovered is not None and not cert
        else None
    )
    new_mismatch = mismatch_record is not None and prev.get("expiryMismatch") != mismatch_record
    noun = "certificate" if cert else "client secret"
    renew = (
        "issue a new certificate, upload it to the app registration and update"
        if cert
        else "create a new secret in Entra ID and update"
    )
    if expiry.expires_at and prev_expires and expiry.expires_at > prev_expires:
        status.pop("lastAlarm", None)
        if not new_mismatch:  # Graph correcting a typed date is said by ExpiryMismatch, not as a rotation
            message = (
                f"{noun.capitalize()} of app {obs.client_id} now expires {format_date(expiry.expires_at)} "
                f"(was {format_date(prev_expires)})."
            )
            events.append(Event("Normal", f"{kind}Rotated", message))
            _history(status, f"{kind}Rotated", None, now, message)

    if obs.credential == "WorkloadIdentity":
        exp_status, exp_reason = "False", Reason.NOT_EXPIRING
        exp_message = (
            "Nothing expires: workload identity federation presents short-lived ServiceAccount tokens "
            "and stores no credential."
        )
    elif idp_says_expired or expiry.reason is Reason.EXPIRED:
        exp_status, exp_reason = "True", Reason.EXPIRED
        when = f"on {format_date(expiry.expires_at)}" if expiry.expires_at else "(Entra ID says so)"
        exp_message = f"The {noun} of app {obs.client_id} expired {when}: {renew} Secret {obs.secret_name}."
    elif expiry.reason is Reason.EXPIRING_SOON and expiry.expires_at and expiry.remaining:
        exp_status, exp_reason = "True", Reason.EXPIRING_SOON
        exp_message = (
            f"The {noun} of app {obs.client_id} expires {format_date(expiry.expires_at)} "
            f"({days_phrase(expiry.remaining)}): {renew} Secret {obs.secret_name}."
        )
    elif expiry.reason is Reason.NOT_EXPIRING and expiry.expires_at and expiry.remaining:
        exp_status, exp_reason = "False", Reason.NOT_EXPIRING
        exp_message = (
            f"The {noun} expires {format_date(expiry.expires_at)} ({days_phrase(expiry.remaining)})."
        )
    else:
        exp_status, exp_reason = "Unknown", Reason.EXPIRY_UNKNOWN
        exp_message = (
            "Unknown until the certificate can be read from its TLS Secret."
            if cert
            else "No expiry date: Graph did not identify the secret in use (see ExpiryDiscovered); set "
            "spec.identity.clientSecret.expiresAt to use a typed date."
            if obs.discovery_enabled
            else "No expiry date: set spec.identity.clientSecret.expiresAt or expiresAtKey."
        )

    # 3. Alarms: once per threshold for a given expiry date, remembered in status across restarts.
    last = status.get("lastAlarm")
    if isinstance(last, Mapping) and last.get("sending"):
        # The reconciler writes ``sending`` before an alarm e-mail and replaces it with ``notified``
        # after; finding it means a process stopped in between. Sending again could repeat the
        # e-mail, so its outcome stays unknown (the alarm's condition and Event are there anyway).
        last = status["lastAlarm"] = {k: v for k, v in last.items() if k != "sending"}
        events.append(
            Event(
                "Warning",
                "AlarmNotificationUnknown",
                f"The {last.get('type')} alarm e-mail may not have been delivered (the operator stopped "
                "while sending it and does not send it twice): check the inbox of spec.alarms.notify.to.",
            )
        )
    same_date = bool(last) and _parse(last.get("expiresAt")) == expiry.expires_at  # type: ignore[union-attr]
    if exp_reason is Reason.EXPIRED and not (same_date and last and last.get("type") == f"{kind}Expired"):
        alarm = Alarm(
            f"{kind}Expired",
            _alarm_subject(f"{kind}Expired", obs.client_id, expiry),
            exp_message,
        )
        events.append(Event("Warning", f"{kind}Expired", exp_message))
        status["lastAlarm"] = _alarm_record(f"{kind}Expired", None, expiry, now)
        _history(status, f"{kind}Expired", None, now, exp_message)
    elif exp_reason is Reason.EXPIRING_SOON and expiry.threshold_days is not None:
        already = (
            same_date
            and last is not None
            and last.get("type") in {f"{kind}ExpiringSoon", f"{kind}Expired"}
            and int(last.get("thresholdDays") or 0) <= expiry.threshold_days
            and last.get("thresholdDays") is not None
        )
        if not already:
            subject = _alarm_subject(f"{kind}ExpiringSoon", obs.client_id, expiry)
            alarm = Alarm(f"{kind}ExpiringSoon", subject, exp_message)
            events.append(Event("Warning", f"{kind}ExpiringSoon", exp_message))
            status["lastAlarm"] = _alarm_record(f"{kind}ExpiringSoon", expiry.threshold_days, expiry, now)
            _history(status, f"{kind}ExpiringSoon", expiry.threshold_days, now, exp_message)

    # An alarm whose e-mail failed is sent again on later passes (the reconciler records the outcome
    # in lastAlarm.notified), while the condition still says the same thing.
    last_now = status.get("lastAlarm")
    if (
        alarm is None
        and last_now
        and last_now.get("notified") is False
        and exp_reason in {Reason.EXPIRING_SOON, Reason.EXPIRED}
    ):
        kind = str(last_now.get("type"))
        alarm = Alarm(kind, _alarm_subject(kind, obs.client_id, expiry), exp_message, retry=True)

    # 4. Secret protection.
    protection = obs.protection
    if protection is None:
        prot = ("Unknown", Reason.NOT_TESTED, "Not checked: the Secret could not be read.")
    else:
        prot = (protection.status, protection.reason, protection.message)

    # 5. Ready: the first failing check of the chain.
    if test_failure is not None:
        ready = ("False", test_failure[1], test_failure[2])
    elif untested:
        ready = ("Unknown", Reason.NOT_TESTED, "The connection has not been tested yet.")
    elif exp_reason is Reason.EXPIRED:
        ready = ("False", Reason.CERTIFICATE_EXPIRED if cert else Reason.CLIENT_SECRET_EXPIRED, exp_message)
    elif obs.policy == "Require" and protection is not None and not protection.protected:
        ready = ("False", Reason.SECRET_NOT_PROTECTED, f"{protection.message} spec.secretPolicy is Require.")
    else:
        ready = ("True", Reason.CONNECTION_TESTED, "Token acquired and SMTP AUTH XOAUTH2 accepted.")

    g = obs.generation
    conditions = [
        _condition(prev_conditions, ConditionType.READY, *ready, g, now),
        *(_condition(prev_conditions, step, *steps[step], g, now) for step in STEPS),
        _condition(
            prev_conditions, ConditionType.CREDENTIAL_EXPIRING, exp_status, exp_reason, exp_message, g, now
        ),
        _condition(prev_conditions, ConditionType.SECRET_PROTECTED, *prot, g, now),
    ]
    if obs.discovery_enabled:
        if discovered is None:
            found = ("Unknown", Reason.NOT_TESTED, "Not read: the credential could not be resolved.")
        else:
            found = (discovered.status, discovered.reason, discovered.message)
            if discovered.credentials is not None:
                status["appCredentials"] = list(discovered.credentials)
        conditions.append(_condition(prev_conditions, ConditionType.EXPIRY_DISCOVERED, *found, g, now))
        if mismatch_record is not None:
            status["expiryMismatch"] = mismatch_record
        elif discovered is not None and discovered.expires_at is not None:
            status.pop("expiryMismatch", None)
        from_graph = not cert and discovered is not None and discovered.expires_at is not None
        unread = discovered is None or discovered.credentials is None  # Graph not read: its last date stays
        if from_graph or (not cert and unread and prev.get("expirySource") == "Graph" and expiry.expires_at):
            status["expirySource"] = "Graph"
        elif expiry.expires_at is not None:
            status["expirySource"] = "Spec"
        else:
            status.pop("expirySource", None)
        if new_mismatch and mismatch_record is not None:
            events.append(
                Event(
                    "Warning",
                    "ExpiryMismatch",
                    f"spec.identity.clientSecret.expiresAt says {mismatch_record['specExpiresAt']} but Microsoft "
                    f"Graph says the secret in use expires {mismatch_record['graphExpiresAt']}: Graph's date is "
                    "used for CredentialExpiring and the alarms. Correct expiresAt or remove it.",
                )
            )
        old_found = _find(prev_conditions, ConditionType.EXPIRY_DISCOVERED)
        if found[0] == "False" and (old_found is None or old_found.get("reason") != found[1]):
            events.append(
                Event(
                    "Warning",
                    "ExpiryDiscoveryFailed",
                    f"{found[1]}: {found[2]} {info(Reason(found[1])).remedy}",
                )
            )
    else:
        for key in ("appCredentials", "expiryMismatch", "expirySource"):
            status.pop(key, None)
    if obs.renewal is not None:
        status["renewal"] = dict(obs.renewal)
    if obs.renewal_enabled:
        renewal = renewal_condition(status.get("renewal"))
        conditions.append(_condition(prev_conditions, ConditionType.RENEWAL, *renewal, g, now))
    status["conditions"] = conditions
    status["observedGeneration"] = g
    if obs.handled_recheck is not None:
        status["handledRecheck"] = obs.handled_recheck
    if obs.next_test_time is not None:
        status["nextTestTime"] = timestamp(obs.next_test_time)
    status["consecutiveFailures"] = obs.consecutive_failures
    # Where applications send (kubectl get -o wide): decided per pass like the rest, so it costs no
    # write of its own, and is dropped with spec.relay (the reconciler patches a dropped key to null).
    if obs.relay_endpoint:
        status["relay"] = {"endpoint": obs.relay_endpoint}

    # 6. Events on transitions of Ready and of the protection verdict, not on every pass.
    old_ready = _find(prev_conditions, ConditionType.READY)
    changed = old_ready is None or (old_ready.get("status"), old_ready.get("reason")) != ready[:2]
    if changed and ready[0] == "True":
        events.insert(0, Event("Normal", "ConnectionTestSucceeded", f"{ready[2]}"))
    elif changed and ready[0] == "False":
        remedy = info(Reason(ready[1])).remedy
        events.insert(0, Event("Warning", "ConnectionTestFailed", f"{ready[1]}: {ready[2]} {remedy}"))
    old_prot = _find(prev_conditions, ConditionType.SECRET_PROTECTED)
    if (
        protection is not None
        and not protection.protected
        and (old_prot is None or old_prot.get("reason") != protection.reason)
    ):
        events.append(Event("Warning", "SecretNotProtected", protection.message))
    return Decision(status=status, events=events, alarm=alarm)


def _alarm_subject(kind: str, client_id: str, expiry: ExpiryState) -> str:
    noun = "Certificate" if kind.startswith("ClientCertificate") else "Client secret"
    if kind.endswith("Expired") or not expiry.remaining:
        return f"[smtp-oauth-operator] {noun} EXPIRED: app {client_id}"
    return f"[smtp-oauth-operator] {noun} of app {client_id} expires {days_phrase(expiry.remaining)}"


def _alarm_record(kind: str, threshold: int | None, expiry: ExpiryState, now: datetime) -> dict[str, Any]:
    record: dict[str, Any] = {"type": kind, "time": timestamp(now)}
    if threshold is not None:
        record["thresholdDays"] = threshold
    if expiry.expires_at is not None:
        record["expiresAt"] = timestamp(expiry.expires_at)
    return record


def _history(status: dict[str, Any], kind: str, threshold: int | None, now: datetime, message: str) -> None:
    entry: dict[str, Any] = {"type": kind, "time": timestamp(now), "message": message}
    if threshold is not None:
        entry["thresholdDays"] = threshold
    history = [*list(status.get("alarmHistory") or []), entry]
    status["alarmHistory"] = history[-MAX_HISTORY:]
