"""The operator on the real control plane (issue 3): what a user sees through kubectl.

One operator process serves the whole session; each test works in its own namespace with its own
app registration on the local Entra ID, so the servers' counters can be read per test.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest
import yaml
from e2e.controlplane import REPO_ROOT, ControlPlane
from e2e.fixtures import Dev, Namespace, OperatorProcess, wait_until

pytestmark = pytest.mark.e2e

INVALID_SPECS = REPO_ROOT / "tests" / "samples" / "invalid_specs.yaml"


def _ready(ns: Namespace, dev: Dev, name: str = "mail") -> Any:
    """A working app, its Secret and a SmtpOAuthConfig, waited Ready with `kubectl wait`."""
    app = dev.new_app()
    ns.secret(app.secret)
    ns.smtp_oauth_config(name, dev.spec(app))
    ns.kubectl("wait", "--for=condition=Ready", f"smtpoauthconfig/{name}", "--timeout=30s")
    return app


def test_explain_shows_the_field_docs(control_plane: ControlPlane, crds: str) -> None:
    out = control_plane.kubectl("explain", "smtpoauthconfig.spec").stdout
    assert "KIND:       SmtpOAuthConfig" in out
    assert "The desired SMTP OAuth configuration." in out
    for field in ("username", "identity", "smtp", "alarms", "secretPolicy", "recheckInterval"):
        assert f"  {field}\t" in out, f"{field} missing from kubectl explain:\n{out}"
    assert "The mailbox to authenticate as" in out
    deep = control_plane.kubectl("explain", "smtpoauthconfig.spec.identity.clientSecret.expiresAt").stdout
    assert "RFC 3339" in deep


def test_ready_then_broken_secret_then_fixed(ns: Namespace, dev: Dev, operator: OperatorProcess) -> None:
    app = _ready(ns, dev)
    obj = ns.config("mail")
    assert ns.condition(obj, "Ready")["reason"] == "ConnectionTested"  # type: ignore[index]
    generation = obj["metadata"]["generation"]
    assert obj["status"]["observedGeneration"] == generation
    assert {c["observedGeneration"] for c in obj["status"]["conditions"]} == {generation}
    assert ns.condition(obj, "SmtpAuthenticated")["status"] == "True"  # type: ignore[index]
    assert len([a for a in dev.auth_attempts(app) if a.code == 235]) >= 1  # the server saw the AUTH
    assert ns.count_events("mail", "ConnectionTestSucceeded") == 1

    # Break the secret: the operator notices the Secret change by itself.
    ns.secret(dev.new_secret())
    obj = ns.wait_for_condition("mail", "Ready", "False", "InvalidClientSecret")
    assert "AADSTS7000215" in ns.condition(obj, "TokenAcquired")["message"]  # type: ignore[index]
    events = ns.kubectl("events", "--for", "smtpoauthconfig/mail").stdout
    line = next((ln for ln in events.splitlines() if "ConnectionTestFailed" in ln), None)
    assert line is not None, events
    assert "Warning" in line, line
    assert "InvalidClientSecret" in line, line
    describe = ns.kubectl("describe", "smtpoauthconfig", "mail").stdout
    assert "Events:" in describe
    assert "ConnectionTestFailed" in describe.split("Events:", 1)[1], describe
    assert "InvalidClientSecret" in describe

    # Fix it: Ready again, nothing restarted.
    pid, starts = (operator.proc.pid if operator.proc else None), operator.starts
    started = time.monotonic()
    ns.secret(app.secret)
    ns.kubectl("wait", "--for=condition=Ready", "smtpoauthconfig/mail", "--timeout=30s")
    elapsed = time.monotonic() - started
    print(f"fixed secret -> Ready in {elapsed:.1f}s")
    assert elapsed < 30
    assert operator.proc is not None
    assert (operator.proc.pid, operator.starts) == (pid, starts), "the operator was restarted"
    assert ns.count_events("mail", "ConnectionTestSucceeded") == 2


def test_invalid_specs_are_rejected_at_apply_time(ns: Namespace, crds: str) -> None:
    cases: list[dict[str, Any]] = yaml.safe_load(INVALID_SPECS.read_text())
    assert len(cases) >= 10

    def attempt(case: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        doc = {
            "apiVersion": "smtpoauth.dev/v1alpha1",
            "kind": "SmtpOAuthConfig",
            "metadata": {"name": case["name"]},
            "spec": case["spec"],
        }
        return case, ns.apply(doc, check=False)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(attempt, cases))
    failures = []
    for case, proc in results:
        field = f"spec.{case['field']}"
        if proc.returncode == 0:
            failures.append(f"{case['name']}: accepted ({proc.stdout.strip()})")
        elif field not in proc.stderr or "is invalid" not in proc.stderr:
            failures.append(f"{case['name']}: message does not name {field}: {proc.stderr.strip()}")
    assert not failures, "\n".join(failures)
    # Nothing was stored.
    listed = json.loads(ns.kubectl("get", "smtpoauthconfigs", "-o", "json").stdout)["items"]
    assert listed == []


def test_printer_columns(ns: Namespace, dev: Dev, operator: OperatorProcess) -> None:
    app = dev.new_app()
    ns.secret(app.secret)
    spec = dev.spec(app)
    spec["identity"]["clientSecret"]["expiresAt"] = "2031-05-31T00:00:00Z"
    ns.smtp_oauth_config("mail", spec)
    ns.kubectl("wait", "--for=condition=Ready", "smtpoauthconfig/mail", "--timeout=30s")
    out = ns.kubectl("get", "smtpoauthconfigs").stdout.splitlines()
    assert out[0].split() == ["NAME", "READY", "REASON", "EXPIRES", "AGE"], out[0]
    row = out[1].split()
    assert row[:4] == ["mail", "True", "ConnectionTested", "2031-05-31T00:00:00Z"], out[1]
    wide = ns.kubectl("get", "smtpoauthconfigs", "-o", "wide").stdout.splitlines()
    header = wide[0]
    for column in ("USERNAME", "SMTP", "LAST TEST", "MESSAGE"):
        assert column in header, header
    assert len(header.split()) > len(out[0].split())
    assert dev.endpoints.mailbox in wide[1]
    assert f"{dev.endpoints.smtp_host}:{dev.endpoints.smtp_port} (StartTLS)" in wide[1]


def test_survives_an_apiserver_restart(
    control_plane: ControlPlane, ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = _ready(ns, dev)
    # An expiring one too: its alarm must not be raised again by the re-list after the restart.
    app3 = dev.new_app()
    ns.secret(app3.secret, name="exo-app-3")
    spec = dev.spec(app3, secret_name="exo-app-3")
    spec["identity"]["clientSecret"]["expiresAt"] = "2000-01-01T00:00:00Z"  # long expired
    ns.smtp_oauth_config("expired", spec)
    ns.wait_for_condition("expired", "Ready", "False", "ClientSecretExpired")
    wait_until(lambda: ns.count_events("expired", "ClientSecretExpired") == 1, timeout=30, what="alarm")
    expired_events = ns.event_reasons("expired")
    pid = operator.proc.pid if operator.proc else None
    control_plane.restart_apiserver()
    operator.check_alive()
    # A change after the restart is handled: the watch came back.
    started = time.monotonic()
    ns.secret(dev.new_secret())
    ns.wait_for_condition("mail", "Ready", "False", "InvalidClientSecret", timeout=90)
    ns.secret(app.secret)
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested", timeout=60)
    # and a brand-new resource too
    app2 = dev.new_app()
    ns.secret(app2.secret, name="exo-app-2")
    ns.smtp_oauth_config("second", dev.spec(app2, secret_name="exo-app-2"))
    ns.wait_for_condition("second", "Ready", "True", "ConnectionTested", timeout=60)
    print(f"converged {time.monotonic() - started:.1f}s after the apiserver restart")
    assert operator.proc is not None
    assert operator.proc.pid == pid
    operator.check_alive()
    # Events: exactly those of the changes made, none from re-listing after the restart.
    reasons = ns.event_reasons("mail")
    assert reasons.count("ConnectionTestSucceeded") == 2, reasons
    assert reasons.count("ConnectionTestFailed") == 1, reasons
    assert sorted(ns.event_reasons("expired")) == sorted(expired_events)


def test_recheck_annotation_triggers_a_retest(ns: Namespace, dev: Dev, operator: OperatorProcess) -> None:
    app = _ready(ns, dev)
    before = ns.config("mail")["status"]
    attempts = len(dev.auth_attempts(app))
    time.sleep(1.1)  # lastTestTime has a resolution of one second
    ns.kubectl("annotate", "smtpoauthconfig", "mail", "smtpoauth.dev/recheck=now-1", "--overwrite")
    after = wait_until(
        lambda: (s := ns.config("mail")["status"]).get("handledRecheck") == "now-1" and s,
        timeout=30,
        what="handledRecheck",
    )
    assert after["lastTestTime"] > before["lastTestTime"]
    assert len(dev.auth_attempts(app)) > attempts
    # The same value again is not a new request; a new value is.
    attempts = len(dev.auth_attempts(app))
    time.sleep(1.1)
    ns.kubectl("annotate", "smtpoauthconfig", "mail", "smtpoauth.dev/recheck=now-2", "--overwrite")
    wait_until(lambda: ns.config("mail")["status"].get("handledRecheck") == "now-2", timeout=30, what="now-2")
    assert len(dev.auth_attempts(app)) == attempts + 1


def test_no_status_write_when_nothing_changed(ns: Namespace, dev: Dev, operator: OperatorProcess) -> None:
    app = _ready(ns, dev)
    time.sleep(1.0)  # let the write that made it Ready settle
    first = ns.config("mail")["metadata"]["resourceVersion"]
    attempts = len(dev.auth_attempts(app))
    time.sleep(10)
    assert ns.config("mail")["metadata"]["resourceVersion"] == first
    assert len(dev.auth_attempts(app)) == attempts


def test_operator_restart_does_not_retest_or_repeat_events(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = _ready(ns, dev)
    time.sleep(1.0)
    attempts = len(dev.auth_attempts(app))
    tokens = dev.idp.token_requests_for(app.client_id)
    version = ns.config("mail")["metadata"]["resourceVersion"]
    events = ns.event_reasons("mail")
    assert events.count("ConnectionTestSucceeded") == 1

    operator.restart()
    wait_until(lambda: operator.seen_since_start(ns.name, "mail"), timeout=30, what="the re-list")
    time.sleep(3)  # time for a (wrong) test to happen
    assert len(dev.auth_attempts(app)) == attempts
    assert dev.idp.token_requests_for(app.client_id) == tokens
    assert ns.config("mail")["metadata"]["resourceVersion"] == version
    assert ns.event_reasons("mail") == events


def test_changes_made_while_the_operator_is_down_are_handled_at_start(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = _ready(ns, dev)
    app2 = dev.new_app()
    ns.secret(app2.secret, name="exo-app-2")
    ns.smtp_oauth_config("other", dev.spec(app2, secret_name="exo-app-2"))
    ns.wait_for_condition("other", "Ready", "True", "ConnectionTested")
    attempts = len(dev.auth_attempts(app2))
    rc = operator.stop()
    assert rc == 0, operator.tail()
    try:
        ns.secret(dev.new_secret())  # a rotation gone wrong, while nobody watched
        ns.kubectl("annotate", "smtpoauthconfig", "other", "smtpoauth.dev/recheck=while-down")
    finally:
        operator.start()
    ns.wait_for_condition("mail", "Ready", "False", "InvalidClientSecret")
    wait_until(
        lambda: ns.config("other")["status"].get("handledRecheck") == "while-down",
        timeout=30,
        what="the recheck requested while the operator was down",
    )
    assert len(dev.auth_attempts(app2)) == attempts + 1
    ns.secret(app.secret)
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")


def test_throttled_retries_no_sooner_than_retry_after_and_posts_one_event(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    """Entra ID's 429 says when to come back; a fleet throttled together must not come back early."""
    tenant = dev.new_tenant()
    names = [f"fleet-{i}" for i in range(6)]
    dev.idp.throttle(retry_after=300, tenant=tenant)
    try:
        for name in names:
            app = dev.new_app(tenant_id=tenant)
            ns.secret(app.secret, name=name)
            ns.smtp_oauth_config(name, dev.spec(app, secret_name=name))
        objs = [ns.wait_for_condition(name, "Ready", "False", "Throttled") for name in names]
    finally:
        dev.idp.clear_faults()
    early = []
    for obj in objs:
        status = obj["status"]
        tested = datetime.fromisoformat(status["lastTestTime"])
        due = datetime.fromisoformat(status["nextTestTime"])
        if (due - tested).total_seconds() < 300:
            early.append(f"{obj['metadata']['name']}: next test {due - tested} after the 429")
        assert (due - tested).total_seconds() <= 3600, status  # and not beyond recheckInterval (1h)
    assert not early, "retrying before Retry-After (300 s):\n" + "\n".join(early)
    for name in names:
        assert ns.count_events(name, "ConnectionTestFailed") == 1


def test_a_spec_change_is_tested_and_reported_for_its_generation(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    _ready(ns, dev)
    patch = {"spec": {"identity": {"tenantId": "contoso-nowhere.onmicrosoft.com"}}}
    ns.kubectl("patch", "smtpoauthconfig", "mail", "--type=merge", "-p", json.dumps(patch))
    obj = ns.wait_for_condition("mail", "Ready", "False", "TenantNotFound")
    generation = obj["metadata"]["generation"]
    assert generation == 2
    assert obj["status"]["observedGeneration"] == generation
    assert ns.condition(obj, "Ready")["observedGeneration"] == generation  # type: ignore[index]
    assert ns.condition(obj, "TokenAcquired")["status"] == "False"  # type: ignore[index]
    assert ns.condition(obj, "SmtpAuthenticated")["status"] == "Unknown"  # type: ignore[index]
    ns.kubectl(
        "patch",
        "smtpoauthconfig",
        "mail",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"identity": {"tenantId": dev.tenant_id}}}),
    )
    obj = ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    assert obj["status"]["observedGeneration"] == 3
