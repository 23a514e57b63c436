"""Sealed Secrets end to end: the real controller unseals, the operator judges the result.

The Sealed Secrets controller v0.40.0 (built from Go modules by hack/sealed-secrets.sh) runs as its
chart's ServiceAccount against the session's kube-apiserver (see e2e/sealedsecrets.py); kubeseal
encrypts the client secret with the controller's public certificate (``--cert``); the SealedSecret
is applied; the controller creates the Secret with an owner reference to it; and the operator
(``smtp-oauth-operator run -A``, the shared fixture from e2e/fixtures.py) tests the connection against
the local Entra ID and Exchange with the unsealed value and sets SecretProtected.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from e2e.controlplane import ControlPlane
from e2e.fixtures import Dev, Namespace, OperatorProcess
from e2e.sealedsecrets import SEALED_SECRET_API_VERSION, SealedSecretsController

LABEL = "velero.io/exclude-from-backup"


@pytest.fixture(scope="module")
def sealed_secrets(control_plane: ControlPlane) -> Iterator[SealedSecretsController]:
    with SealedSecretsController(control_plane) as controller:
        yield controller


def _condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    found = Namespace.condition(obj, ctype)
    assert found is not None, f"no {ctype} condition in {obj.get('status')}"
    return found


def _seal_and_apply(
    ss: SealedSecretsController, ns: Namespace, value: str, *, labelled: bool
) -> dict[str, Any]:
    sealed = ss.seal(
        ns.name, "exo-app", {"client-secret": value}, labels={LABEL: "true"} if labelled else None
    )
    assert value not in json.dumps(sealed), "kubeseal left the plain value in the SealedSecret"
    ns.apply(sealed)
    return ss.wait_for_secret(ns.name, "exo-app")


def test_sealed_and_labelled_secret_is_protected(
    sealed_secrets: SealedSecretsController, operator: OperatorProcess, ns: Namespace, dev: Dev
) -> None:
    app = dev.new_app()
    secret = _seal_and_apply(sealed_secrets, ns, app.secret, labelled=True)

    # What the controller made: the real value, the template's label, a controller reference.
    assert base64.b64decode(secret["data"]["client-secret"]).decode() == app.secret
    assert secret["metadata"]["labels"][LABEL] == "true"
    (owner,) = secret["metadata"]["ownerReferences"]
    assert owner["apiVersion"] == SEALED_SECRET_API_VERSION
    assert owner["kind"] == "SealedSecret"
    assert owner["name"] == "exo-app"
    assert owner["controller"] is True
    assert owner["uid"] == ns.get("sealedsecret", "exo-app")["metadata"]["uid"]

    ns.smtp_oauth_config("mail", dev.spec(app))
    obj = ns.wait_for_condition("mail", "Ready", "True", timeout=60)
    protected = _condition(obj, "SecretProtected")
    assert protected["status"] == "True", protected
    assert protected["reason"] == "Protected", protected
    assert "SealedSecret exo-app" in protected["message"]
    assert dev.auth_attempts(app), "the operator never authenticated with the unsealed secret"


def test_sealed_but_unlabelled_secret_is_not_excluded_from_backup(
    sealed_secrets: SealedSecretsController, operator: OperatorProcess, ns: Namespace, dev: Dev
) -> None:
    app = dev.new_app()
    secret = _seal_and_apply(sealed_secrets, ns, app.secret, labelled=False)
    assert LABEL not in (secret["metadata"].get("labels") or {})
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "SealedSecret"

    ns.smtp_oauth_config("mail", dev.spec(app))
    obj = ns.wait_for_condition("mail", "SecretProtected", "False", "NotExcludedFromBackup", timeout=60)
    message = _condition(obj, "SecretProtected")["message"]
    assert LABEL in message
    assert "spec.template.metadata.labels" in message  # tells exactly where the label goes
    # spec.secretPolicy defaults to Warn: the connection test still decides Ready.
    obj = ns.wait_for_condition("mail", "Ready", "True", timeout=60)

    # The fix the message asks for: re-seal with the label in the template. The controller updates
    # its Secret, the operator's Secret watch re-tests it.
    sealed = sealed_secrets.seal(ns.name, "exo-app", {"client-secret": app.secret}, labels={LABEL: "true"})
    ns.apply(sealed)
    ns.wait_for_condition("mail", "SecretProtected", "True", "Protected", timeout=60)
