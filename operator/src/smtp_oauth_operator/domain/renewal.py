"""Which Secret a resource under renewal authenticates with (pure; services/renewal.py takes the steps).

The operator, the relay and the connection test must all agree on it, so it is decided here from
``spec`` and ``status.renewal`` alone. A client secret: before the first switch the spec's own Secret,
after it the operator's Secret (``{name}-renewed``), during a later renewal the renewed Secret still in
use. A certificate: the operator's copy of the registered pair (``{name}-registered``) as soon as it exists;
the referenced Secret is where cert-manager puts the next one.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any, Literal

from smtp_oauth_operator.domain.reasons import Reason
from smtp_oauth_operator.domain.spec import KeyRef, SmtpOAuthSpec, SpecError, parse_spec

__all__ = [
    "CERTIFICATE",
    "OWNED_KEY",
    "SECRET",
    "SWITCHED",
    "condition",
    "owned_secret_name",
    "references",
    "renewed_spec",
    "state_of",
]

OWNED_KEY = "client-secret"
SECRET = "ClientSecret"  # status.renewal.kind (absent in renewals recorded before certificates were renewed)
CERTIFICATE = "ClientCertificate"
SWITCHED = frozenset({"Active", "Removing", "Done"})


def owned_secret_name(resource: str, *, other_than: str | None = None, suffix: str = "renewed") -> str:
    """``{name}-renewed``, or ``{name}-renewed-b`` when the first one holds the secret in use (a second
    renewal must not overwrite the value the resource still authenticates with). A certificate's copy is
    ``{name}-registered`` (a kubernetes.io/tls Secret: a Secret's type cannot change, so it never shares a
    name with an Opaque one from an earlier client-secret renewal)."""
    base = (
        resource
        if len(resource) <= 236
        else f"{resource[:227]}-{hashlib.sha256(resource.encode()).hexdigest()[:8]}"
    )
    name = f"{base}-{suffix}"
    return f"{name}-b" if name == other_than else name


def renewed_spec(spec: SmtpOAuthSpec, state: Mapping[str, Any] | None) -> SmtpOAuthSpec:
    """The spec the resource is tested with: once switched, the operator's own Secret (whose date Graph knows);
    during a later renewal, the renewed Secret still in use (``fromSecret``) until the next switch."""
    cert = spec.client_certificate
    if cert is not None:
        # A certificate under renewal: the operator's copy of the registered pair, in every phase once it
        # exists (the referenced Secret may already hold a certificate Entra ID does not know yet).
        if cert.renewal_grace is None or not state or state.get("kind") != CERTIFICATE:
            return spec
        if not state.get("secretName"):
            return spec
        return dataclasses.replace(
            spec, client_certificate=dataclasses.replace(cert, secret_name=str(state["secretName"]))
        )
    if spec.renewal is None or not state or state.get("kind", SECRET) != SECRET:
        return spec
    if state.get("phase") in SWITCHED and state.get("secretName"):
        name = str(state["secretName"])
    elif state.get("fromSecret"):
        name = str(state["fromSecret"])
    else:
        return spec
    ref = KeyRef("Secret", name, OWNED_KEY)
    return dataclasses.replace(spec, secret_ref=ref, expires_at=None, expires_at_key=None)


def state_of(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """``status.renewal`` of a resource body, when it has one."""
    status = body.get("status")
    state = status.get("renewal") if isinstance(status, Mapping) else None
    return state if isinstance(state, Mapping) else None


_STEPS = {
    "Adding": "1/4, adding (registering) the new credential",
    "Testing": "2/4, testing the new credential",
    "Active": "3/4, switched; the old credential is removed after the grace period",
    "Removing": "4/4, removing the old credential",
}


def condition(state: Mapping[str, Any] | None) -> tuple[str, Reason, str]:
    """The Renewal condition (status, reason, message) for ``status.renewal``: False only while a step
    fails (RenewalFailed, naming the step); renewal never changes Ready, the test of the credential in use
    decides that."""
    state = state or {}
    phase = str(state.get("phase") or "")
    failure = state.get("lastFailure")
    if isinstance(failure, Mapping):
        return (
            "False",
            Reason.RENEWAL_FAILED,
            f"Renewal step {failure.get('step')} failed ({failure.get('reason')}): {failure.get('message')} "
            f"Retried by itself; the credential in use is unaffected.",
        )
    if phase in _STEPS:
        return "Unknown", Reason.RENEWING, f"Renewal in progress: step {_STEPS[phase]}."
    if phase == "Done" and not state.get("switchedAt"):
        return (
            "True",
            Reason.RENEWAL_SCHEDULED,
            f"The registered certificate (SHA-1 {state.get('thumbprint')}) is kept in Secret "
            f"{state.get('secretName')}; a new certificate in the referenced Secret is registered through "
            "Microsoft Graph before it is used.",
        )
    if phase == "Done":
        return (
            "True",
            Reason.RENEWED,
            f"Renewed at {state.get('switchedAt') or '?'}: the resource uses Secret {state.get('secretName')}; "
            f"the old credential was removed at {state.get('removedAt') or '?'}.",
        )
    return "True", Reason.RENEWAL_SCHEDULED, "Nothing to renew yet: renewal starts renewBefore the expiry."


def references(body: Mapping[str, Any]) -> set[tuple[Literal["Secret", "ConfigMap"], str]]:
    """(kind, name) of the objects whose change calls for a pass of ``body``: the spec's, and the Secret a
    renewal made the one in use (a deleted or edited ``{name}-renewed`` must be noticed too)."""
    try:
        spec = parse_spec(body.get("spec"))
    except SpecError:
        return set()
    return spec.referenced_objects() | renewed_spec(spec, state_of(body)).referenced_objects()
