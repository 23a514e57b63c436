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

Certificate renewal (``clientCertificate.renewal``) follows cert-manager instead of deciding when to renew,
and needs no Graph write permission: an app may roll its own keys (``addKey``/``removeKey``) with a proof
of possession signed by a certificate it already has. Since cert-manager overwrites the referenced Secret
(and, with ``rotationPolicy: Always``, the private key), the operator first copies the registered pair into
a Secret it owns (``{name}-registered``, type kubernetes.io/tls) and authenticates with that copy
(domain/renewal.py). Then:

``Done``      each pass compares the referenced Secret's certificate with the registered one; a new one →
              ``Adding`` (old and new SHA-1 thumbprints and the old keyId recorded).
``Adding``    the new certificate is registered with ``addKey``, the proof signed by the copy's key — unless
              Graph already lists its thumbprint (a resumed step, or someone uploaded it): then adopted.
``Testing``   the connection is tested with the referenced Secret; a pass copies the new pair over the old.
``Active``, ``Removing``  as for secrets, with ``removeKey`` (the proof signed by the new pair), then ``Done``.

Nothing here writes status; it returns the new ``status.renewal`` and the Events for the reconciler to write.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from smtp_oauth_operator.clients.graph import (
    GraphRead,
    add_key,
    add_password,
    remove_key,
    remove_password,
)
from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.clients.kube import Kube
from smtp_oauth_operator.domain.credentials import (
    CertificateCredential,
    CertificateError,
    parse_certificate,
    proof_of_possession,
)
from smtp_oauth_operator.domain.discovery import Discovery
from smtp_oauth_operator.domain.reasons import CheckFailed, Reason
from smtp_oauth_operator.domain.renewal import (
    CERTIFICATE,
    OWNED_KEY,
    SECRET,
    owned_secret_name,
    renewed_spec,
)
from smtp_oauth_operator.domain.spec import SmtpOAuthSpec, SpecError, parse_spec, parse_time
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

__all__ = ["Renewer", "Step"]

INTENT_ANNOTATION = "smtpoauth.dev/renewal-intent"
KEY_ID_ANNOTATION = "smtpoauth.dev/renewal-key-id"
RETRY = timedelta(seconds=30)
NEXT_STEP = timedelta(seconds=1)


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
        recorded: Mapping[str, Any] | None,
    ) -> Step:
        """One step for the resource whose ``status.renewal`` is ``recorded``."""
        if discovered is None:
            return Step()
        if spec.client_certificate is not None and spec.client_certificate.renewal_grace is not None:
            return await self._advance_certificate(
                body, spec, inputs, tokens, discovered, source, now, recorded
            )
        renewal = spec.renewal
        if renewal is None:
            return Step()
        meta = body.get("metadata") or {}
        # A certificate's record is not a client secret's (the resource moved from one to the other).
        state: dict[str, Any] = dict(recorded or {}) if (recorded or {}).get("kind", SECRET) == SECRET else {}
        phase = state.get("phase")
        try:
            if phase in (None, "Done"):
                return self._maybe_start(state, spec, meta, discovered, now)
            if phase == "Adding":
                return await self._add(state, spec, body, inputs, tokens, source, now)
            if phase == "Testing":
                return await self._test(state, spec, meta, tokens, source, now)
            if phase == "Active":
                return _after_grace(state, now)
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
            "kind": SECRET,
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
            labels, owner = _owned_labels(meta), _owner(body)
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
        new_state = _moved(state, "Testing", newKeyId=key_id)
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
        new_state = _moved(
            state,
            "Active",
            switchedAt=timestamp(now),
            removeAfter=timestamp(remove_after),
        )
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
        certificate = state.get("kind") == CERTIFICATE
        if any(c.get("keyId") == old for c in listing):
            graph = await self._graph(spec, inputs, tokens)
            if certificate:  # the proof is signed by the new pair, now in use
                await remove_key(graph, old, self._proof(inputs, found, now))
            else:
                await remove_password(graph, old)
            self.discovery.forget(spec)
        new_state = _moved(state, "Done", removedAt=timestamp(now))
        noun = "certificate" if certificate else "client secret"
        message = f"Removed the old {noun} (keyId {old}) after the grace period; renewal done."
        return Step(new_state, [Event("Normal", "RenewalOldCredentialRemoved", message)])

    # ------------------------------------------------------------------------------ certificates

    async def _advance_certificate(
        self,
        body: Mapping[str, Any],
        spec: SmtpOAuthSpec,
        inputs: Inputs,
        tokens: TokenProvider,
        found: Discovery,
        source: ObjectSource,
        now: datetime,
        recorded: Mapping[str, Any] | None,
    ) -> Step:
        """``spec`` is the one in use (the operator's copy, once made); the referenced Secret is the
        original spec's."""
        meta = body.get("metadata") or {}
        state: dict[str, Any] = dict(recorded or {}) if (recorded or {}).get("kind") == CERTIFICATE else {}
        phase = state.get("phase")
        try:
            original = parse_spec(body.get("spec"))
        except SpecError:
            return Step()  # the pass reports InvalidSpec; nothing to renew
        try:
            if phase is None:
                return await self._keep_copy(spec, meta, body, inputs, found, now)
            if phase == "Done":
                return await self._look_for_new(state, original, meta, source, now)
            if phase == "Adding":
                return await self._add_certificate(
                    state, spec, original, meta, inputs, tokens, found, source, now
                )
            if phase == "Testing":
                return await self._test_certificate(state, original, body, tokens, source, now)
            if phase == "Active":
                return _after_grace(state, now)
            if phase == "Removing":
                return await self._remove(state, spec, inputs, tokens, found, now)
        except CheckFailed as exc:
            return self._failed({**state, "kind": CERTIFICATE}, str(phase), exc, now)
        return Step()

    async def _keep_copy(
        self,
        spec: SmtpOAuthSpec,
        meta: Mapping[str, Any],
        body: Mapping[str, Any],
        inputs: Inputs,
        found: Discovery,
        now: datetime,
    ) -> Step:
        """First pass: copy the registered pair (the referenced Secret's, which Graph lists) into the
        operator's Secret, so that its key can sign the proof when cert-manager replaces both."""
        cert = inputs.certificate
        if cert is None or len(found.in_use) != 1:
            return Step()  # not identified in Graph: nothing registered to keep
        name = owned_secret_name(str(meta.get("name")), suffix="registered")
        await self._store_pair(body, name, cert)
        state = {
            "kind": CERTIFICATE,
            "phase": "Done",
            "secretName": name,
            "thumbprint": cert.thumbprint_sha1,
            "keyId": found.in_use[0],
        }
        namespace = str(meta.get("namespace") or "default")
        message = (
            f"Copied the registered certificate (SHA-1 {cert.thumbprint_sha1}, keyId {found.in_use[0]}) into "
            f"Secret {namespace}/{name}, which the operator owns and now authenticates with; a new certificate "
            f"in Secret {namespace}/{spec.client_certificate.secret_name if spec.client_certificate else '?'} "
            "is registered through Microsoft Graph before it is used."
        )
        return Step(state, [Event("Normal", "RenewalPrepared", message)])

    async def _look_for_new(
        self,
        state: dict[str, Any],
        original: SmtpOAuthSpec,
        meta: Mapping[str, Any],
        source: ObjectSource,
        now: datetime,
    ) -> Step:
        namespace = str(meta.get("namespace") or "default")
        fresh = await self._referenced_pair(original, namespace, source)
        if fresh.thumbprint_sha1 == state.get("thumbprint"):
            if "lastFailure" in state:
                state.pop("lastFailure")
                return Step(state)
            return Step()
        if fresh.not_after <= now:
            raise CheckFailed(
                Reason.CERTIFICATE_EXPIRED,
                f"the new certificate in Secret {namespace}/{self._referenced(original)} (SHA-1 "
                f"{fresh.thumbprint_sha1}) expired {timestamp(fresh.not_after)}; not registering it",
            )
        new_state = {
            "kind": CERTIFICATE,
            "phase": "Adding",
            "secretName": state.get("secretName"),
            "thumbprint": state.get("thumbprint"),
            "keyId": state.get("keyId"),
            "oldThumbprint": state.get("thumbprint"),
            "oldKeyId": state.get("keyId"),
            "newThumbprint": fresh.thumbprint_sha1,
            "startedAt": timestamp(now),
        }
        message = (
            f"Secret {namespace}/{self._referenced(original)} holds a new certificate (SHA-1 "
            f"{fresh.thumbprint_sha1}, notAfter {timestamp(fresh.not_after)}) replacing the registered one "
            f"(SHA-1 {state.get('thumbprint')}): registering it on app {original.client_id} through Microsoft "
            "Graph (addKey, with a proof signed by the registered one)."
        )
        return Step(new_state, [Event("Normal", "RenewalStarted", message)], now + NEXT_STEP)

    async def _add_certificate(
        self,
        state: dict[str, Any],
        spec: SmtpOAuthSpec,
        original: SmtpOAuthSpec,
        meta: Mapping[str, Any],
        inputs: Inputs,
        tokens: TokenProvider,
        found: Discovery,
        source: ObjectSource,
        now: datetime,
    ) -> Step:
        namespace = str(meta.get("namespace") or "default")
        fresh = await self._referenced_pair(original, namespace, source)
        if fresh.thumbprint_sha1 != state.get("newThumbprint"):
            # Replaced again before it was registered: register the newest instead.
            return Step({**state, "newThumbprint": fresh.thumbprint_sha1}, next_due=now + NEXT_STEP)
        listing = await self._listing(spec, inputs, tokens, now)
        known = [
            c
            for c in listing
            if c.get("type") == "Certificate" and str(c.get("thumbprint") or "") == fresh.thumbprint_sha1
        ]
        events: list[Event] = []
        if known:
            key_id = str(known[0]["keyId"])
            what = f"Microsoft Graph already lists the new certificate as keyId {key_id}: adopted"
        else:
            proof = self._proof(inputs, found, now)  # signed by the registered pair, still in use
            graph = await self._graph(spec, inputs, tokens)
            added = await add_key(graph, fresh.leaf_der, fresh.subject[:200] or "smtp-oauth-operator", proof)
            key_id = str(added.get("keyId") or "")
            if not key_id:
                raise CheckFailed(Reason.GRAPH_UNAVAILABLE, "Microsoft Graph's addKey answer had no keyId")
            self.discovery.forget(spec)
            what = f"Registered the new certificate on app {spec.client_id} as keyId {key_id}"
        new_state = _moved(state, "Testing", newKeyId=key_id)
        events.append(
            Event(
                "Normal",
                "RenewalCredentialAdded",
                f"{what} (SHA-1 {fresh.thumbprint_sha1}); testing it next.",
            )
        )
        return Step(new_state, events, now + NEXT_STEP)

    async def _test_certificate(
        self,
        state: dict[str, Any],
        original: SmtpOAuthSpec,
        body: Mapping[str, Any],
        tokens: TokenProvider,
        source: ObjectSource,
        now: datetime,
    ) -> Step:
        meta = body.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        generation = int(meta.get("generation") or 0)
        fresh = await resolve(original, namespace, generation, source)
        cert = fresh.certificate
        if cert is None or cert.thumbprint_sha1 != state.get("newThumbprint"):
            # Replaced again after registration: start over with the newest (the one registered in between
            # is not used by anyone; it is listed in status.appCredentials for removal by hand).
            return Step({**state, "phase": "Done"}, next_due=now + NEXT_STEP)
        result = await run(original, fresh, tokens, where=f"{namespace}/{meta.get('name')}", now=now)
        if result.failure is not None:
            raise result.failure
        name = str(state.get("secretName"))
        await self._store_pair(body, name, cert)
        remove_after = now + (_grace(original) or timedelta(0))
        new_state = _moved(
            state,
            "Active",
            thumbprint=cert.thumbprint_sha1,
            keyId=state.get("newKeyId"),
            switchedAt=timestamp(now),
            removeAfter=timestamp(remove_after),
        )
        message = (
            f"The new certificate (SHA-1 {cert.thumbprint_sha1}, keyId {state.get('newKeyId')}) passed the "
            f"connection test; Secret {namespace}/{name} now holds it. The old one (keyId {state.get('oldKeyId')}) "
            f"is removed after the grace period, at {timestamp(remove_after)}."
        )
        return Step(new_state, [Event("Normal", "RenewalSwitched", message)], remove_after)

    @staticmethod
    def _proof(inputs: Inputs, found: Discovery, now: datetime) -> str:
        """A proof of possession signed by the pair in use (Graph's addKey / removeKey)."""
        signer = inputs.certificate
        if signer is None or not found.object_id:
            raise CheckFailed(
                Reason.GRAPH_UNAVAILABLE, "the application's object ID or the registered pair is not known"
            )
        try:
            return proof_of_possession(
                object_id=found.object_id,
                private_key_pem=signer.private_key_pem.encode(),
                certificate_der=signer.leaf_der,
                now=now,
            )
        except CertificateError as exc:
            raise CheckFailed(
                Reason.CERTIFICATE_INVALID, f"cannot sign the proof of possession: {exc}"
            ) from None

    @staticmethod
    def _referenced(original: SmtpOAuthSpec) -> str:
        return original.client_certificate.secret_name if original.client_certificate else "?"

    async def _referenced_pair(
        self, original: SmtpOAuthSpec, namespace: str, source: ObjectSource
    ) -> CertificateCredential:
        """The certificate cert-manager keeps in the referenced Secret (always read afresh)."""
        name = self._referenced(original)
        secret = await source.read("Secret", namespace, name)
        if secret is None:
            raise CheckFailed(Reason.SECRET_NOT_FOUND, f"Secret {namespace}/{name} does not exist")
        try:
            return parse_certificate(secret.data.get("tls.crt", ""), secret.data.get("tls.key", ""))
        except CertificateError as exc:
            raise CheckFailed(Reason.CERTIFICATE_INVALID, f"Secret {namespace}/{name}: {exc}") from None

    async def _store_pair(self, body: Mapping[str, Any], name: str, cert: CertificateCredential) -> None:
        meta = body.get("metadata") or {}
        await self._write_secret(
            str(meta.get("namespace") or "default"),
            name,
            {"tls.crt": cert.chain_pem, "tls.key": cert.private_key_pem},
            labels=_owned_labels(meta),
            annotations={},
            owner=_owner(body),
            secret_type="kubernetes.io/tls",
        )

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
                f"{exc.message}; renewal stores the credential in use in that Secret: grant create and patch on "
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
        if state.get("kind") == CERTIFICATE:
            names = {"Adding": "addKey", "Removing": "removeKey", "Done": "check", "None": "prepare"}
        else:
            names = {"Adding": "addPassword", "Removing": "removePassword"}
        what = {"Testing": "test", "Active": "switch", **names}.get(step, step)
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


def _owned_labels(meta: Mapping[str, Any]) -> dict[str, str]:
    return {
        "velero.io/exclude-from-backup": "true",
        "app.kubernetes.io/managed-by": "smtp-oauth-operator",
        "smtpoauth.dev/renewal-of": str(meta.get("name"))[:63],
    }


def _owner(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "apiVersion": str(body.get("apiVersion") or "smtpoauth.dev/v1alpha1"),
        "kind": "SmtpOAuthConfig",
        "name": str(meta.get("name")),
        "uid": str(meta.get("uid") or ""),
        "controller": True,
        "blockOwnerDeletion": False,
    }


def _grace(spec: SmtpOAuthSpec) -> timedelta | None:
    return spec.client_certificate.renewal_grace if spec.client_certificate else None


def _after_grace(state: dict[str, Any], now: datetime) -> Step:
    """``Active``: wait out the grace period, then record ``Removing``."""
    remove_after = parse_time(str(state.get("removeAfter") or timestamp(now)))
    if now < remove_after:
        return Step(next_due=remove_after)
    return Step({**state, "phase": "Removing"}, next_due=now + NEXT_STEP)


def _moved(state: dict[str, Any], phase: str, **changes: Any) -> dict[str, Any]:
    """The record after a step succeeded: the next phase, the step's facts, no ``lastFailure``."""
    moved = {**state, "phase": phase, **changes}
    moved.pop("lastFailure", None)
    return moved
