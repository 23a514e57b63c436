"""The demo: the operator's main job on an embedded default, start to finish, then tear down.

A real etcd + kube-apiserver on loopback (built from Go modules), a local Entra ID and Exchange
Online stand-in, the CRD, one working SmtpOAuthConfig and one with a wrong client secret, the
operator as a process. It prints what a user would look at (``kubectl get``, the broken one's Event),
then fixes the broken one to show the operator converge without a restart.

Run with ``make demo`` (which installs everything first) or ``.venv/bin/python -m e2e.demo``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from e2e.controlplane import ControlPlane, ensure_tools

from smtp_oauth_operator.testing.devservers import DevServers
from smtp_oauth_operator.testing.idp import FederatedCredential

REPO = Path(__file__).resolve().parent.parent
SECRET = "demo-client-secret-value"  # a made-up value for the local identity provider only


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(cp: ControlPlane, *args: str) -> str:
    print(f"$ kubectl {' '.join(args)}", flush=True)
    out = cp.kubectl(*args).stdout
    print(textwrap.indent(out.rstrip(), "  "), flush=True)
    return out


def manifests(dev: DevServers, name: str, secret_name: str) -> str:
    e = dev.endpoints
    return f"""
apiVersion: smtpoauth.dev/v1alpha1
kind: SmtpOAuthConfig
metadata:
  name: {name}
  namespace: mail
spec:
  username: {e.mailbox}
  smtp:
    host: {e.smtp_host}
    port: {e.smtp_port}
    caBundle: {{configMapKeyRef: {{name: local-ca, key: ca.pem}}}}
  identity:
    tenantId: {e.tenant_id}
    clientId: {e.client_id}
    authorityHost: {e.authority_host}
    caBundle: {{configMapKeyRef: {{name: local-ca, key: ca.pem}}}}
    clientSecret:
      secretKeyRef: {{name: {secret_name}, key: client-secret}}
      expiresAt: "{time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(time.time() + 10 * 86400))}"
  alarms:
    notify:
      to: [platform-team@contoso.com]
"""


def secretless(dev: DevServers, name: str) -> str:
    """The same configuration with workload identity federation: no Secret anywhere."""
    e = dev.endpoints
    return f"""
apiVersion: smtpoauth.dev/v1alpha1
kind: SmtpOAuthConfig
metadata:
  name: {name}
  namespace: mail
spec:
  username: {e.mailbox}
  smtp:
    host: {e.smtp_host}
    port: {e.smtp_port}
    caBundle: {{configMapKeyRef: {{name: local-ca, key: ca.pem}}}}
  identity:
    tenantId: {e.tenant_id}
    clientId: {e.client_id}
    authorityHost: {e.authority_host}
    caBundle: {{configMapKeyRef: {{name: local-ca, key: ca.pem}}}}
    workloadIdentity:
      serviceAccountName: mail-sender
"""


def wait_ready(cp: ControlPlane, name: str, status: str, timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    ready: dict[str, str] = {}
    while time.monotonic() < deadline:
        obj = json.loads(cp.kubectl("-n", "mail", "get", "smtpoauth", name, "-o", "json").stdout)
        ready = next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {})
        if ready.get("status") == status:
            return ready
        time.sleep(0.5)
    raise SystemExit(f"demo: {name} did not become Ready={status} within {timeout:.0f} s (last: {ready})")


def wait_condition(cp: ControlPlane, name: str, ctype: str, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    found: dict[str, str] = {}
    while time.monotonic() < deadline:
        obj = json.loads(cp.kubectl("-n", "mail", "get", "smtpoauth", name, "-o", "json").stdout)
        found = next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), {})
        if found.get("status") == status:
            return
        time.sleep(0.5)
    raise SystemExit(f"demo: {name} {ctype} did not become {status} within {timeout:.0f} s (last: {found})")


def relay_demo(cp: ControlPlane, dev: DevServers, tmp: Path) -> None:
    """Enable spec.relay on 'alerts', run ``smtp-oauth-operator relay`` (cluster mode) and send one
    message with Python's smtplib, as Alertmanager or Grafana would."""
    import smtplib  # noqa: PLC0415
    import ssl  # noqa: PLC0415

    from e2e.controlplane import free_port  # noqa: PLC0415

    from smtp_oauth_operator.testing.pki import CertificateAuthority  # noqa: PLC0415

    password = "demo-relay-password"  # a made-up value for the demo only
    cp.kubectl("-n", "mail", "create", "secret", "generic", "alerts-relay", "--type=kubernetes.io/basic-auth",
               "--from-literal=username=grafana", f"--from-literal=password={password}")  # fmt: skip
    patch = {"spec": {"relay": {"enabled": True, "credentialsSecretRef": {"name": "alerts-relay"}}}}
    cp.kubectl("-n", "mail", "patch", "smtpoauth", "alerts", "--type=merge", "-p", json.dumps(patch))
    print("  spec.relay enabled on alerts, login in Secret alerts-relay (kubernetes.io/basic-auth)")
    cert = CertificateAuthority.create("demo relay CA", directory=tmp / "relay").issue(
        "127.0.0.1", "localhost", directory=tmp / "relay"
    )
    port = free_port()
    log_path = tmp / "relay.log"
    with open(log_path, "w") as log:
        relay = subprocess.Popen(
            [sys.executable, "-m", "smtp_oauth_operator.cli", "relay", "-n", "mail", "--listen", "127.0.0.1",
             "--port", str(port), "--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file)],
            env=cp.env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    try:
        print(f"  relay listening on 127.0.0.1:{port} (STARTTLS, AUTH PLAIN/LOGIN after TLS)")
        context = ssl.create_default_context(cafile=str(cert.ca_file))
        message = (
            f"From: {dev.endpoints.mailbox}\r\nTo: oncall@contoso.com\r\n"
            "Subject: [FIRING:1] DemoAlert\r\n\r\nsent through the relay\r\n"
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    smtp.starttls(context=context)
                    smtp.login("grafana", password)
                    smtp.mail(dev.endpoints.mailbox)
                    smtp.rcpt("oncall@contoso.com")
                    code, reply = smtp.data(message.encode())
                break
            except (OSError, smtplib.SMTPException) as exc:
                # Until the operator has re-tested the changed spec: 454 4.7.0 (not Ready yet).
                if time.monotonic() > deadline:
                    raise SystemExit(f"demo: the relay did not accept the message: {exc}") from None
                time.sleep(0.5)
        print(f"  relay answered the end of DATA: {code} {reply.decode()[:90]}…")
        (mail,) = [m for m in dev.exchange.messages if m.message["Subject"] == "[FIRING:1] DemoAlert"]
        print(f"  received by the local Exchange: {mail.message['Subject']!r} from {mail.mail_from}, "
              f"authenticated with XOAUTH2 as {mail.authenticated_as}")  # fmt: skip
    finally:
        relay.terminate()
        try:
            relay.wait(timeout=40)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()
    if password in log_path.read_text() or SECRET in log_path.read_text():
        raise SystemExit("demo: a secret reached the relay's log")


def main() -> int:
    bin_dir = ensure_tools()
    with tempfile.TemporaryDirectory(prefix="smtpoauth-demo-") as tmp, ControlPlane(bin_dir) as cp:
        banner(f"Control plane: kube-apiserver {cp.server} (etcd, RBAC, real CRD validation)")
        with DevServers(Path(tmp) / "dev", client_secret=SECRET) as dev:
            banner("Local identity provider and SMTP server")
            print(f"  {dev.summary()}")

            banner("Install the CRD")
            show(cp, "apply", "-f", str(REPO / "crds"))
            cp.kubectl(
                "wait", "--for=condition=Established", "crd/smtpoauthconfigs.smtpoauth.dev", "--timeout=30s"
            )
            cp.kubectl("create", "namespace", "mail")
            cp.kubectl("-n", "mail", "create", "configmap", "local-ca", f"--from-file=ca.pem={dev.ca_file}")
            cp.kubectl(
                "-n",
                "mail",
                "create",
                "secret",
                "generic",
                "exo-app",
                f"--from-literal=client-secret={SECRET}",
            )
            cp.kubectl(
                "-n",
                "mail",
                "create",
                "secret",
                "generic",
                "exo-app-typo",
                "--from-literal=client-secret=the-secret-ID",
            )

            banner("Start the operator")
            log_path = Path(tmp) / "operator.log"
            with open(log_path, "w") as log:
                operator = subprocess.Popen(
                    [sys.executable, "-m", "smtp_oauth_operator.cli", "run", "-A", "--log-level", "info"],
                    env=cp.env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                )
            try:
                banner("Apply a working SmtpOAuthConfig and a broken one (wrong client secret)")
                for name, secret_name in (("alerts", "exo-app"), ("alerts-broken", "exo-app-typo")):
                    cp.kubectl("apply", "-f", "-", input=manifests(dev, name, secret_name))
                    print(f"  smtpoauthconfig/{name} applied (secret {secret_name})")
                wait_ready(cp, "alerts", "True")
                wait_ready(cp, "alerts-broken", "False")

                banner("What users see")
                show(cp, "-n", "mail", "get", "smtpoauthconfigs")
                show(cp, "-n", "mail", "get", "smtpoauthconfigs", "-o", "wide")
                show(cp, "events", "-n", "mail", "--for", "smtpoauthconfig/alerts-broken")
                for mail in dev.exchange.messages:
                    print(
                        f"  alarm e-mail received by the local SMTP server: To {', '.join(mail.rcpt_tos)}: "
                        f"{mail.message['Subject']}"
                    )

                banner("Fix the broken one's Secret: the operator re-tests within seconds, no restart")
                cp.kubectl(
                    "-n",
                    "mail",
                    "create",
                    "secret",
                    "generic",
                    "exo-app-typo",
                    f"--from-literal=client-secret={SECRET}",
                    "--dry-run=client",
                    "-o",
                    "yaml",
                )
                patch = json.dumps({"stringData": {"client-secret": SECRET}})
                cp.kubectl("-n", "mail", "patch", "secret", "exo-app-typo", "--type=merge", "-p", patch)
                started = time.monotonic()
                wait_ready(cp, "alerts-broken", "True")
                print(f"  alerts-broken Ready after {time.monotonic() - started:.1f} s")
                show(cp, "-n", "mail", "get", "smtpoauthconfigs")

                banner("Expiry from Microsoft Graph: the typed date next to the discovered one")
                graph_end = datetime.now(UTC).replace(microsecond=0) + timedelta(days=45)
                dev.idp.set_secret_end(dev.endpoints.tenant_id, dev.endpoints.client_id, SECRET, graph_end)
                print(f"  the app registration's secret really ends {graph_end:%Y-%m-%d %H:%M} UTC (Graph)")
                discovery = {"graph": True, "graphHost": dev.endpoints.graph_host}
                patch = json.dumps({"spec": {"identity": {"discovery": discovery}}})
                cp.kubectl("-n", "mail", "patch", "smtpoauth", "alerts", "--type=merge", "-p", patch)
                wait_condition(cp, "alerts", "ExpiryDiscovered", "True")
                show(cp, "-n", "mail", "get", "smtpoauth", "alerts", "-o",
                     "jsonpath=typed   {.spec.identity.clientSecret.expiresAt}{'\\n'}"
                     "in use  {.status.clientSecretExpiresAt} (source {.status.expirySource}){'\\n'}"
                     "{range .status.appCredentials[*]}credential {.keyId} hint={.hint} ends {.endDateTime} "
                     "inUse={.inUse}{'\\n'}{end}")  # fmt: skip
                show(cp, "events", "-n", "mail", "--for", "smtpoauthconfig/alerts")

                banner("Secretless: workload identity federation (a ServiceAccount, no Secret)")
                issuer = f"https://127.0.0.1:{cp.apiserver_port}/"
                # Entra ID fetches the cluster issuer's discovery document and keys, as clusters allow.
                cp.kubectl(
                    "create", "clusterrolebinding", "demo-issuer-discovery",
                    "--clusterrole=system:service-account-issuer-discovery", "--group=system:unauthenticated",
                )  # fmt: skip
                assert cp.ca_file is not None
                dev.idp.trust_issuers(cp.ca_file.read_text())
                subject = "system:serviceaccount:mail:mail-sender"
                dev.idp.add_federated_credential(
                    dev.endpoints.tenant_id, dev.endpoints.client_id, FederatedCredential(issuer, subject)
                )
                print(
                    f"  federated credential: issuer {issuer}, subject {subject}, audience api://AzureADTokenExchange"
                )
                cp.kubectl("-n", "mail", "create", "serviceaccount", "mail-sender")
                cp.kubectl("apply", "-f", "-", input=secretless(dev, "alerts-secretless"))
                wait_ready(cp, "alerts-secretless", "True")
                show(cp, "-n", "mail", "get", "smtpoauth", "alerts-secretless", "-o",
                     "jsonpath={.spec.identity.workloadIdentity}{'\\n'}"
                     "{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{'\\n'}{end}")  # fmt: skip
                banner("The SMTP relay: an app that only speaks AUTH PLAIN sends through 'alerts'")
                relay_demo(cp, dev, Path(tmp))
            finally:
                operator.terminate()
                try:
                    operator.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    operator.kill()
                    operator.wait()
            log_text = log_path.read_text()
            leaked = SECRET in log_text or any(
                t in log_text for t in [*dev.idp.received_assertions, *dev.idp.issued_tokens]
            )
            banner("Tear down")
            print(
                f"  operator log: {log_path.stat().st_size} bytes, client secret or ServiceAccount token "
                f"present: {leaked}"
            )
            if leaked:
                return 1
    print("  control plane, identity provider and SMTP server stopped; nothing left running.")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
