"""Client-secret renewal on the real control plane (issue 14), with the operator SIGKILLed between steps.

A secret 10 days from its end with renewBefore 30d: the operator adds a password through the local Graph,
stores it in a Secret it owns, tests with it, switches, and removes the old password after the (shortened)
grace period. Killed once after each recorded step, it still ends with exactly one password added, the old one
removed and the new one working at the local Entra ID. An interrupted add whose value was lost (a credential
carrying the renewal's intent, no Secret) is cleaned up, not doubled.

Certificates: cert-manager writes a new certificate *and key* into the referenced Secret; the operator,
whose app has no Graph write permission at all, registers it with addKey (proof signed by its copy of the
registered pair), tests, switches and removes the old one with removeKey — SIGKILLed once after each step,
with Ready True throughout and exactly the new certificate registered at the end.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import smtplib
import ssl
from datetime import UTC, datetime, timedelta
from typing import Any

import msal
import pytest
import requests
from e2e.fixtures import MAILBOX, RELAY_USER, App, Dev, Namespace, OperatorProcess, Relay, wait_until

from smtp_oauth_operator.testing.graph import GRAPH_RESOURCE
from smtp_oauth_operator.testing.idp import EXCHANGE_RESOURCE
from smtp_oauth_operator.testing.pki import ClientCredentialCert, client_credential_cert

pytestmark = pytest.mark.e2e

PIECE = 24


def _renewing_app(dev: Dev, days_left: float = 10) -> App:
    app = dev.new_app()
    dev.idp.grant_api_roles(app.tenant_id, app.client_id, GRAPH_RESOURCE, "Application.ReadWrite.OwnedBy")
    dev.idp.add_owner(app.tenant_id, app.client_id, app.client_id)
    end = (datetime.now(UTC) + timedelta(days=days_left)).replace(microsecond=0)
    dev.idp.set_secret_end(app.tenant_id, app.client_id, app.secret, end)
    return app


def _spec(dev: Dev, app: App, grace: str = "8s") -> dict[str, Any]:
    spec = dev.spec(app)
    spec["identity"]["discovery"] = {"graph": True, "graphHost": dev.graph.base_url}
    spec["identity"]["clientSecret"]["renewal"] = {
        "renewBefore": "30d",
        "validity": "180d",
        "gracePeriod": grace,
    }
    return spec


def _renewal(ns: Namespace, name: str = "mail") -> dict[str, Any]:
    return dict((ns.config(name).get("status") or {}).get("renewal") or {})


def _kill(operator: OperatorProcess) -> None:
    proc = operator.proc
    assert proc is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _passwords(dev: Dev, app: App) -> dict[str, str]:
    """keyId → displayName of the app's passwords, as the local Graph keeps them."""
    with dev.idp.lock:
        record = dev.idp.app_record(app.tenant_id, app.client_id)
        return {
            m.key_id: m.display_name or "" for v, m in record.password_meta.items() if v in record.secrets
        }


def _works(dev: Dev, app: App, secret: str) -> bool:
    with requests.Session() as session:
        session.trust_env = False
        session.verify = dev.servers.ca_file.as_posix()
        client = msal.ConfidentialClientApplication(
            app.client_id,
            client_credential=secret,
            authority=dev.idp.authority(app.tenant_id),
            http_client=session,
            instance_discovery=False,
            validate_authority=False,
        )
        return "access_token" in client.acquire_token_for_client(scopes=[f"{EXCHANGE_RESOURCE}/.default"])


def _no_leak(dev: Dev, ns: Namespace, operator: OperatorProcess, name: str) -> None:
    text = "\n".join([operator.log(), json.dumps(ns.config(name)), json.dumps(ns.events_for(name))])
    for secret in [*dev.secrets, *dev.graph.returned_secrets, *dev.idp.issued_tokens]:
        assert secret not in text
        leaked = [
            secret[i : i + PIECE] for i in range(len(secret) - PIECE + 1) if secret[i : i + PIECE] in text
        ]
        assert not leaked, f"a piece of a secret or token appears in the output: {leaked[:1]}"


def test_renewal_survives_a_sigkill_after_every_step(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = _renewing_app(dev)
    (old_key,) = _passwords(dev, app)
    ns.secret(app.secret)
    ns.smtp_oauth_config("mail", _spec(dev, app))

    seen: list[str] = []
    for phase in ("Adding", "Testing", "Active", "Removing"):
        wait_until(
            lambda p=phase: _renewal(ns).get("phase") in _after(p), timeout=60, what=f"renewal phase {phase}"
        )
        seen.append(str(_renewal(ns).get("phase")))
        _kill(operator)  # between the recorded step and the next one (or just after it)
        operator.start()
    wait_until(lambda: _renewal(ns).get("phase") == "Done", timeout=60, what="renewal done")
    state = _renewal(ns)

    passwords = _passwords(dev, app)
    ours = [k for k, name in passwords.items() if name.startswith("smtp-oauth-operator renewal ")]
    assert len(ours) == 1, (passwords, seen)  # exactly one password added, whatever the kills interrupted
    assert old_key not in passwords  # the old one removed...
    assert state["oldKeyId"] == old_key
    assert state["newKeyId"] == ours[0]  # ...and the recorded new one kept
    assert dev.graph.requests["addPassword"] >= 1

    owned = ns.get("secret", state["secretName"])
    assert owned["metadata"]["labels"]["velero.io/exclude-from-backup"] == "true"
    assert owned["metadata"]["ownerReferences"][0]["kind"] == "SmtpOAuthConfig"
    new_secret = _value_of(dev, app, ours[0])
    assert new_secret in dev.graph.returned_secrets  # handed out by addPassword, to the operator only
    assert _works(dev, app, new_secret)
    assert not _works(dev, app, app.secret)

    obj = ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    assert obj["status"]["expirySource"] == "Graph"
    ends = datetime.strptime(obj["status"]["clientSecretExpiresAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert ends > datetime.now(UTC) + timedelta(days=170)  # the renewed secret's date drives the alarms now
    reasons = ns.event_reasons("mail")
    for reason in (
        "RenewalStarted",
        "RenewalCredentialAdded",
        "RenewalSwitched",
        "RenewalOldCredentialRemoved",
    ):
        assert reason in reasons, reasons
    assert "RenewalFailed" not in reasons
    renewal = ns.condition(ns.config("mail"), "Renewal")
    assert renewal is not None
    assert (renewal["status"], renewal["reason"]) == ("True", "Renewed")
    _no_leak(dev, ns, operator, "mail")


def _after(phase: str) -> set[str]:
    order = ["Adding", "Testing", "Active", "Removing", "Done"]
    return set(order[order.index(phase) :])


def test_an_interrupted_add_whose_value_was_lost_is_cleaned_up(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = _renewing_app(dev, days_left=200)  # far from its end: no renewal of its own
    ns.secret(app.secret)
    ns.smtp_oauth_config("mail", _spec(dev, app, grace="1h"))
    ns.wait_for_condition("mail", "ExpiryDiscovered", "True", "Discovered")
    assert _renewal(ns) == {}
    # Stop the operator and record "Adding", as if it had died after addPassword answered and before the
    # Secret was written: Graph holds a password named for the intent, and nobody holds its value.
    operator.stop()
    intent = "0123456789abcdef0123456789abcdef"
    lost = dev.graph.add_password(
        app.tenant_id, app.client_id, display_name=f"smtp-oauth-operator renewal {intent}"
    )
    (old_key,) = [k for k, n in _passwords(dev, app).items() if not n.startswith("smtp-oauth-operator")]
    state = {
        "phase": "Adding",
        "intent": intent,
        "oldKeyId": old_key,
        "secretName": "mail-renewed-lost",
        "startedAt": "2026-01-01T00:00:00Z",
    }
    patch = json.dumps({"status": {"renewal": state}})
    ns.kubectl("patch", "smtpoauthconfig", "mail", "--subresource=status", "--type=merge", "-p", patch)
    operator.start()
    wait_until(lambda: _renewal(ns).get("phase") in {"Active", "Removing", "Done"}, timeout=60, what="switch")
    passwords = _passwords(dev, app)
    ours = [k for k, n in passwords.items() if n == f"smtp-oauth-operator renewal {intent}"]
    assert len(ours) == 1, passwords  # the orphan removed, one added
    assert not _works(dev, app, lost)
    assert old_key in passwords  # grace period of 1 h: the old one stays for now
    assert "RenewalOrphanRemoved" in ns.event_reasons("mail")
    _no_leak(dev, ns, operator, "mail")


def _value_of(dev: Dev, app: App, key_id: str) -> str:
    with dev.idp.lock:
        record = dev.idp.app_record(app.tenant_id, app.client_id)
        return next(v for v, m in record.password_meta.items() if m.key_id == key_id)


def test_a_stored_but_unrecorded_add_is_adopted(ns: Namespace, dev: Dev, operator: OperatorProcess) -> None:
    """Killed after the Secret write and before the status write: the password and its Secret are adopted."""
    app = _renewing_app(dev, days_left=200)
    ns.secret(app.secret)
    ns.smtp_oauth_config("mail", _spec(dev, app, grace="1h"))
    ns.wait_for_condition("mail", "ExpiryDiscovered", "True", "Discovered")
    operator.stop()
    intent = "fedcba9876543210fedcba9876543210"
    label = f"smtp-oauth-operator renewal {intent}"
    value = dev.graph.add_password(app.tenant_id, app.client_id, display_name=label)
    (key_id,) = [k for k, n in _passwords(dev, app).items() if n == label]
    ns.secret(
        value,
        name="mail-renewed",
        labels={"velero.io/exclude-from-backup": "true", "smtpoauth.dev/renewal-of": "mail"},
    )
    annotations = {"smtpoauth.dev/renewal-intent": intent, "smtpoauth.dev/renewal-key-id": key_id}
    ns.kubectl("annotate", "secret", "mail-renewed", *(f"{k}={v}" for k, v in annotations.items()))
    (old_key,) = [k for k, n in _passwords(dev, app).items() if n != label]
    state = {"phase": "Adding", "intent": intent, "oldKeyId": old_key, "secretName": "mail-renewed"}
    ns.kubectl(
        "patch", "smtpoauthconfig", "mail", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"renewal": state}}),
    )  # fmt: skip
    adds = dev.graph.requests["addPassword"]
    operator.start()
    wait_until(lambda: _renewal(ns).get("phase") == "Active", timeout=60, what="the switch")
    assert _renewal(ns)["newKeyId"] == key_id
    assert dev.graph.requests["addPassword"] == adds  # adopted, not added again
    assert len([n for n in _passwords(dev, app).values() if n.startswith("smtp-oauth-operator")]) == 1
    _no_leak(dev, ns, operator, "mail")


def test_renewal_without_write_permission_fails_named_and_ready_stays(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app = dev.new_app()
    dev.idp.grant_api_roles(app.tenant_id, app.client_id, GRAPH_RESOURCE, "Application.Read.All")  # read only
    end = (datetime.now(UTC) + timedelta(days=10)).replace(microsecond=0)
    dev.idp.set_secret_end(app.tenant_id, app.client_id, app.secret, end)
    ns.secret(app.secret)
    ns.smtp_oauth_config("mail", _spec(dev, app))
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    wait_until(lambda: ns.count_events("mail", "RenewalFailed") == 1, timeout=60, what="RenewalFailed")
    (event,) = [e for e in ns.events_for("mail") if e["reason"] == "RenewalFailed"]
    assert "addPassword" in event["message"]
    assert "Application.ReadWrite.OwnedBy" in event["message"]
    state = _renewal(ns)
    assert state["phase"] == "Adding"
    assert state["lastFailure"]["step"] == "addPassword"
    assert state["lastFailure"]["reason"] == "GraphAccessDenied"
    renewal = ns.condition(ns.config("mail"), "Renewal")
    assert renewal is not None
    assert (renewal["status"], renewal["reason"]) == ("False", "RenewalFailed")
    assert "addPassword" in renewal["message"]
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    assert [n for n in _passwords(dev, app).values() if n.startswith("smtp-oauth-operator")] == []
    _no_leak(dev, ns, operator, "mail")


def test_a_second_renewal_never_breaks_the_secret_in_use(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    """validity just above renewBefore: the renewed secret is renewed again ~30 s later, into the other Secret."""
    app = _renewing_app(dev)
    ns.secret(app.secret)
    spec = _spec(dev, app, grace="3s")
    spec["identity"]["clientSecret"]["renewal"]["validity"] = "30d30s"
    ns.smtp_oauth_config("mail", spec)

    def done(other_than: str | None = None) -> dict[str, Any] | None:
        # The record read once: read again after the wait, it may already be the next renewal's.
        state = _renewal(ns)
        return state if state.get("phase") == "Done" and state.get("intent") != other_than else None

    first = wait_until(done, timeout=60, what="the first renewal")
    second = wait_until(lambda: done(other_than=first["intent"]), timeout=90, what="the second renewal")
    reasons = ns.event_reasons("mail")
    assert "ConnectionTestFailed" not in reasons  # the resource never lost a working secret
    assert first["secretName"] == "mail-renewed"
    assert second["secretName"] == "mail-renewed-b"
    assert second["fromSecret"] == "mail-renewed"
    assert second["oldKeyId"] == first["newKeyId"]
    passwords = _passwords(dev, app)
    assert list(passwords) == [second["newKeyId"]]  # the original and the first renewal's both removed
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    assert "RenewalFailed" not in reasons
    _no_leak(dev, ns, operator, "mail")


def test_the_relay_follows_a_renewal(
    ns: Namespace, dev: Dev, operator: OperatorProcess, relay: Relay
) -> None:
    """The relay authenticates with the renewed secret once the resource switched: after the old password is
    removed, a message sent through the relay still reaches Exchange (tokens live 60 s here, so the relay
    must get a new one with whatever secret it holds)."""
    app = _renewing_app(dev)
    dev.idp.set_token_lifetime(app.tenant_id, app.client_id, 60)
    password = dev.new_secret()
    ns.secret(app.secret)
    ns.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/basic-auth",
            "metadata": {"name": "mail-relay"},
            "stringData": {"username": RELAY_USER, "password": password},
        }
    )
    spec = _spec(dev, app, grace="2s")
    spec["relay"] = {"enabled": True, "credentialsSecretRef": {"name": "mail-relay"}}
    ns.smtp_oauth_config("mail", spec)
    wait_until(lambda: _renewal(ns).get("phase") == "Done", timeout=90, what="the renewal")
    assert not _works(dev, app, app.secret)  # the secret the spec names is gone from the app
    wait_until(lambda: relay.login(password)[0] == 235, timeout=30, what="the relay to serve mail")

    subject = f"after renewal {ns.name}"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.starttls(context=ssl.create_default_context(cafile=str(relay.cert.ca_file)))
        smtp.login(RELAY_USER, password)
        smtp.sendmail(MAILBOX, ["ops@contoso.com"], f"Subject: {subject}\r\n\r\nrenewed\r\n")
    assert any(m.message["Subject"] == subject for m in dev.messages(app))
    assert app.secret not in relay.output()
    _no_leak(dev, ns, operator, "mail")


# ---------------------------------------------------------------------------------------------------- certificates


def _tls(ns: Namespace, cert: ClientCredentialCert, name: str = "exo-app-cert") -> None:
    secret = cert.secret(name, ns.name)
    del secret["metadata"]["namespace"]
    ns.apply(secret)


def _cert_spec(dev: Dev, app: App, grace: str) -> dict[str, Any]:
    spec = dev.spec(app)
    del spec["identity"]["clientSecret"]
    spec["identity"]["clientCertificate"] = {
        "secretRef": {"name": "exo-app-cert"},
        "renewal": {"gracePeriod": grace},
    }
    spec["identity"]["discovery"] = {"graph": True, "graphHost": dev.graph.base_url}
    return spec


def _registered(dev: Dev, app: App) -> set[str]:
    """SHA-256 thumbprints of the certificates the app has registered (what the token endpoint accepts)."""
    with dev.idp.lock:
        return set(dev.idp.app_record(app.tenant_id, app.client_id).certificates)


def _certificate_config(ns: Namespace, dev: Dev, grace: str) -> tuple[App, ClientCredentialCert]:
    """A registered certificate under renewal, once the operator has copied it (phase Done)."""
    app = dev.new_app()
    # Discovery only: rolling its own keys needs no Graph write permission.
    dev.idp.grant_api_roles(app.tenant_id, app.client_id, GRAPH_RESOURCE, "Application.Read.All")
    old = client_credential_cert("exo-app")
    dev.idp.add_certificate(app.tenant_id, app.client_id, old.cert_pem)
    _tls(ns, old)
    ns.smtp_oauth_config("mail", _cert_spec(dev, app, grace=grace))
    wait_until(
        lambda: _renewal(ns).get("phase") == "Done", timeout=60, what="the copy of the registered pair"
    )
    return app, old


def _secret_text(ns: Namespace, name: str, key: str) -> str:
    return base64.b64decode(ns.get("secret", name)["data"][key]).decode()


def test_certificate_renewal_registers_the_new_certificate_surviving_a_sigkill_after_every_step(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app, old = _certificate_config(ns, dev, grace="8s")
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    copy = ns.get("secret", "mail-registered")
    assert copy["type"] == "kubernetes.io/tls"
    assert copy["metadata"]["labels"]["velero.io/exclude-from-backup"] == "true"
    assert _secret_text(ns, "mail-registered", "tls.crt").strip() == old.cert_pem.strip()
    assert _renewal(ns)["thumbprint"] == old.thumbprint_sha1

    # cert-manager renews (rotationPolicy: Always): a new key and certificate, not registered on the app.
    new = client_credential_cert("exo-app")
    _tls(ns, new)
    seen: list[str] = []
    for phase in ("Adding", "Testing", "Active", "Removing"):
        wait_until(
            lambda p=phase: (
                _renewal(ns).get("newThumbprint") == new.thumbprint_sha1
                and _renewal(ns).get("phase") in _after(p)
            ),
            timeout=60,
            what=f"certificate renewal phase {phase}",
        )
        seen.append(str(_renewal(ns).get("phase")))
        _kill(operator)
        operator.start()
    wait_until(
        lambda: _renewal(ns).get("phase") == "Done" and bool(_renewal(ns).get("removedAt")),
        timeout=60,
        what="certificate renewal done",
    )
    state = _renewal(ns)
    assert _registered(dev, app) == {new.thumbprint_sha256}, seen  # the new one added once, the old one gone
    assert dev.graph.requests["addKey"] >= 1
    assert state["thumbprint"] == new.thumbprint_sha1
    assert state["oldThumbprint"] == old.thumbprint_sha1
    assert _secret_text(ns, "mail-registered", "tls.crt").strip() == new.cert_pem.strip()
    obj = ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    assert obj["status"]["clientCertificate"]["thumbprintSHA256"] == new.thumbprint_sha256
    renewal = ns.condition(obj, "Renewal")
    assert renewal is not None
    assert (renewal["status"], renewal["reason"]) == ("True", "Renewed")
    reasons = ns.event_reasons("mail")
    for reason in ("RenewalPrepared", "RenewalStarted", "RenewalCredentialAdded", "RenewalSwitched"):
        assert reason in reasons, reasons
    assert "RenewalOldCredentialRemoved" in reasons
    assert "ConnectionTestFailed" not in reasons  # the unregistered certificate was never used
    assert "RenewalFailed" not in reasons
    text = "\n".join([operator.log(), json.dumps(ns.config("mail")), json.dumps(ns.events_for("mail"))])
    for key in (old.key_pem, new.key_pem):
        body = "".join(line for line in key.splitlines() if not line.startswith("-----"))
        leaked = [body[i : i + PIECE] for i in range(len(body) - PIECE + 1) if body[i : i + PIECE] in text]
        assert not leaked, f"a piece of a private key appears in the output: {leaked[:1]}"
    _no_leak(dev, ns, operator, "mail")


def test_a_refused_addkey_is_named_ready_stays_and_the_renewal_resumes(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    app, old = _certificate_config(ns, dev, grace="2s")
    dev.graph.deny(operation="write")
    try:
        new = client_credential_cert("exo-app")
        _tls(ns, new)
        wait_until(lambda: ns.count_events("mail", "RenewalFailed") == 1, timeout=60, what="RenewalFailed")
        obj = ns.config("mail")
        renewal = ns.condition(obj, "Renewal")
        assert renewal is not None
        assert (renewal["status"], renewal["reason"]) == ("False", "RenewalFailed")
        assert "addKey" in renewal["message"]
        assert _renewal(ns)["lastFailure"]["step"] == "addKey"
        assert _registered(dev, app) == {old.thumbprint_sha256}
        # The registered copy is still what the resource uses: a re-test passes.
        ns.kubectl("annotate", "smtpoauthconfig", "mail", "smtpoauth.dev/recheck=after-deny", "--overwrite")
        ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    finally:
        dev.graph.clear_faults()
    wait_until(
        lambda: _renewal(ns).get("phase") == "Done" and bool(_renewal(ns).get("removedAt")),
        timeout=90,
        what="the renewal to resume once Graph allows it",
    )
    assert _registered(dev, app) == {new.thumbprint_sha256}
    assert ns.count_events("mail", "RenewalFailed") == 1  # once per step and reason, not per retry
    renewal = ns.condition(ns.config("mail"), "Renewal")
    assert renewal is not None
    assert renewal["reason"] == "Renewed"
    _no_leak(dev, ns, operator, "mail")


def test_a_deleted_certificate_copy_is_made_again_and_ready_stays(
    ns: Namespace, dev: Dev, operator: OperatorProcess
) -> None:
    _app, old = _certificate_config(ns, dev, grace="2s")
    ns.kubectl("delete", "secret", "mail-registered")
    wait_until(lambda: ns.count_events("mail", "RenewalCopyLost") == 1, timeout=30, what="RenewalCopyLost")
    wait_until(
        lambda: _renewal(ns).get("phase") == "Done" and _secret_text(ns, "mail-registered", "tls.crt") != "",
        timeout=30,
        what="the copy to be made again",
    )
    assert _secret_text(ns, "mail-registered", "tls.crt").strip() == old.cert_pem.strip()
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested")
    assert "ConnectionTestFailed" not in ns.event_reasons("mail")
    assert ns.count_events("mail", "RenewalCopyLost") == 1
    assert ns.count_events("mail", "RenewalPrepared") == 2
