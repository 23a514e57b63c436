"""Secrets stay secret, on the real control plane (issue 5): SecretProtected, rotation, leak canary.

No Sealed Secrets controller runs here, so the owner reference a SealedSecret's controller puts on the
Secret it unseals is written by the test, as the controller would write it (``metav1.NewControllerRef``:
``controller`` and ``blockOwnerDeletion`` true) with a made-up uid; with no garbage collector the API
server stores it as is, and the operator's condition logic runs against what the API server returns.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.controlplane import ControlPlane
from e2e.fixtures import OPERATOR_CMD, App, Dev, Namespace, OperatorProcess, operator_env, wait_until

pytestmark = pytest.mark.e2e

BACKUP_LABEL = {"velero.io/exclude-from-backup": "true"}


def _sealed_by(name: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "bitnami.com/v1alpha1",
            "kind": "SealedSecret",
            "name": name,
            "uid": str(uuid.uuid4()),
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _protected(ns: Namespace, name: str, status: str, reason: str) -> dict[str, Any]:
    obj = ns.wait_for_condition(name, "SecretProtected", status, reason)
    cond = ns.condition(obj, "SecretProtected")
    assert cond is not None
    return cond


def test_sealed_and_labelled_secret_is_protected(ns: Namespace, dev: Dev, operator: OperatorProcess) -> None:
    app = dev.new_app()
    ns.secret(app.secret, labels=BACKUP_LABEL, owner_references=_sealed_by("exo-app"))
    stored = ns.get("secret", "exo-app")["metadata"]
    assert stored["ownerReferences"][0]["kind"] == "SealedSecret"  # the API server kept it
    ns.smtp_oauth_config("mail", dev.spec(app))
    cond = _protected(ns, "mail", "True", "Protected")
    assert "SealedSecret exo-app" in cond["message"]
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    assert ns.count_events("mail", "SecretNotProtected") == 0


def test_plain_secret_is_not_sealed(ns: Namespace, dev: Dev, operator: OperatorProcess) -> None:
    app = dev.new_app()
    ns.secret(app.secret, labels=BACKUP_LABEL)
    ns.smtp_oauth_config("mail", dev.spec(app))
    cond = _protected(ns, "mail", "False", "NotSealed")
    assert "kubeseal" in cond["message"]
    # Warn (the default): Ready unaffected, one Warning Event.
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    wait_until(lambda: ns.count_events("mail", "SecretNotProtected") == 1, timeout=15, what="the Event")
    event = next(e for e in ns.events_for("mail") if e["reason"] == "SecretNotProtected")
    assert event["type"] == "Warning"


def test_sealed_but_unlabelled_is_not_excluded_from_backup(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = dev.new_app()
    ns.secret(app.secret, owner_references=_sealed_by("exo-app"))
    ns.smtp_oauth_config("mail", dev.spec(app))
    cond = _protected(ns, "mail", "False", "NotExcludedFromBackup")
    assert "velero.io/exclude-from-backup=true" in cond["message"]
    assert "spec.template.metadata.labels" in cond["message"]  # where the fix goes for Sealed Secrets
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")


def test_require_policy_holds_ready_until_protected(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = dev.new_app()
    ns.secret(app.secret)
    ns.smtp_oauth_config("mail", dev.spec(app, secretPolicy="Require"))
    obj = ns.wait_for_condition("mail", "Ready", "False", "SecretNotProtected")
    assert ns.condition(obj, "SmtpAuthenticated")["status"] == "True"  # type: ignore[index]
    assert ns.condition(obj, "SecretProtected")["reason"] == "NotSealed"  # type: ignore[index]
    # Seal and label it (what the controller's next sync would do): Ready follows, from the watch.
    ns.secret(app.secret, labels=BACKUP_LABEL, owner_references=_sealed_by("exo-app"))
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    _protected(ns, "mail", "True", "Protected")


def test_rotated_secret_value_is_retested_within_30_seconds(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = dev.new_app()
    ns.secret(app.secret)
    ns.smtp_oauth_config("mail", dev.spec(app))
    ns.kubectl("wait", "--for=condition=Ready", "smtpoauthconfig/mail", "--timeout=30s")
    before = ns.config("mail")["status"]
    requests = dev.idp.token_requests_for(app.client_id)
    time.sleep(1.1)  # lastTestTime has one-second resolution

    # Rotate in Entra ID (the old value stops working), then in the Secret.
    rotated = dev.new_secret()
    dev.idp.set_secret(app.tenant_id, app.client_id, rotated)
    started = time.monotonic()
    ns.secret(rotated)
    after = wait_until(
        lambda: (s := ns.config("mail")["status"])["lastTestTime"] > before["lastTestTime"] and s,
        timeout=30,
        what="a re-test after the rotation",
    )
    took_retest = time.monotonic() - started
    ready = ns.condition({"status": after}, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("True", "ConnectionTested"), ready
    # The new value was used: a fresh token request, which only the rotated secret can pass.
    assert dev.idp.token_requests_for(app.client_id) > requests
    assert after["observedFingerprint"] != before["observedFingerprint"]

    # A bad value is reflected in Ready within 30 s, and so is the good one again.
    started = time.monotonic()
    ns.secret(dev.new_secret())
    ns.wait_for_condition("mail", "Ready", "False", "InvalidClientSecret", timeout=30)
    took_bad = time.monotonic() - started
    started = time.monotonic()
    ns.secret(rotated)
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested", timeout=30)
    took_good = time.monotonic() - started
    print(f"rotation re-tested in {took_retest:.1f}s; bad value {took_bad:.1f}s; good again {took_good:.1f}s")
    assert max(took_retest, took_bad, took_good) < 30


def test_deleted_secret_and_rotated_ca_bundle_are_noticed(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = dev.new_app()
    ns.smtp_oauth_config("mail", dev.spec(app))  # before its Secret exists
    ns.wait_for_condition("mail", "Ready", "False", "SecretNotFound")
    ns.secret(app.secret)  # the SealedSecret got unsealed at last
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")

    ns.kubectl("delete", "secret", "exo-app")
    ns.wait_for_condition("mail", "Ready", "False", "SecretNotFound")
    ns.secret(app.secret)
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")

    # A CA bundle that no longer holds a certificate, then the right one again (ConfigMap watch).
    ns.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dev-ca"}, "data": {"ca.pem": "x"}}
    )
    ns.wait_for_condition("mail", "Ready", "False", "CaBundleNotFound")
    ns.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "dev-ca"},
            "data": {"ca.pem": dev.ca_pem},
        }
    )
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    reasons = ns.event_reasons("mail")
    assert reasons.count("ConnectionTestFailed") == 3, reasons
    assert reasons.count("ConnectionTestSucceeded") == 3, reasons


def test_one_secret_rotation_retests_every_user(ns: Namespace, dev: Dev, operator: OperatorProcess) -> None:
    app = dev.new_app()
    ns.secret(app.secret)
    for name in ("first", "second"):
        ns.smtp_oauth_config(name, dev.spec(app))
    for name in ("first", "second"):
        ns.wait_for_condition(name, "Ready", "True", "ConnectionTested")
    ns.secret(dev.new_secret())
    for name in ("first", "second"):
        ns.wait_for_condition(name, "Ready", "False", "InvalidClientSecret")
    ns.kubectl("delete", "smtpoauthconfig", "first")
    ns.secret(app.secret)
    ns.wait_for_condition("second", "Ready", "True", "ConnectionTested")


# --------------------------------------------------------------------------------------------
# leak canary


GRAM = 24  # a leak of any 24 consecutive characters of a secret or token counts
_RUN = re.compile(rf"[A-Za-z0-9_~.+/=-]{{{GRAM},}}")


class LeakScanner:
    """Finds client secrets and access tokens in text: whole, base64-encoded, or any piece of them.

    Whole values (and their base64 and XOAUTH2 forms) are looked up directly; pieces through every
    window of :data:`GRAM` characters. Windows shared by two or more tokens are dropped: they come
    from the JWT-shaped but fixed parts (``{"typ":"JWT",...``), not from what makes a token secret.
    """

    def __init__(self, secrets: list[str], tokens: list[str], mailbox: str) -> None:
        self.whole: dict[str, str] = {}
        sources: dict[str, str] = {}
        for i, value in enumerate(secrets):
            self.whole[value] = f"client secret #{i}"
            self.whole[base64.b64encode(value.encode()).decode()] = f"client secret #{i} (base64)"
            sources[f"client secret #{i}"] = value
        for i, token in enumerate(tokens):
            self.whole[token] = f"access token #{i}"
            blob = f"user={mailbox}\x01auth=Bearer {token}\x01\x01".encode()
            self.whole[base64.b64encode(blob).decode()] = f"access token #{i} (XOAUTH2 line)"
            sources[f"access token #{i}"] = token
        owners: dict[str, set[str]] = {}
        for label, value in sources.items():
            for j in range(len(value) - GRAM + 1):
                owners.setdefault(value[j : j + GRAM], set()).add(label)
        self.pieces = {gram: next(iter(labels)) for gram, labels in owners.items() if len(labels) == 1}

    def scan(self, haystacks: dict[str, str]) -> list[str]:
        hits: set[str] = set()
        for where, text in haystacks.items():
            for needle, label in self.whole.items():
                if needle in text:
                    hits.add(f"{label} found in {where}")
            for run in _RUN.finditer(text):
                chunk = run.group()
                for j in range(len(chunk) - GRAM + 1):
                    label = self.pieces.get(chunk[j : j + GRAM])
                    if label is not None:
                        hits.add(f"a piece of {label} found in {where} at offset {run.start() + j}")
                        break
        return sorted(hits)


def _run_check_cli(ns: Namespace, dev: Dev, tmp_path: Path, apps: dict[str, App]) -> str:
    """``smtp-oauth-operator check`` on manifests for ``apps`` (the Secret of "wrong" holds a wrong
    value); returns everything it printed, in text and JSON."""
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "dev-ca", "namespace": ns.name},
            "data": {"ca.pem": dev.ca_pem},
        }
    ]
    for name, app in apps.items():
        value = dev.new_secret() if name == "wrong" else app.secret
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": f"cli-{name}", "namespace": ns.name},
                "stringData": {"client-secret": value},
            }
        )
        docs.append(
            {
                "apiVersion": "smtpoauth.dev/v1alpha1",
                "kind": "SmtpOAuthConfig",
                "metadata": {"name": f"cli-{name}", "namespace": ns.name},
                "spec": dev.spec(app, secret_name=f"cli-{name}"),
            }
        )
    manifest = tmp_path / "check.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    output = []
    for fmt in ("text", "json"):
        proc = subprocess.run(
            [*OPERATOR_CMD, "check", "-f", str(manifest), "-o", fmt],
            env=operator_env(os.environ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)  # 1: some not Ready
        output += [proc.stdout, proc.stderr]
    return "\n".join(output)


def test_leak_canary(
    control_plane: ControlPlane, ns: Namespace, dev: Dev, operator: OperatorProcess, tmp_path: Path
) -> None:
    expected: dict[str, tuple[str, str]] = {}

    # Success, with a test message and an alarm e-mail (token use beyond AUTH).
    ok = dev.new_app()
    ns.secret(ok.secret, name="ok")
    spec = dev.spec(ok, secret_name="ok", testMessage={"to": "ops@contoso.com"})
    spec["identity"]["clientSecret"]["expiresAt"] = (datetime.now(UTC) + timedelta(days=3)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    spec["alarms"] = {"notify": {"to": ["admin@contoso.com"]}}
    ns.smtp_oauth_config("ok", spec)
    expected["ok"] = ("True", "ConnectionTested")

    # A wrong secret (AADSTS7000215).
    wrong = dev.new_app()
    ns.secret(dev.new_secret(), name="wrong")
    ns.smtp_oauth_config("wrong", dev.spec(wrong, secret_name="wrong"))
    expected["wrong"] = ("False", "InvalidClientSecret")

    # Throttled: its own tenant answers 429 + Retry-After.
    tenant = dev.new_tenant()
    throttled = dev.new_app(tenant_id=tenant)
    dev.idp.throttle(retry_after=120, tenant=tenant)
    ns.secret(throttled.secret, name="throttled")
    ns.smtp_oauth_config("throttled", dev.spec(throttled, secret_name="throttled"))
    expected["throttled"] = ("False", "Throttled")

    # SMTP AUTH rejected: a valid token for an app without FullAccess on the mailbox (535 5.7.3).
    rejected = dev.new_app(grant=False)
    ns.secret(rejected.secret, name="rejected")
    ns.smtp_oauth_config("rejected", dev.spec(rejected, secret_name="rejected"))
    expected["rejected"] = ("False", "AuthenticationRejected")

    # The secret expired at Entra ID (AADSTS7000222).
    expired = dev.new_app(expired=True)
    ns.secret(expired.secret, name="expired")
    ns.smtp_oauth_config("expired", dev.spec(expired, secret_name="expired"))
    expected["expired"] = ("False", "ClientSecretExpired")

    # The Secret does not exist.
    missing = dev.new_app()
    ns.smtp_oauth_config("missing", dev.spec(missing, secret_name="not-there"))
    expected["missing"] = ("False", "SecretNotFound")

    try:
        for name, (status, reason) in expected.items():
            ns.wait_for_condition(name, "Ready", status, reason, timeout=45)
    finally:
        dev.idp.clear_faults()
    wait_until(lambda: dev.messages(ok), timeout=30, what="the test message and alarm e-mail")
    wait_until(lambda: ns.count_events("ok", "ClientSecretExpiringSoon") == 1, timeout=30, what="the alarm")
    # One more round of every kind through the recheck annotation.
    for name in expected:
        ns.kubectl("annotate", "smtpoauthconfig", name, "smtpoauth.dev/recheck=canary", "--overwrite")
    wait_until(
        lambda: all(ns.config(n)["status"].get("handledRecheck") == "canary" for n in expected),
        timeout=45,
        what="every resource to handle the recheck",
    )

    # The check CLI (the "Test Connection" button) on the same kinds of input, text and JSON.
    cli_output = _run_check_cli(ns, dev, tmp_path, {"ok": ok, "wrong": wrong, "rejected": rejected})

    # Everything observable.
    events_json = control_plane.kubectl("get", "events", "-A", "-o", "json").stdout
    configs_json = control_plane.kubectl("get", "smtpoauth", "-A", "-o", "json").stdout
    metrics = operator.metrics()
    log = operator.log()
    haystacks = {
        "the operator log": log,
        "the Events (kubectl get events -A)": events_json,
        "the SmtpOAuthConfigs (kubectl get smtpoauth -A)": configs_json,
        "the metrics page": metrics,
        "the check CLI's output": cli_output,
        "the e-mails sent": "\n".join(m.data.decode(errors="replace") for m in dev.exchange.messages),
    }

    # The scan must have something to find, or zero hits would prove nothing.
    tokens = dev.idp.issued_tokens
    assert len(tokens) >= 3, tokens and len(tokens)
    assert len(dev.messages(ok)) >= 2  # the test message and the alarm: the token went to SMTP
    events = [e for e in json.loads(events_json)["items"] if e["metadata"]["namespace"] == ns.name]
    reasons = {(e["involvedObject"]["name"], e["reason"]) for e in events}
    for name in ("wrong", "throttled", "rejected", "expired", "missing"):
        assert (name, "ConnectionTestFailed") in reasons, (name, sorted(reasons))
    assert ("ok", "ConnectionTestSucceeded") in reasons
    assert ("ok", "ClientSecretExpiringSoon") in reasons
    configs = {
        c["metadata"]["name"]: c
        for c in json.loads(configs_json)["items"]
        if c["metadata"]["namespace"] == ns.name
    }
    assert set(configs) == set(expected)
    assert all(c["status"].get("conditions") for c in configs.values())
    assert all("smtpoauth.dev/recheck" in c["metadata"]["annotations"] for c in configs.values())
    assert f'namespace="{ns.name}"' in metrics
    debug_records = [r for r in operator.log_records(current=False) if r.get("severity") == "debug"]
    assert debug_records, "the operator was not logging at debug level"
    for name in expected:
        assert f"Tested {ns.name}/{name}" in log, name
    for reason in ("ConnectionTested", "InvalidClientSecret", "AuthenticationRejected"):
        assert reason in cli_output, cli_output
    # The scanner finds what it should: a secret where one legitimately is (the Secret), and a
    # piece of a token in otherwise harmless text.
    scanner = LeakScanner(dev.secrets, tokens, dev.endpoints.mailbox)
    secret_json = ns.kubectl("get", "secret", "ok", "-o", "json").stdout
    assert scanner.scan({"Secret ok": secret_json}), "the scanner found nothing in a Secret"
    assert scanner.scan({"probe": f"got token ...{tokens[-1][-30:]}"}), "the scanner missed a piece"
    assert not scanner.scan({"probe": "nothing to see " + "A" * 100})

    hits = scanner.scan(haystacks)
    assert not hits, "secrets leaked:\n" + "\n".join(hits)
