"""One pass over one SmtpOAuthConfig: parse, resolve, test if due, and decide the status.

Shared by the operator's reconciler (which then writes status, posts Events and schedules the next
pass) and by the ``check`` CLI (which prints the decision). Nothing here writes anywhere, but for the
reconciler's ``before_message``, which records a test message's intent before it is sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.config import relay_endpoint as relay_endpoint_from_env
from smtp_oauth_operator.domain import expiry as expiry_maths
from smtp_oauth_operator.domain.discovery import Discovery
from smtp_oauth_operator.domain.protection import Protection, assess
from smtp_oauth_operator.domain.reasons import CheckFailed, ConditionType, Reason
from smtp_oauth_operator.domain.renewal import renewed_spec, state_of
from smtp_oauth_operator.domain.spec import (
    SmtpOAuthSpec,
    SpecError,
    parse_spec,
    parse_time,
    recheck_token,
)
from smtp_oauth_operator.domain.status import ConnectionTestResult, Decision, Event, Observation, decide
from smtp_oauth_operator.services.connection import Inputs, ObjectSource, resolve, run
from smtp_oauth_operator.services.discovery import GraphDiscovery
from smtp_oauth_operator.services.renewal import Renewer, Step

__all__ = ["TEST_MESSAGE_TRIGGER", "Pass", "backoff", "evaluate"]

logger = logging.getLogger(__name__)
# status field: which test the test message was (or is being) sent for, see evaluate()
TEST_MESSAGE_TRIGGER = "testMessageTrigger"

# Transient failures retry at 30 s doubling to 30 min (never beyond the recheck interval); a
# rejected credential waits for a change of the spec or the Secret, re-tested at the recheck interval.
BACKOFF_BASE = timedelta(seconds=30)
BACKOFF_CAP = timedelta(minutes=30)


@dataclass(slots=True)
class Pass:
    decision: Decision
    spec: SmtpOAuthSpec | None
    inputs: Inputs | None
    test: ConnectionTestResult | None
    next_due: datetime | None
    expires_at: datetime | None = None  # the expiry the alarms and the metric use (Graph's, if discovered)


def backoff(failures: int, interval: timedelta, retry_after: float | None) -> timedelta:
    delay = min(BACKOFF_BASE * 2 ** max(failures - 1, 0), BACKOFF_CAP, interval)
    # Jitter spreads a fleet of resources that failed together (an outage) over the window.
    jittered: timedelta = delay * random.uniform(0.9, 1.1)  # noqa: S311 - not cryptographic
    if retry_after:
        # The peer said when to come back: never sooner (jittering it could be 10% early), so a fleet
        # throttled together is spread over the time after Retry-After only.
        floor = timedelta(seconds=min(retry_after, 3600))
        jittered = max(jittered, floor * random.uniform(1.0, 1.1))  # noqa: S311 - not cryptographic
    return jittered


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _generation(raw: Any) -> tuple[int, str | None]:
    """metadata.generation, and what is wrong with the metadata (check reads unvalidated manifests)."""
    if raw is not None and not isinstance(raw, Mapping):
        return 0, "invalid metadata: must be an object"
    value = (raw or {}).get("generation")
    if value is None:
        return 0, None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0, "invalid metadata: generation must be a non-negative integer"
    return value, None


def _due(
    generation: int,
    recheck: str | None,
    status: Mapping[str, Any],
    inputs: Inputs,
    spec: SmtpOAuthSpec,
    now: datetime,
) -> tuple[bool, datetime | None]:
    """Whether a connection test is due now, and otherwise when it will be."""
    last = status.get("lastTestTime")
    if (
        not last
        or status.get("observedGeneration") != generation
        or status.get("observedFingerprint") != inputs.fingerprint
        or (recheck is not None and status.get("handledRecheck") != recheck)
    ):
        return True, None
    # The due time was decided (with backoff and jitter) when the last test ran; re-deciding it here
    # would move it on every pass and turn each pass into a status write.
    try:
        due = parse_time(str(status.get("nextTestTime") or "")) if status.get("nextTestTime") else None
        due = due or parse_time(str(last)) + spec.recheck_interval
    except ValueError:
        return True, None
    due = min(due, parse_time(str(last)) + spec.recheck_interval)
    return now >= due, due


def _certificate_expired(
    inputs: Inputs, namespace: str, spec: SmtpOAuthSpec, now: datetime
) -> CheckFailed | None:
    cert = inputs.certificate
    if cert is None or spec.client_certificate is None:
        return None
    where = f"Secret {namespace}/{spec.client_certificate.secret_name}"
    if cert.not_after <= now:
        return CheckFailed(
            Reason.CERTIFICATE_EXPIRED,
            f"the certificate in {where} (thumbprint {cert.thumbprint_sha256}) expired on "
            f"{cert.not_after:%Y-%m-%d %H:%M} UTC",
        )
    if cert.not_before > now:
        return CheckFailed(
            Reason.CERTIFICATE_INVALID,
            f"the certificate in {where} is not valid before {cert.not_before:%Y-%m-%d %H:%M} UTC",
        )
    return None


def _message_trigger(
    generation: int, recheck: str | None, fingerprint: str, status: Mapping[str, Any]
) -> str:
    """What a due test is for: the spec, a recheck, the inputs, or the time since the last test."""
    what = [generation, recheck, fingerprint, status.get("lastTestTime")]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:32]


async def evaluate(
    body: Mapping[str, Any],
    source: ObjectSource,
    tokens: TokenProvider,
    *,
    now: datetime,
    force: bool = False,
    discovery: GraphDiscovery | None = None,
    renewer: Renewer | None = None,
    before_message: Callable[[str], Awaitable[bool]] | None = None,
    relay_endpoint: str | None = None,
) -> Pass:
    """Run one pass; ``force`` tests even when the last test is fresh (the CLI). ``discovery`` holds the
    process's Graph reads (a fresh one, reading at once, when not given).

    ``relay_endpoint`` goes to ``status.relay.endpoint`` of a resource with ``spec.relay.enabled``;
    None reads it from the environment (``SMTPOAUTH_RELAY_ENDPOINT``, set by the chart when it installs
    the relay), "" means there is no relay.

    Whatever the body holds, the answer is a decision (InvalidSpec for what cannot be used), never an
    exception: a resource the API server accepted must get a status.

    ``before_message`` (the reconciler) makes test messages at most once, across restarts too: it is
    awaited with the trigger of a test that would send one, and records it in
    ``status.testMessageTrigger`` before the message goes out (it raises when it cannot, and returns
    False when the resource is gone: then nothing is tested). A test whose trigger is already recorded
    was begun by a process that stopped before its status write: it may have sent the message, so this
    one tests the login only.
    """
    metadata = _mapping(body.get("metadata"))
    namespace = str(metadata.get("namespace") or "default")
    name = str(metadata.get("name") or "?")
    generation, invalid = _generation(body.get("metadata"))
    status = _mapping(body.get("status"))
    recheck = recheck_token(metadata.get("annotations"))
    failures = status.get("consecutiveFailures")
    failures = failures if isinstance(failures, int) and not isinstance(failures, bool) else 0

    spec: SmtpOAuthSpec | None = None
    if invalid is None:
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError as exc:
            invalid = f"invalid spec: {exc}"
    if spec is None:
        failure = CheckFailed(
            Reason.INVALID_SPEC, invalid or "invalid spec", condition=ConditionType.SECRET_RESOLVED
        )
        fingerprint = f"invalid:{generation}"
        record = None
        # Reported once per generation (and per manual recheck): a re-list or a restart writes nothing.
        if (
            force
            or status.get("observedFingerprint") != fingerprint
            or status.get("handledRecheck") != recheck
        ):
            record = ConnectionTestResult(failure, now, 0.0, fingerprint=fingerprint)
            failures += 1
        observation = Observation(
            generation=generation,
            now=now,
            client_id="?",
            secret_name="?",
            test=record,
            expiry=expiry_maths.evaluate(None, now, ()),
            protection=None,
            policy="Warn",
            handled_recheck=recheck,
            next_test_time=None,
            consecutive_failures=failures,
        )
        return Pass(decide(status, observation), None, None, record, None)

    # Once a renewal has switched, the credential is the operator's own Secret (services/renewal.py).
    renewal_state = state_of(body)
    referenced, spec = spec, renewed_spec(spec, renewal_state)
    inputs: Inputs | None = None
    record = None
    events: list[Event] = []
    copy_lost = False
    try:
        try:
            inputs = await resolve(spec, namespace, generation, source)
        except CheckFailed as exc:
            if spec is referenced or exc.reason is not Reason.CERTIFICATE_NOT_FOUND:
                raise
            # The operator's copy of the registered certificate was deleted: back to the referenced Secret,
            # and the renewal starts again from copying it (a new certificate there cannot be registered).
            events.append(
                Event("Warning", "RenewalCopyLost", f"{exc.message}; using the referenced Secret again.")
            )
            renewal_state, spec, copy_lost = None, referenced, True
            inputs = await resolve(spec, namespace, generation, source)
    except CheckFailed as exc:
        fingerprint = f"unresolved:{generation}:{exc.reason}"
        if (
            force
            or status.get("observedFingerprint") != fingerprint
            or status.get("handledRecheck") != recheck
        ):
            record = ConnectionTestResult(exc, now, 0.0, fingerprint=fingerprint)
    secret_name = f"{namespace}/{spec.credential_secret or '-'}"

    due_at: datetime | None = None
    if inputs is not None:
        due, due_at = _due(generation, recheck, status, inputs, spec, now)
        if due or force:
            expired = _certificate_expired(inputs, namespace, spec, now)
            if expired is not None:
                # Before any network call: Entra ID would only say the signature failed.
                record = ConnectionTestResult(expired, now, 0.0, fingerprint=inputs.fingerprint)
            else:
                send: bool | None = True
                if spec.test_message_to and before_message is not None:
                    trigger = _message_trigger(generation, recheck, inputs.fingerprint, status)
                    if status.get(TEST_MESSAGE_TRIGGER) == trigger:
                        send = False
                        logger.info(
                            "Testing %s/%s without its test message: an earlier process may have sent it",
                            namespace,
                            name,
                        )
                    elif not await before_message(trigger):
                        send = None
                if send is not None:
                    record = await run(
                        spec, inputs, tokens, where=f"{namespace}/{name}", now=now, send_message=send
                    )

    if record is not None:
        failures = failures + 1 if record.failure else 0
        if record.failure is None:
            due_at = now + spec.recheck_interval
        elif record.failure.transient:
            due_at = now + backoff(failures, spec.recheck_interval, record.failure.retry_after)
        else:
            due_at = now + spec.recheck_interval

    typed = inputs.expires_at if inputs else spec.expires_at
    discovered = None
    if inputs is not None and spec.discover_graph:
        finder = discovery if discovery is not None else GraphDiscovery()
        manual = recheck is not None and status.get("handledRecheck") != recheck
        discovered = await finder.discover(spec, inputs, tokens, now=now, refresh=force or manual)
    expires_at = _effective_expiry(spec, typed, discovered, status)
    expiry = expiry_maths.evaluate(expires_at, now, spec.warn_before_days)
    protection = assess(secret_name, inputs.secret_metadata, spec.secret_policy) if inputs else None
    if (
        inputs is not None
        and spec.renews
        and spec.workload_identity is None
        and (inputs.secret_metadata.get("labels") or {}).get("smtpoauth.dev/renewal-of")
    ):
        protection = Protection(
            "True",
            Reason.PROTECTED,
            f"Secret {secret_name} holds the renewed credential: written by the operator, never committed, and "
            "labelled velero.io/exclude-from-backup=true.",
        )
    if spec.workload_identity is not None:
        protection = Protection(
            "True",
            Reason.PROTECTED,
            "No Secret to protect: workload identity federation stores no credential.",
        )
    step = Step()
    if renewer is not None and inputs is not None and spec.renews:
        step = await renewer.advance(
            body, spec, inputs, tokens, discovered, source, now=now, recorded=renewal_state
        )
    observation = Observation(
        generation=generation,
        now=now,
        client_id=spec.client_id,
        secret_name=secret_name,
        test=record,
        expiry=expiry,
        protection=protection,
        policy=spec.secret_policy,
        handled_recheck=recheck,
        next_test_time=due_at,
        consecutive_failures=failures,
        credential=spec.credential_kind,
        certificate=inputs.certificate.status() if inputs and inputs.certificate else None,
        discovery_enabled=spec.discover_graph,
        discovery=discovered,
        typed_expires_at=typed if spec.credential_kind == "ClientSecret" else None,
        relay_endpoint=_relay_endpoint(spec, relay_endpoint),
        renewal_enabled=spec.renews,
        renewal=step.state if step.state is not None else ({} if copy_lost else None),
    )
    decision = decide(status, observation)
    decision.events.extend([*events, *step.events])
    retry = discovered.retry_at if discovered else None
    step_due = step.next_due
    next_due = min((t for t in (due_at, expiry.next_change, retry, step_due) if t is not None), default=None)
    return Pass(decision, spec, inputs, record, next_due, expires_at)


def _relay_endpoint(spec: SmtpOAuthSpec, given: str | None) -> str | None:
    if spec.relay is None:  # unset or enabled false
        return None
    return (relay_endpoint_from_env() if given is None else given) or None


def _effective_expiry(
    spec: SmtpOAuthSpec, typed: datetime | None, discovered: Discovery | None, status: Mapping[str, Any]
) -> datetime | None:
    """Graph's date wins for a client secret (a certificate's own notAfter is already the truth).

    When Graph can not be read now but was before (status.expirySource Graph, e.g. before a restart),
    its last date is kept, so a throttled read never moves the alarms back to a typed date."""
    if spec.credential_kind != "ClientSecret" or discovered is None:
        return typed
    if discovered.expires_at is not None:
        return discovered.expires_at
    if discovered.credentials is None and status.get("expirySource") == "Graph":
        try:
            return parse_time(str(status.get("clientSecretExpiresAt") or ""))
        except ValueError:
            return typed
    return typed
