"""docs/api.md must not drift from the code and the CRD: every reason, condition, Event, field and column."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from smtp_oauth_operator.domain.reasons import ConditionType, Reason, info
from smtp_oauth_operator.domain.spec import RECHECK_ANNOTATION

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "api.md").read_text()
CRD = yaml.safe_load((ROOT / "crds" / "smtpoauthconfigs.smtpoauth.dev.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]

EVENTS = {
    "ConnectionTestSucceeded": "Normal",
    "ConnectionTestFailed": "Warning",
    "ClientSecretExpiringSoon": "Warning",
    "ClientSecretExpired": "Warning",
    "ClientSecretRotated": "Normal",
    "ClientCertificateExpiringSoon": "Warning",
    "ClientCertificateExpired": "Warning",
    "ClientCertificateRotated": "Normal",
    "AlarmNotificationFailed": "Warning",
    "AlarmNotificationUnknown": "Warning",
    "SecretNotProtected": "Warning",
    "ExpiryMismatch": "Warning",
    "ExpiryDiscoveryFailed": "Warning",
    "RenewalStarted": "Normal",
    "RenewalCredentialAdded": "Normal",
    "RenewalSwitched": "Normal",
    "RenewalOldCredentialRemoved": "Normal",
    "RenewalOrphanRemoved": "Warning",
    "RenewalFailed": "Warning",
}


def _section(heading: str) -> str:
    """The text of the section under ``heading`` (e.g. "## Events"), up to the next heading of that level."""
    level = heading.split(" ", maxsplit=1)[0]
    start = DOC.index(f"\n{heading}\n")
    end = DOC.find(f"\n{level} ", start + len(heading) + 2)
    return DOC[start : end if end != -1 else len(DOC)]


def _row(first_cell: str, heading: str) -> list[str]:
    """The cells of the table row whose first cell is ``first_cell``, in the section under ``heading``."""
    prefix = f"| {first_cell} |"
    for line in _section(heading).splitlines():
        if line.startswith(prefix):
            return [cell.strip() for cell in line.strip().strip("|").split(" | ")]
    raise AssertionError(f"docs/api.md has no row for {first_cell} under {heading}")


def _expected_row(reason: Reason) -> str:
    i = info(reason)
    return f"| `{reason}` | {i.condition} | {'yes' if i.transient else 'no'} | {i.remedy} |"


def test_every_condition_type_is_documented() -> None:
    for ctype in ConditionType:
        assert _row(f"`{ctype}`", "## Conditions"), (
            f"docs/api.md: add condition {ctype} to the Conditions table"
        )


@pytest.mark.parametrize("reason", list(Reason), ids=str)
def test_every_reason_is_documented_with_its_condition_transience_and_remedy(reason: Reason) -> None:
    assert f"`{reason}`" in DOC
    i = info(reason)
    cells = _row(f"`{reason}`", "### Reasons")
    hint = f"docs/api.md: the Reasons table row should read\n{_expected_row(reason)}"
    assert cells[1].startswith(str(i.condition)), hint
    assert cells[2] == ("yes" if i.transient else "no"), hint
    assert cells[3] == i.remedy, hint


@pytest.mark.parametrize(("event", "kind"), EVENTS.items())
def test_every_event_is_documented(event: str, kind: str) -> None:
    assert _row(f"`{event}`", "## Events")[1] == kind


def test_recheck_annotation_is_documented() -> None:
    assert _row(f"`{RECHECK_ANNOTATION}`", "## Annotations")
    assert f'{RECHECK_ANNOTATION}="$(date +%s)" --overwrite' in DOC


def _paths(node: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for name, child in (node.get("properties") or {}).items():
        path = f"{prefix}.{name}" if prefix else name
        out.append(path)
        out.extend(_paths(child, path))
    return out


def test_every_spec_field_is_documented() -> None:
    # References' name and key, and identity.caBundle's refs, are described with their parent's row.
    paths = [
        p
        for p in _paths(SCHEMA["properties"]["spec"])
        if p.count(".") <= 2 and not p.startswith("identity.caBundle.")
    ]
    missing = [p for p in paths if f"`{p}`" not in DOC]
    assert not missing, f"docs/api.md: document spec fields {missing}"


def test_every_status_field_is_documented() -> None:
    status = _section("## Status")
    missing = [p for p in SCHEMA["properties"]["status"]["properties"] if f"| `{p}` |" not in status]
    assert not missing, f"docs/api.md: document status fields {missing}"


def test_printer_columns_are_documented() -> None:
    for column in VERSION["additionalPrinterColumns"]:
        assert _row(column["name"], "## Printer columns")[1] == f"`{column['jsonPath']}`"
