"""The README's troubleshooting table says what the code does (no drift)."""

from __future__ import annotations

import re
from pathlib import Path

from smtp_oauth_operator.domain.reasons import Reason, info

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
# Reasons that only ever mean "fine" or "not checked yet" have no troubleshooting row.
BENIGN = {
    "ConnectionTested",
    "Resolved",
    "TokenIssued",
    "Authenticated",
    "NotTested",
    "NotExpiring",
    "Protected",
    "PolicyIgnored",
    "RenewalScheduled",
    "Renewing",
    "Renewed",
    "ExpiryUnknown",
    "Discovered",
}


def rows() -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for line in README.splitlines():
        match = re.match(r"^\| `(\w+)` \|(.*)\|\s*$", line)
        if match:
            table[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return table


def test_every_failure_reason_has_a_row_with_its_remedy() -> None:
    table = rows()
    for reason in Reason:
        if reason.value in BENIGN:
            assert reason.value not in table
            continue
        assert reason.value in table, f"README troubleshooting table lacks {reason.value}"
        _when, retried, remedy = table[reason.value]
        assert remedy == info(reason).remedy
        assert retried.startswith("yes") == info(reason).transient


def test_the_two_commands_are_the_makefile_targets() -> None:
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert "| `make demo` |" in README
    assert "\ndemo:" in makefile
    assert "| `make test` |" in README
    assert "\ntest:" in makefile
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "make test" in ci
