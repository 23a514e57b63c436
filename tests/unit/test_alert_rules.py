"""Every metric the chart's alert rules query is one the code exports (operator or relay)."""

from __future__ import annotations

import re
from pathlib import Path

from smtp_oauth_operator.clients.metrics import Metrics, RelayMetrics

RULES = (
    Path(__file__).resolve().parents[2]
    / "charts"
    / "smtp-oauth-operator"
    / "templates"
    / "prometheusrule.yaml"
)


def _exported() -> set[str]:
    names: set[str] = set()
    for registry in (Metrics().registry, RelayMetrics().registry):
        for metric in registry.collect():
            names |= {sample.name for sample in metric.samples} | {metric.name}
        # Series of counters without samples yet are still named "<name>_total" when scraped.
        names |= {f"{n}_total" for n in list(names)}
    return names


def test_alert_rules_query_exported_metrics() -> None:
    queried = set(re.findall(r"\bsmtpoauth_[a-z_]+", RULES.read_text()))
    assert {"smtpoauth_relay_messages_total", "smtpoauth_relay_auth_failures_total"} <= queried
    assert queried <= _exported(), queried - _exported()
