"""The relay in a cluster, with real Prometheus Alertmanager as its client.

The operator (a process against the session's etcd + kube-apiserver) tests an SmtpOAuthConfig with
``spec.relay`` and sets Ready; ``smtp-oauth-operator relay`` (cluster mode: read-only informers) serves
it; Alertmanager v0.35.0, built from its Go module by hack/alertmanager.sh, has an email receiver
pointed at the relay (auth_username/auth_password, STARTTLS with require_tls and the relay's CA). An
alert posted to Alertmanager's API arrives at the local Exchange stand-in, submitted with XOAUTH2;
when Exchange first answers 4xx, Alertmanager's retry delivers it.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from e2e.controlplane import REPO_ROOT, ControlPlane, free_port
from e2e.fixtures import MAILBOX, RELAY_USER, App, Dev, Namespace, OperatorProcess, Relay, wait_until

from smtp_oauth_operator.testing.pki import ServerCert

pytestmark = pytest.mark.e2e


def _alertmanager_bin() -> Path:
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "alertmanager.sh")],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def alertmanager_bin() -> Path:
    return _alertmanager_bin()


def relayed_config(ns: Namespace, dev: Dev, app: App, password: str, name: str = "alerts") -> None:
    ns.secret(app.secret)
    ns.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/basic-auth",
            "metadata": {"name": f"{name}-relay"},
            "stringData": {"username": RELAY_USER, "password": password},
        }
    )
    ns.smtp_oauth_config(
        name,
        dev.spec(app, relay={"enabled": True, "credentialsSecretRef": {"name": f"{name}-relay"}}),
    )


def test_not_ready_configuration_is_refused_454(
    ns: Namespace, dev: Dev, operator: OperatorProcess, relay: Relay
) -> None:
    app = dev.new_app(grant=False)  # Exchange refuses its token: the operator sets Ready=False
    password = dev.new_secret()
    relayed_config(ns, dev, app, password)
    ns.wait_for_condition("alerts", "Ready", "False", "AuthenticationRejected", timeout=60)
    wait_until(
        lambda: relay.login(password)[0] == 454, timeout=30, what="the relay to serve the configuration"
    )
    assert relay.login(password) == (
        454,
        f"4.7.0 Configuration {ns.name}/alerts is not Ready (AuthenticationRejected); try again later".encode(),
    )


def test_alertmanager_alert_arrives_through_the_relay_with_xoauth2(
    control_plane: ControlPlane,
    ns: Namespace,
    dev: Dev,
    operator: OperatorProcess,
    relay: Relay,
    relay_cert: ServerCert,
    alertmanager_bin: Path,
    tmp_path: Path,
) -> None:
    app = dev.new_app()
    password = dev.new_secret()
    relayed_config(ns, dev, app, password)
    ns.wait_for_condition("alerts", "Ready", "True", timeout=60)
    wait_until(lambda: relay.login(password)[0] == 235, timeout=30, what="the relay to serve alerts")

    # Exchange answers the first submission with 451: the relay passes it on, Alertmanager retries.
    dev.exchange.defer_data(1)
    faults_before = dev.exchange.data_faults_answered
    port = free_port()
    config = {
        "global": {"resolve_timeout": "5m"},
        "route": {
            "receiver": "mail",
            "group_by": ["alertname"],
            "group_wait": "1s",
            "group_interval": "5s",
            "repeat_interval": "1h",
        },
        "receivers": [
            {
                "name": "mail",
                "email_configs": [
                    {
                        "to": "oncall@contoso.com",
                        "from": MAILBOX,
                        "smarthost": f"127.0.0.1:{relay.port}",
                        "hello": "alertmanager.test",
                        "auth_username": RELAY_USER,
                        "auth_password": password,
                        "require_tls": True,
                        "tls_config": {"ca_file": str(relay_cert.ca_file), "server_name": "127.0.0.1"},
                        "send_resolved": False,
                    }
                ],
            }
        ],
    }
    config_file = tmp_path / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(config))
    log = tmp_path / "alertmanager.log"
    with log.open("wb") as out:
        am = subprocess.Popen(
            [
                str(alertmanager_bin),
                f"--config.file={config_file}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
                "--log.level=debug",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: _ready(port), timeout=30, what="Alertmanager's API")
        alertname = f"RelayE2E{uuid.uuid4().hex[:8]}"
        alert = [
            {"labels": {"alertname": alertname, "severity": "page"}, "annotations": {"summary": "relay"}}
        ]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v2/alerts",
            data=json.dumps(alert).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200

        def arrived() -> bool:
            return any(alertname in str(m.message["Subject"]) for m in dev.messages(app))

        wait_until(arrived, timeout=90, interval=0.5, what=f"the alert e-mail {alertname} at Exchange")
    finally:
        am.terminate()
        try:
            am.wait(timeout=20)
        except subprocess.TimeoutExpired:
            am.kill()
            am.wait()
    (mail,) = [m for m in dev.messages(app) if alertname in str(m.message["Subject"])]
    assert mail.authenticated_as == MAILBOX
    assert mail.mail_from == MAILBOX
    assert mail.rcpt_tos == ("oncall@contoso.com",)
    assert mail.tls
    assert dev.exchange.data_faults_answered == faults_before + 1  # the 451 was met, then the retry
    xoauth2 = [a for a in dev.auth_attempts(app) if a.mechanism == "XOAUTH2" and a.code == 235]
    assert len(xoauth2) >= 2  # the operator's connection test, then the relay's submissions
    am_log = log.read_text(errors="replace")
    assert "451" in am_log  # Alertmanager saw the temporary failure and retried
    metrics = relay.metrics()
    assert (
        f'smtpoauth_relay_messages_total{{name="alerts",namespace="{ns.name}",result="sent"}} 1.0' in metrics
    )
    assert (
        f'smtpoauth_relay_messages_total{{name="alerts",namespace="{ns.name}",result="deferred"}} 1.0'
        in metrics
    )
    for secret in (password, app.secret, *dev.idp.issued_tokens):
        assert secret not in relay.output()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_a_rotated_relay_password_applies_without_a_restart(
    ns: Namespace, dev: Dev, operator: OperatorProcess, relay: Relay
) -> None:
    app = dev.new_app()
    old, new = dev.new_secret(), dev.new_secret()
    relayed_config(ns, dev, app, old)
    ns.wait_for_condition("alerts", "Ready", "True", timeout=60)
    wait_until(lambda: relay.login(old)[0] == 235, timeout=30, what="the relay to serve alerts")
    ns.kubectl(
        "patch", "secret", "alerts-relay", "--type=merge", "-p", json.dumps({"stringData": {"password": new}})
    )
    wait_until(lambda: relay.login(new)[0] == 235, timeout=60, interval=1, what="the new password to work")
    assert relay.login(old) == (535, b"5.7.8 Authentication credentials invalid")
    for secret in (old, new, app.secret):
        assert secret not in relay.output()


def test_a_starting_relay_listens_only_once_it_knows_the_configurations(
    control_plane: ControlPlane,
    ns: Namespace,
    dev: Dev,
    operator: OperatorProcess,
    relay_cert: ServerCert,
    tmp_path: Path,
) -> None:
    """A new replica in a rollout: the first login it answers is already the right one (never a 535)."""
    app = dev.new_app()
    password = dev.new_secret()
    relayed_config(ns, dev, app, password)
    ns.wait_for_condition("alerts", "Ready", "True", timeout=60)
    relay = Relay(control_plane, relay_cert, tmp_path / "relay.log", ns.name)
    try:
        wait_until(lambda: relay.login(password)[0] != 0, timeout=60, interval=0.05, what="the relay's port")
        assert relay.login(password)[0] == 235
        out = relay.output()
        assert "failed AUTH" not in out
        # The route was built before the port opened (on loopback the race is too short to hit reliably).
        assert 0 <= out.index(f"{ns.name}/alerts serves login") < out.index("relay: listening on")
    finally:
        assert relay.stop() == 0
