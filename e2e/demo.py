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
