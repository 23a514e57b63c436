"""Is the referenced Secret kept the healthy way (sealed or external, excluded from backups)?

Cisco ISE keeps its OAuth settings out of backups. In Kubernetes the equivalent is a Secret unsealed
from a SealedSecret (or synced by an ExternalSecret) and labelled for Velero to skip: what is backed up
and committed is then only ciphertext or a reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from smtp_oauth_operator.domain.reasons import Reason

__all__ = ["BACKUP_EXCLUDE_LABEL", "Protection", "assess"]

BACKUP_EXCLUDE_LABEL = "velero.io/exclude-from-backup"
_CONTROLLERS = {
    ("bitnami.com", "SealedSecret"): "SealedSecret",
    ("external-secrets.io", "ExternalSecret"): "ExternalSecret",
}


@dataclass(frozen=True, slots=True)
class Protection:
    status: str  # True / False
    reason: Reason
    message: str

    @property
    def protected(self) -> bool:
        return self.status == "True"


def _controller(owner_refs: Sequence[Mapping[str, Any]]) -> str | None:
    for ref in owner_refs:
        group = str(ref.get("apiVersion", "")).split("/", 1)[0]
        kind = _CONTROLLERS.get((group, str(ref.get("kind", ""))))
        if kind:
            return f"{kind} {ref.get('name', '?')}"
    return None


def assess(secret_name: str, metadata: Mapping[str, Any], policy: str) -> Protection:
    """Assess the Secret's metadata; ``policy`` is spec.secretPolicy (Warn, Require, Ignore)."""
    if policy == "Ignore":
        return Protection("True", Reason.POLICY_IGNORED, "Not checked: spec.secretPolicy is Ignore.")
    controller = _controller(metadata.get("ownerReferences") or [])
    labels = metadata.get("labels") or {}
    if controller is None:
        return Protection(
            "False",
            Reason.NOT_SEALED,
            f"Secret {secret_name} is not managed by a SealedSecret or an ExternalSecret, so its plain "
            "value is what gets committed or backed up; seal it with kubeseal.",
        )
    if str(labels.get(BACKUP_EXCLUDE_LABEL, "")).lower() != "true":
        where = (
            "in the SealedSecret's spec.template.metadata.labels"
            if controller.startswith("SealedSecret")
            else "in the ExternalSecret's spec.target.template.metadata.labels"
        )
        return Protection(
            "False",
            Reason.NOT_EXCLUDED_FROM_BACKUP,
            f"Secret {secret_name} (from {controller}) lacks the label {BACKUP_EXCLUDE_LABEL}=true, so "
            f"backups store its value decrypted; add the label {where}.",
        )
    return Protection(
        "True",
        Reason.PROTECTED,
        f"Secret {secret_name} comes from {controller} and is excluded from backups.",
    )
