"""Certificate credentials and workload identity federation on the real control plane (issue 12).

Certificates: a kubernetes.io/tls Secret → Ready with the thumbprint in status; a rotation (new key and
certificate, uploaded) is re-tested within seconds; an unregistered one → CertificateNotRegistered; one
3 days from notAfter → the alarm Event and e-mail.

Workload identity: the local Entra ID fetches the kube-apiserver's own discovery document and JWKS
(``--service-account-issuer``; ``system:service-account-issuer-discovery`` granted to anonymous callers as
clusters do) and verifies the ServiceAccount tokens the operator obtains with TokenRequest. A
ServiceAccount with a federated credential → Ready with no Secret; wrong subject, wrong audience, a missing
ServiceAccount and a forbidden TokenRequest → their reasons. No private key and no ServiceAccount token
appears in the operator's log, Events or status (whole, base64, or any 24-character piece).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from e2e.controlplane import ControlPlane
from e2e.fixtures import Dev, Namespace, OperatorProcess, wait_until

from smtp_oauth_operator.clients.kube import Kube
from smtp_oauth_operator.domain.reasons import CheckFailed, Reason
from smtp_oauth_operator.testing.idp import FederatedCredential
from smtp_oauth_operator.testing.pki import ClientCredentialCert, client_credential_cert

pytestmark = pytest.mark.e2e

ADMIN = "admin@contoso.com"
AUDIENCE = "api://AzureADTokenExchange"
PIECE = 24


def _no_leak(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        body = "".join(line for line in secret.splitlines() if not line.startswith("-----"))
        assert body not in text
        assert base64.b64encode(secret.encode()).decode()[: PIECE * 2] not in text
        leaked = [body[i : i + PIECE] for i in range(len(body) - PIECE + 1) if body[i : i + PIECE] in text]
        assert not leaked, f"a piece of a private key or token appears in the output: {leaked[:1]}"


def _everything(ns: Namespace, operator: OperatorProcess, name: str) -> str:
    return "\n".join([operator.log(), json.dumps(ns.config(name)), json.dumps(ns.events_for(name))])


def _cert_spec(dev: Dev, app: Any, secret: str = "exo-app-cert", **extra: Any) -> dict[str, Any]:
    spec = dev.spec(app, **extra)
    del spec["identity"]["clientSecret"]
    spec["identity"]["clientCertificate"] = {"secretRef": {"name": secret}}
    return spec


def _tls_secret(ns: Namespace, cert: ClientCredentialCert, name: str = "exo-app-cert") -> None:
    secret = cert.secret(name, ns.name)
    del secret["metadata"]["namespace"]
    ns.apply(secret)


# ---------------------------------------------------------------------------------------------------- certificates


def test_certificate_ready_then_rotated_within_seconds(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = dev.new_app()
    first = client_credential_cert("exo-app")
    dev.idp.add_certificate(app.tenant_id, app.client_id, first.cert_pem)
    _tls_secret(ns, first)
    ns.smtp_oauth_config("mail", _cert_spec(dev, app))
    obj = ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    status = obj["status"]
    assert status["clientCertificate"]["thumbprintSHA256"] == first.thumbprint_sha256
    assert "clientSecretExpiresAt" not in status
    expiring = ns.condition(obj, "CredentialExpiring")
    assert expiring is not None
    assert expiring["reason"] == "NotExpiring"

    # cert-manager renews: a new key and certificate in the same Secret, uploaded to the app first.
    second = client_credential_cert("exo-app")
    dev.idp.add_certificate(app.tenant_id, app.client_id, second.cert_pem)
    dev.idp.remove_certificate(app.tenant_id, app.client_id, first.cert_pem)
    _tls_secret(ns, second)
    started = datetime.now(UTC)
    wait_until(
        lambda: (
            ns.config("mail")["status"]["clientCertificate"]["thumbprintSHA256"] == second.thumbprint_sha256
        ),
        timeout=15,
        what="the rotated certificate to be re-tested",
    )
    assert (datetime.now(UTC) - started).total_seconds() < 15
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    _no_leak(_everything(ns, operator, "mail"), [first.key_pem, second.key_pem])


def test_unregistered_certificate(ns: Namespace, dev: Dev, operator: OperatorProcess) -> None:
    app = dev.new_app()
    cert = client_credential_cert("not-uploaded")
    _tls_secret(ns, cert)
    ns.smtp_oauth_config("mail", _cert_spec(dev, app))
    obj = ns.wait_for_condition("mail", "Ready", "False", "CertificateNotRegistered")
    ready = ns.condition(obj, "Ready")
    assert ready is not None
    assert cert.thumbprint_sha256 in ready["message"]
    _no_leak(_everything(ns, operator, "mail"), [cert.key_pem])


def test_certificate_near_not_after_raises_the_alarm(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = dev.new_app()
    cert = client_credential_cert("expiring", not_after=datetime.now(UTC) + timedelta(days=3))
    dev.idp.add_certificate(app.tenant_id, app.client_id, cert.cert_pem)
    _tls_secret(ns, cert)
    ns.smtp_oauth_config("mail", _cert_spec(dev, app, alarms={"notify": {"to": [ADMIN]}}))
    obj = ns.wait_for_condition("mail", "CredentialExpiring", "True", "ExpiringSoon")
    cond = ns.condition(obj, "CredentialExpiring")
    assert cond is not None
    assert "certificate" in cond["message"]
    wait_until(
        lambda: "ClientCertificateExpiringSoon" in ns.event_reasons("mail"),
        timeout=30,
        what="the ClientCertificateExpiringSoon Event",
    )
    wait_until(
        lambda: any(ADMIN in m.rcpt_tos for m in dev.messages(app)),
        timeout=30,
        what="the alarm e-mail",
    )
    mail = next(m for m in dev.messages(app) if ADMIN in m.rcpt_tos)
    assert "upload it" in mail.data.decode(errors="replace")
    _no_leak(_everything(ns, operator, "mail"), [cert.key_pem])


# ---------------------------------------------------------------------------------------------------- workload identity


@pytest.fixture(scope="module")
def issuer(control_plane: ControlPlane, dev: Dev) -> str:
    """The cluster's service-account issuer, fetchable by the local Entra ID."""
    control_plane.kubectl(
        "create", "clusterrolebinding", "e2e-issuer-discovery", "--clusterrole=system:service-account-issuer-discovery",
        "--group=system:unauthenticated", check=False,
    )  # fmt: skip
    assert control_plane.ca_file is not None
    dev.idp.trust_issuers(control_plane.ca_file.read_text())
    return f"https://127.0.0.1:{control_plane.apiserver_port}/"


def _wi_spec(dev: Dev, app: Any, account: str = "mail-sender", **wi: Any) -> dict[str, Any]:
    spec = dev.spec(app)
    del spec["identity"]["clientSecret"]
    spec["identity"]["workloadIdentity"] = {"serviceAccountName": account, **wi}
    return spec


def _federate(dev: Dev, app: Any, issuer: str, subject: str, audience: str = AUDIENCE) -> None:
    dev.idp.add_federated_credential(
        app.tenant_id, app.client_id, FederatedCredential(issuer, subject, (audience,))
    )


def test_workload_identity_ready_with_no_secret(
    ns: Namespace, dev: Dev, operator: OperatorProcess, issuer: str
) -> None:
    app = dev.new_app()
    ns.kubectl("create", "serviceaccount", "mail-sender")
    _federate(dev, app, issuer, f"system:serviceaccount:{ns.name}:mail-sender")
    ns.smtp_oauth_config("mail", _wi_spec(dev, app))
    obj = ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested", timeout=45)
    expiring = ns.condition(obj, "CredentialExpiring")
    assert expiring is not None
    assert "Nothing expires" in expiring["message"]
    secrets = json.loads(ns.kubectl("get", "secrets", "-o", "json").stdout)["items"]
    assert secrets == [], "workload identity needs no Secret"
    presented = dev.idp.received_assertions
    assert presented
    _no_leak(_everything(ns, operator, "mail"), presented)


@pytest.mark.parametrize(
    ("case", "reason", "quoted"),
    [
        ("wrong-subject", "FederatedCredentialMismatch", "subject the operator presented"),
        ("wrong-audience", "FederatedCredentialMismatch", "audience the operator presented"),
        ("no-service-account", "ServiceAccountNotFound", "does not exist"),
    ],
)
def test_workload_identity_reasons(
    ns: Namespace, dev: Dev, operator: OperatorProcess, issuer: str, case: str, reason: str, quoted: str
) -> None:
    app = dev.new_app()
    subject = f"system:serviceaccount:{ns.name}:mail-sender"
    if case != "no-service-account":
        ns.kubectl("create", "serviceaccount", "mail-sender")
    if case == "wrong-subject":
        _federate(dev, app, issuer, subject.upper())
    elif case == "wrong-audience":
        _federate(dev, app, issuer, subject, audience="api://AzureADTokenExchangeChina")
    else:
        _federate(dev, app, issuer, subject)
    ns.smtp_oauth_config("mail", _wi_spec(dev, app))
    obj = ns.wait_for_condition("mail", "Ready", "False", reason, timeout=45)
    ready = ns.condition(obj, "Ready")
    assert ready is not None
    assert quoted in ready["message"], ready
    _no_leak(_everything(ns, operator, "mail"), dev.idp.received_assertions)


def test_token_request_forbidden_and_missing_account_through_the_operators_client(
    control_plane: ControlPlane, ns: Namespace, tmp_path: Path
) -> None:
    """TokenRequest answered 403 → TokenRequestDenied, 404 → ServiceAccountNotFound, by the real API server."""
    import asyncio  # noqa: PLC0415

    ns.kubectl("create", "serviceaccount", "mail-sender")
    ns.kubectl("create", "serviceaccount", "weak")
    weak = control_plane.token_for(ns.name, "weak")
    path = control_plane.kubeconfig_for_token(weak, tmp_path / "weak.kubeconfig")

    def kube_from(kubeconfig: Path | None) -> Kube:
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(
            config_file=str(kubeconfig or control_plane.env()["KUBECONFIG"]),
            client_configuration=configuration,
        )
        return Kube(kubernetes.client.ApiClient(configuration))

    async def attempt(kube: Kube, account: str) -> Reason | str:
        failure: CheckFailed | None = None
        try:
            token = await kube.request_token(ns.name, account, AUDIENCE, seconds=600)
        except CheckFailed as exc:
            failure = exc
        finally:
            kube.close()
        if failure is not None:
            assert weak not in failure.message
            return failure.reason
        return "token" if token.count(".") == 2 else "?"

    assert asyncio.run(attempt(kube_from(path), "mail-sender")) is Reason.TOKEN_REQUEST_DENIED
    assert asyncio.run(attempt(kube_from(None), "missing")) is Reason.SERVICE_ACCOUNT_NOT_FOUND
    assert asyncio.run(attempt(kube_from(None), "mail-sender")) == "token"


def test_deleted_service_account_is_reported_at_the_next_token_request(
    ns: Namespace, dev: Dev, operator: OperatorProcess, issuer: str
) -> None:
    app = dev.new_app()
    # Tokens that MSAL already considers due for renewal (it renews 5 minutes before expiry), so that
    # every test makes a network token request, as happens once an hour with real lifetimes.
    dev.idp.set_token_lifetime(app.tenant_id, app.client_id, 300)
    ns.kubectl("create", "serviceaccount", "mail-sender")
    _federate(dev, app, issuer, f"system:serviceaccount:{ns.name}:mail-sender")
    ns.smtp_oauth_config("mail", _wi_spec(dev, app))
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested", timeout=45)

    ns.kubectl("delete", "serviceaccount", "mail-sender")
    ns.kubectl("annotate", "smtpoauthconfig", "mail", "smtpoauth.dev/recheck=deleted", "--overwrite")
    obj = ns.wait_for_condition("mail", "Ready", "False", "ServiceAccountNotFound", timeout=45)
    ready = ns.condition(obj, "Ready")
    assert ready is not None
    assert f"{ns.name}/mail-sender" in ready["message"]
    assert "ConnectionTestFailed" in ns.event_reasons("mail")
    _no_leak(_everything(ns, operator, "mail"), dev.idp.received_assertions)


def test_credential_samples_are_accepted_by_the_api_server(ns: Namespace) -> None:
    samples = Path(__file__).resolve().parents[1] / "tests" / "samples"
    for name in ("valid-certificate.yaml", "valid-workload-identity.yaml"):
        docs = [
            d
            for d in yaml.safe_load_all((samples / name).read_text())
            if d and d["kind"] == "SmtpOAuthConfig"
        ]
        out = ns.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(docs)).stdout
        assert "created (server dry run)" in out, out
