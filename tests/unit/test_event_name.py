"""Event names stay valid and unique for resource names of any allowed length (issue 10, defect 12)."""

from __future__ import annotations

import re

import pytest

from smtp_oauth_operator.clients.kube import event_name

SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@pytest.mark.parametrize(
    "name",
    ["mail", "a" * 253, ("a" * 63 + ".") * 3 + "a" * 43 + "." + "b" * 17, "a" * 235 + "-" + "b" * 17],
    ids=["short", "253", "cut-at-a-dot", "cut-at-a-dash"],
)
def test_event_names_are_valid_and_unique(name: str) -> None:
    names = {event_name(name) for _ in range(200)}
    assert len(names) == 200
    for event in names:
        assert len(event) <= 253
        assert SUBDOMAIN.match(event), event
        assert event.startswith(name[:200])
