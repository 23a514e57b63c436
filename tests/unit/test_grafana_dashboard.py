"""The chart's Grafana dashboard queries only metrics the code exports, and the chart ships it.

Every panel (rows aside) has at least one target, every target's expression queries a ``smtpoauth_``
series, and every such name is one that Metrics or RelayMetrics exports: a renamed metric fails here
instead of leaving an empty panel. The ConfigMap is rendered with helm when the tools built by
hack/k8s-tools.sh are there (e2e/test_chart.py renders it with everything on as well).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from smtp_oauth_operator.clients.metrics import Metrics, RelayMetrics

CHART = Path(__file__).resolve().parents[2] / "charts" / "smtp-oauth-operator"
DASHBOARD = CHART / "files" / "dashboards" / "smtp-oauth-operator.json"
METRIC = re.compile(r"\bsmtpoauth_[a-z_]+")


def _exported() -> set[str]:
    names: set[str] = set()
    for registry in (Metrics().registry, RelayMetrics().registry):
        for metric in registry.collect():
            names |= {sample.name for sample in metric.samples} | {metric.name}
        # Counters without samples yet are still named "<name>_total" when scraped.
        names |= {f"{n}_total" for n in list(names)}
    return names


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return [p for p in panels if p.get("type") != "row"]


def test_every_panel_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = _exported()
    panels = _panels(dashboard)
    assert len(panels) >= 6
    queried: set[str] = set()
    for panel in panels:
        targets = panel.get("targets") or []
        assert targets, f"panel {panel['title']!r} has no target"
        for target in targets:
            names = set(METRIC.findall(target.get("expr", "")))
            assert names, f"panel {panel['title']!r}: {target.get('expr')!r} queries no smtpoauth_ metric"
            assert names <= exported, f"panel {panel['title']!r} queries {names - exported}, not exported"
            queried |= names
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        assert set(METRIC.findall(text)) <= exported, variable["name"]
    # What issue 11 asks the dashboard to show.
    assert {
        "smtpoauth_client_secret_expiration_timestamp_seconds",
        "smtpoauth_ready",
        "smtpoauth_connection_tests_total",
        "smtpoauth_relay_messages_total",
        "smtpoauth_relay_duration_seconds_bucket",
        "smtpoauth_relay_auth_failures_total",
    } <= queried


def test_panel_ids_are_unique_and_the_datasource_is_a_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "smtp-oauth-operator"
    for panel in _panels(dashboard):
        # A hard-coded data source uid would not exist in the user's Grafana.
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def _helm() -> str | None:
    candidates = [os.environ.get("SMTPOAUTH_K8S_BIN_DIR", "")]
    cache = Path.home() / ".cache" / "smtp-oauth-operator" / "k8s"
    candidates += [str(p) for p in sorted(cache.glob("v*/bin"), reverse=True)]
    for directory in candidates:
        if directory and (Path(directory) / "helm").is_file():
            return str(Path(directory) / "helm")
    return shutil.which("helm")


def _template(*args: str) -> list[dict[str, Any]]:
    helm = _helm()
    if helm is None:
        pytest.skip("helm is not built yet (hack/k8s-tools.sh); e2e/test_chart.py renders the ConfigMap")
    out = subprocess.run(
        [helm, "template", "smtp", str(CHART), "-n", "obs", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _dashboards(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]


def test_the_chart_renders_the_dashboard_configmap_only_when_enabled() -> None:
    assert _dashboards(_template()) == []
    docs = _template(
        "--set", "grafanaDashboard.enabled=true",
        "--set", "grafanaDashboard.annotations.grafana_folder=Mail",
        "--set", "grafanaDashboard.namespace=monitoring",
    )  # fmt: skip
    (configmap,) = _dashboards(docs)
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Mail"}
    (key,) = configmap["data"]
    assert json.loads(configmap["data"][key]) == json.loads(DASHBOARD.read_text())
