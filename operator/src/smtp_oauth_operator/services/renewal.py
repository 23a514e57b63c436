"""Client-secret renewal through Microsoft Graph: add → store → test → switch → remove, one step per pass.

The state lives in ``status.renewal`` and each external step is taken only in a pass that *follows* the status
write recording the intent to take it, so a crash (SIGKILL, node loss) between any two steps resumes where it
stopped:

``Adding``    intent recorded (a random ``intent`` and the old credential's keyId). The next pass adds a
              password named ``smtp-oauth-operator renewal <intent>`` and writes its value into the operator's
              own Secret (annotated with the intent and the new keyId) before anything else. Resumed, it first
              looks for that name in Graph: found with the Secret → adopted (no second credential); found
              without the Secret (killed between addPassword's answer and the Secret write, the value is lost
              for good) → that orphan, which carries our intent and can only be ours, is removed and one
              password added again, so exactly one new credential remains.
``Testing``   the connection is tested with the new secret; only a passing test moves on (retried otherwise).
``Active``    the resource uses the new Secret; the old credential stays valid for ``gracePeriod``.
``Removing``  intent recorded; the next pass removes the *recorded* old keyId — never the one in use, never one
              it did not record — and a keyId already gone counts as removed.
``Done``      until the new credential itself comes within ``renewBefore`` of its end.

Nothing here writes status; it returns the new ``status.renewal`` and the Events for the reconciler to write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from smtp_oauth_operator.clients.graph import GraphRead, add_password, remove_password
from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.clients.kube import Kube
from smtp_oauth_operator.domain.discovery import Discovery
from smtp_oauth_operator.domain.reasons import CheckFailed, Reason
from smtp_oauth_operator.domain.spec import KeyRef, SmtpOAuthSpec, parse_time
from smtp_oauth_operator.domain.status import Event, timestamp
from smtp_oauth_operator.services.connection import (
    Inputs,
    ObjectSource,
    proxy_for,
    resolve,
    run,
    token_request,
)
from smtp_oauth_operator.services.discovery import GraphDiscovery

__all__ = ["OWNED_KEY", "Renewer", "Step", "owned_secret_name", "renewed_spec"]

OWNED_KEY = "client-secret"
INTENT_ANNOTATION = "smtpoauth.dev/renewal-intent"
KEY_ID_ANNOTATION = "smtpoauth.dev/renewal-key-id"
RETRY = timedelta(seconds=30)
NEXT_STEP = timedelta(seconds=1)
SWITCHED = frozenset({"Active", "Removing", "Done"})


def owned_secret_name(resource: str, *, other_than: str | None = None) -> str:
    """``{name}-renewed``, or ``{name}-renewed-b`` when the first one holds the secret in use (a second
    renewal must not overwrite the value the resource still authenticates with)."""
    base = (
        resource
        if len(resource) <= 236
        else f"{resource[:227]}-{hashlib.sha256(resource.encode()).hexdigest()[:8]}"
    )
    name = f"{base}-renewed"
    return f"{name}-b" if name == other_than else name


def renewed_spec(spec: SmtpOAuthSpec, state: Mapping[str, Any] | None) -> SmtpOAuthSpec:
    """The spec the resource is tested with: once switched, the operator's own Secret (whose date Graph knows);
    during a later renewal, the renewed Secret still in use (``fromSecret``) until the next switch."""
    if spec.renewal is None or not state:
        return spec
    if state.get("phase") in SWITCHED and state.get("secretName"):
        name = str(state["secretName"])
    elif state.get("fromSecret"):
        name = str(state["fromSecret"])
    else:
        return spec
    ref = KeyRef("Secret", name, OWNED_KEY)
    return dataclasses.replace(spec, secret_ref=ref, expires_at=None, expires_at_key=None)


def _label(intent: str) -> str:
    return f"smtp-oauth-operator renewal {intent}"


@dataclass(slots=True)
class Step:
    """What one pass did: the new ``status.renewal`` (None: leave it), Events, when to come back."""

    state: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)
    next_due: datetime | None = None


class Renewer:
    """Takes at most one renewal step per pass of a resource (loop-only, like the reconciler)."""

    def __init__(self, kube: Kube, discovery: GraphDiscovery) -> None:
        self.kube = kube
        self.discovery = discovery

    async def advance(
        self,
        body: Mapping[str, Any],
        spec: SmtpOAuthSpec,
        inputs: Inputs,
        tokens: TokenProvider,
        discovered: Discovery | None,
        source: ObjectSource,
        *,
        now: datetime,
    ) -> Step:
        renewal = spec.renewal
        if renewal is None or discovered is None:
            return Step()
        meta = body.get("metadata") or {}
        state: dict[str, Any] = dict((body.get("status") or {}).get("renewal") or {})
        phase = state.get("phase")
        try:
            if phase in (None, "Done"):
                return self._maybe_start(state, spec, meta, discovered, now)
            if phase == "Adding":
                return await self._add(state, spec, body, inputs, tokens, source, now)
            if phase == "Testing":
                return await self._test(state, spec, meta, tokens, source, now)
            if phase == "Active":
                remove_after = parse_time(str(state.get("removeAfter") or timestamp(now)))
                if now < remove_after:
                    return Step(next_due=remove_after)
                state["phase"] = "Removing"
                return Step(state, next_due=now + NEXT_STEP)
            if phase == "Removing":
                return await self._remove(state, spec, inputs, tokens, discovered, now)
        except CheckFailed as exc:
            return self._failed(state, str(phase), exc, now)
        return Step()

    # ---------------------------------------------------------------------------------------- steps

    def _maybe_start(
        self,
        state: dict[str, Any],
        spec: SmtpOAuthSpec,
        meta: Mapping[str, Any],
        found: Discovery,
        now: datetime,
    ) -> Step:
        assert spec.renewal is not None
        if found.expires_at is None or len(found.in_use) != 1:
            return Step()  # nothing identified: no renewal on a guess
        start_at = found.expires_at - spec.renewal.renew_before
        if now < start_at:
            return Step(next_due=start_at)
        intent = uuid.uuid4().hex
        in_use = str(state.get("secretName") or "") if state.get("phase") == "Done" else ""
        new_state = {
            "phase": "Adding",
            "intent": intent,
            "oldKeyId": found.in_use[0],
            "secretName": owned_secret_name(str(meta.get("name")), other_than=in_use),
            "startedAt": timestamp(now),
        }
        if in_use:
            new_state["fromSecret"] = in_use
        message = (
            f"The client secret in use (keyId {found.in_use[0]}) ends {timestamp(found.expires_at)}, within "
            f"renewBefore: adding a new one through Microsoft Graph."
        )
        return Step(new_state, [Event("Normal", "RenewalStarted", message)], now + NEXT_STEP)

    async def _add(
        self,
        state: dict[str, Any],
        spec: SmtpOAuthSpec,
        body: Mapping[str, Any],
        inputs: Inputs,
        tokens: TokenProvider,
        source: ObjectSource,
        now: datetime,
    ) -> Step:
        assert spec.renewal is not None
        meta = body.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        intent, name = str(state["intent"]), str(state["secretName"])
        listing = await self._listing(spec, inputs, tokens, now)
        ours = [c for c in listing if c.get("displayName") == _label(intent)]
        owned = await source.read("Secret", namespace, name)
        annotations = (owned.metadata.get("annotations") or {}) if owned is not None else {}
        adopted = next(
            (
                c
                for c in ours
                if annotations.get(INTENT_ANNOTATION) == intent
                and annotations.get(KEY_ID_ANNOTATION) == c["keyId"]
            ),
            None,
        )
        events: list[Event] = []
        if adopted is None:
            labels = {
                "velero.io/exclude-from-backup": "true",
                "app.kubernetes.io/managed-by": "smtp-oauth-operator",
                "smtpoauth.dev/renewal-of": str(meta.get("name"))[:63],
            }
            owner = {
                "apiVersion": str(body.get("apiVersion") or "smtpoauth.dev/v1alpha1"),
                "kind": "SmtpOAuthConfig",
                "name": str(meta.get("name")),
                "uid": str(meta.get("uid") or ""),
                "controller": True,
                "blockOwnerDeletion": False,
            }
            # The Secret first, empty: a missing RBAC rule fails here, before Graph holds anything of ours.
            await self._write_secret(
                namespace, name, {}, labels=labels, annotations={INTENT_ANNOTATION: intent}, owner=owner
            )
            graph = await self._graph(spec, inputs, tokens)
            for orphan in ours:
                if orphan["keyId"] == state.get("oldKeyId"):
                    continue  # cannot happen (the label is ours), but never remove the credential in use
                await remove_password(graph, orphan["keyId"])
                events.append(
                    Event(
                        "Warning",
                        "RenewalOrphanRemoved",
                        f"Removed credential {orphan['keyId']}, added by an interrupted renewal whose value was "
                        "never stored; adding it again.",
                    )
                )
            end = timestamp(now + spec.renewal.validity)
            added = await add_password(graph, _label(intent), end)
            secret, key_id = str(added.get("secretText") or ""), str(added.get("keyId") or "")
            if not secret or not key_id:
                raise CheckFailed(
                    Reason.GRAPH_UNAVAILABLE,
                    "Microsoft Graph's addPassword answer had no secretText or keyId",
                )
            await self._write_secret(
                namespace,
                name,
                {OWNED_KEY: secret},
                labels=labels,
                annotations={INTENT_ANNOTATION: intent, KEY_ID_ANNOTATION: key_id},
                owner=owner,
            )
            self.discovery.forget(spec)
        else:
            key_id = str(adopted["keyId"])
        new_state = {**state, "phase": "Testing", "newKeyId": key_id}
        new_state.pop("lastFailure", None)
        events.append(
            Event(
                "Normal",
                "RenewalCredentialAdded",
                f"Added client secret keyId {key_id} (valid {spec.renewal.validity.days} days) and stored it in "
                f"Secret {namespace}/{name}, which the operator owns; testing it next.",
            )
        )
        return Step(new_state, events, now + NEXT_STEP)

    async def _test(
        self,
        state: dict[str, Any],
        spec: SmtpOAuthSpec,
        meta: Mapping[str, Any],
        tokens: TokenProvider,
        source: ObjectSource,
        now: datetime,
    ) -> Step:
        assert spec.renewal is not None
        namespace = str(meta.get("namespace") or "default")
        switched = renewed_spec(spec, {**state, "phase": "Active"})
        generation = int(meta.get("generation") or 0)
        fresh = await resolve(switched, namespace, generation, source)
        result = await run(switched, fresh, tokens, where=f"{namespace}/{meta.get('name')}", now=now)
        if result.failure is not None:
            raise result.failure
        remove_after = now + spec.renewal.grace_period
        new_state = {
            **state,
            "phase": "Active",
            "switchedAt": timestamp(now),
            "removeAfter": timestamp(remove_after),
        }
        new_state.pop("lastFailure", None)
        message = (
            f"The new client secret (keyId {state.get('newKeyId')}) passed the connection test; the resource now "
            f"uses Secret {namespace}/{state.get('secretName')}. The old one (keyId {state.get('oldKeyId')}) is "
            f"removed after the grace period, at {timestamp(remove_after)}."
        )
        return Step(new_state, [Event("Normal", "RenewalSwitched", message)], remove_after)

    async def _remove(
        self,
        state: dict[str, Any],
        spec: SmtpOAuthSpec,
        inputs: Inputs,
        tokens: TokenProvider,
        found: Discovery,
        now: datetime,
    ) -> Step:
        old, new = str(state.get("oldKeyId") or ""), str(state.get("newKeyId") or "")
        listing = await self._listing(spec, inputs, tokens, now)
        if not old or old == new or old in found.in_use:
            raise CheckFailed(
                Reason.GRAPH_UNAVAILABLE,
                f"refusing to remove keyId {old or '?'}: it is the credential in use (the new one is {new or '?'})",
            )
        if any(c.get("keyId") == old for c in listing):
            await remove_password(await self._graph(spec, inputs, tokens), old)
            self.discovery.forget(spec)
        new_state = {**state, "phase": "Done", "removedAt": timestamp(now)}
        new_state.pop("lastFailure", None)
        message = f"Removed the old client secret (keyId {old}) after the grace period; renewal done."
        return Step(new_state, [Event("Normal", "RenewalOldCredentialRemoved", message)])

    # ---------------------------------------------------------------------------------------- helpers

    async def _write_secret(self, namespace: str, name: str, data: Mapping[str, str], **meta: Any) -> None:
        try:
            await self.kube.write_secret(namespace, name, data, **meta)
        except CheckFailed as exc:
            if exc.reason is not Reason.ACCESS_DENIED:
                raise
            # Off by default in the chart: say which value grants it, not only which call was refused.
            raise CheckFailed(
                exc.reason,
                f"{exc.message}; renewal stores the new secret in that Secret: grant create and patch on "
                "Secrets (Helm chart: rbac.renewSecrets=true)",
            ) from None

    async def _listing(
        self, spec: SmtpOAuthSpec, inputs: Inputs, tokens: TokenProvider, now: datetime
    ) -> list[Mapping[str, Any]]:
        """A fresh read: a renewal step never acts on a cached listing."""
        found = await self.discovery.discover(spec, inputs, tokens, now=now, refresh=True)
        read = {Reason.DISCOVERED, Reason.CREDENTIAL_NOT_LISTED, Reason.CREDENTIAL_AMBIGUOUS}
        if found is None or found.credentials is None or found.reason not in read:
            raise CheckFailed(
                Reason.GRAPH_UNAVAILABLE,
                f"Microsoft Graph could not be read ({found.message if found else '-'})",
            )
        return list(found.credentials)

    async def _graph(self, spec: SmtpOAuthSpec, inputs: Inputs, tokens: TokenProvider) -> GraphRead:
        request = dataclasses.replace(
            token_request(spec, inputs),
            scope=spec.graph_scope,
            proxy_url=proxy_for(spec, urlsplit(spec.graph_host).hostname or ""),
        )
        token = await tokens.acquire(request)
        return GraphRead(
            graph_host=spec.graph_host,
            app_id=spec.client_id,
            token=token.value,
            ca_pem=inputs.identity_ca,
            proxy_url=request.proxy_url,
            timeout=spec.identity_timeout,
            secrets=(inputs.client_secret,),
        )

    def _failed(self, state: dict[str, Any], step: str, exc: CheckFailed, now: datetime) -> Step:
        names = {"Adding": "addPassword", "Testing": "test", "Removing": "removePassword", "Active": "switch"}
        what = names.get(step, step)
        failure = {
            "step": what,
            "reason": str(exc.reason),
            "message": exc.message[:1024],
            "time": timestamp(now),
        }
        previous = state.get("lastFailure") or {}
        events = []
        if (previous.get("step"), previous.get("reason")) != (what, str(exc.reason)):
            events.append(
                Event("Warning", "RenewalFailed", f"Renewal step {what} failed ({exc.reason}): {exc.message}")
            )
        delay = timedelta(seconds=exc.retry_after) if exc.retry_after else RETRY
        return Step({**state, "lastFailure": failure}, events, now + delay)
