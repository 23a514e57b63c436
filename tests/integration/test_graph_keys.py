"""Certificate renewal through Graph's addKey/removeKey with a proof of possession, for real.

The local Entra ID and the local Graph share one directory: a certificate added through ``add_key``
really gets a token from the token endpoint through MSAL, and one removed through ``remove_key`` is
refused there. The proof is built by the operator's own ``proof_of_possession`` and checked by the
stand-in the way Graph documents it; every way a proof can be wrong is refused with Graph's 401, and
through the client becomes GraphAccessDenied without quoting the proof, the token or the key.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import msal
import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization

from smtp_oauth_operator.clients.graph import GraphRead, add_key, read_application, remove_key
from smtp_oauth_operator.domain.credentials import POP_AUDIENCE, proof_of_possession
from smtp_oauth_operator.domain.reasons import CheckFailed, Reason
from smtp_oauth_operator.testing.graph import GRAPH_RESOURCE, FakeGraph
from smtp_oauth_operator.testing.idp import FakeEntraID
from smtp_oauth_operator.testing.pki import ClientCredentialCert, ServerCert, client_credential_cert

from .conftest import CANARY, CLIENT, TENANT
from .test_check_credentials import assert_no_leak

OTHER = "44444444-4444-4444-8444-444444444444"
OTHER_SECRET = "OTHER~s3cr3t.VALUE_abcdef0123456789"
EXCHANGE_SCOPE = "https://outlook.office365.com/.default"
GRAPH_SCOPE = f"{GRAPH_RESOURCE}/.default"


@dataclass
class World:
    idp: FakeEntraID
    graph: FakeGraph
    session: requests.Session
    old: ClientCredentialCert
    messages: list[str] = field(default_factory=list)  # every CheckFailed message, for the leak check
    canaries: list[str] = field(default_factory=list)

    @property
    def object_id(self) -> str:
        return self.idp.app_record(TENANT, CLIENT).object_id

    def token(
        self, credential: ClientCredentialCert | str, scope: str = GRAPH_SCOPE, client: str = CLIENT
    ) -> dict:  # type: ignore[type-arg]
        """A token from the local Entra ID through MSAL, with a secret or with a certificate the way the
        operator presents one (private key + public certificate: PS256, x5t#S256)."""
        secret: Any = (
            credential
            if isinstance(credential, str)
            else {"private_key": credential.key_pem, "public_certificate": credential.cert_pem}
        )
        app = msal.ConfidentialClientApplication(
            client,
            client_credential=secret,
            authority=self.idp.authority(TENANT),
            http_client=self.session,
            instance_discovery=False,
            validate_authority=False,
        )
        result: dict = app.acquire_token_for_client(scopes=[scope])  # type: ignore[type-arg]
        if "access_token" in result:
            self.canaries.append(result["access_token"])
        return result

    def read(self, credential: ClientCredentialCert | str | None = None, client: str = CLIENT) -> GraphRead:
        bearer = self.token(credential or self.old, client=client)["access_token"]
        return GraphRead(graph_host=self.graph.base_url, app_id=CLIENT, token=bearer, ca_pem=self.idp.ca_pem)

    def proof(self, signer: ClientCredentialCert, object_id: str | None = None) -> str:
        value = proof_of_possession(
            object_id=object_id or self.object_id,
            private_key_pem=signer.key_pem.encode(),
            certificate_der=der(signer),
            now=dt.datetime.now(dt.UTC),
        )
        self.canaries.append(value)
        return value

    async def refused(self, call: Any) -> CheckFailed:
        with pytest.raises(CheckFailed) as caught:
            await call
        self.messages.append(caught.value.message)
        return caught.value

    def post(self, action: str, bearer: str, body: dict[str, Any]) -> requests.Response:
        return self.session.post(
            f"{self.graph.base_url}/v1.0/applications(appId='{CLIENT}')/{action}",
            json=body,
            headers={"Authorization": f"Bearer {bearer}"},
            timeout=10,
        )


def der(credential: ClientCredentialCert) -> bytes:
    return credential.certificate.public_bytes(serialization.Encoding.DER)


def sha1(credential: ClientCredentialCert) -> bytes:
    return credential.certificate.fingerprint(hashes.SHA1())


def hand_made_proof(signer: ClientCredentialCert, **claims: Any) -> str:
    """A proof built here, not by the operator, so each claim can be wrong on its own."""
    now = int(dt.datetime.now(dt.UTC).timestamp())
    payload = {"aud": POP_AUDIENCE, "nbf": now, "exp": now + 600, **claims}
    key = serialization.load_pem_private_key(signer.key_pem.encode(), password=None)
    x5t = base64.urlsafe_b64encode(sha1(signer)).rstrip(b"=").decode()
    return jwt.encode(payload, key, algorithm="RS256", headers={"x5t": x5t})  # type: ignore[arg-type]


@pytest.fixture
def world(cert: ServerCert) -> Iterator[World]:
    old = client_credential_cert("exo-app-2026")
    with FakeEntraID(cert) as idp:
        idp.register_tenant(TENANT, "contoso.onmicrosoft.com")
        idp.register_app(TENANT, CLIENT, CANARY)
        idp.add_certificate(TENANT, CLIENT, old.cert_pem)
        with FakeGraph(idp, cert) as graph, requests.Session() as session:
            session.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise override verify
            session.verify = str(cert.ca_file)
            here = World(idp, graph, session, old, canaries=[CANARY, old.key_pem])
            yield here
            # No message produced by any test may quote a proof, a token, a secret or a private key.
            for message in here.messages:
                assert_no_leak(message, here.canaries)


async def test_add_key_then_remove_the_old_one(world: World) -> None:
    world.idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.Read.All")
    read = world.read()
    new = client_credential_cert("exo-app-2027", days=400)
    world.canaries.append(new.key_pem)
    assert "error" in world.token(new, EXCHANGE_SCOPE)  # not registered yet

    added = await add_key(read, der(new), "renewed by smtp-oauth-operator", world.proof(world.old))

    assert added["type"] == "AsymmetricX509Cert"
    assert added["usage"] == "Verify"
    assert added["key"] is None
    assert added["displayName"] == "renewed by smtp-oauth-operator"
    assert base64.b64decode(added["customKeyIdentifier"]) == sha1(new)
    certificate = new.certificate
    assert dt.datetime.fromisoformat(added["startDateTime"]) == certificate.not_valid_before_utc
    assert dt.datetime.fromisoformat(added["endDateTime"]) == certificate.not_valid_after_utc
    listed = {k["keyId"]: k for k in (await read_application(read))["keyCredentials"]}
    assert len(listed) == 2
    assert listed[added["keyId"]]["customKeyIdentifier"] == added["customKeyIdentifier"]
    assert listed[added["keyId"]]["endDateTime"] == added["endDateTime"]
    (old_key_id,) = set(listed) - {added["keyId"]}
    assert "access_token" in world.token(new, EXCHANGE_SCOPE)  # the new certificate works
    assert "access_token" in world.token(world.old, EXCHANGE_SCOPE)  # and the old one still does

    # After the grace period: remove the old certificate, proving possession with the new one.
    await remove_key(read, old_key_id, world.proof(new))

    refused = world.token(world.old, EXCHANGE_SCOPE)
    assert refused.get("error_codes") == [700027], refused
    assert "access_token" in world.token(new, EXCHANGE_SCOPE)
    (left,) = (await read_application(world.read(new)))["keyCredentials"]
    assert left["keyId"] == added["keyId"]
    assert world.graph.requests["addKey"] == 1
    assert world.graph.requests["removeKey"] == 1
    assert world.graph.proof_refusals == []


async def test_the_app_rolls_its_own_keys_without_any_graph_role(world: World) -> None:
    read = world.read()  # no Graph role granted at all
    denied = await world.refused(read_application(read))
    assert denied.reason is Reason.GRAPH_ACCESS_DENIED
    new = client_credential_cert("exo-app-2027")
    world.canaries.append(new.key_pem)
    added = await add_key(read, der(new), "renewed", world.proof(world.old))
    assert "access_token" in world.token(new, EXCHANGE_SCOPE)
    # A proof named by x5t#S256 (the SHA-256 thumbprint) is accepted as well.
    key = serialization.load_pem_private_key(new.key_pem.encode(), password=None)
    now = int(dt.datetime.now(dt.UTC).timestamp())
    s256 = base64.urlsafe_b64encode(new.certificate.fingerprint(hashes.SHA256())).rstrip(b"=").decode()
    proof = jwt.encode(
        {"aud": POP_AUDIENCE, "iss": world.object_id, "nbf": now, "exp": now + 600},
        key,  # type: ignore[arg-type]
        algorithm="RS256",
        headers={"x5t#S256": s256},
    )
    world.canaries.append(proof)
    old_key_id = next(
        k.key_id
        for t, k in world.idp.app_record(TENANT, CLIENT).key_meta.items()
        if k.key_id != added["keyId"]
    )
    # Addressed by object ID this time, as Graph allows.
    removed = world.session.post(
        f"{world.graph.base_url}/v1.0/applications/{world.object_id}/removeKey",
        json={"keyId": old_key_id, "proof": proof},
        headers={"Authorization": f"Bearer {read.token}"},
        timeout=10,
    )
    assert removed.status_code == 204, removed.text
    assert world.token(world.old, EXCHANGE_SCOPE).get("error_codes") == [700027]
    assert world.graph.requests["removeKey"] == 1


def _bad_proof(world: World, case: str) -> str:
    if case == "unregistered signer":
        stranger = client_credential_cert("never-registered")
        world.canaries.append(stranger.key_pem)
        return world.proof(stranger)
    if case == "expired signer":
        expired = client_credential_cert("expired", not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        world.canaries.append(expired.key_pem)
        world.idp.add_certificate(TENANT, CLIENT, expired.cert_pem)
        return world.proof(expired)
    if case == "wrong aud":
        return hand_made_proof(world.old, iss=world.object_id, aud="https://graph.microsoft.com")
    if case == "appId as iss":
        return world.proof(world.old, object_id=CLIENT)
    if case == "lifetime over 10 minutes":
        now = int(dt.datetime.now(dt.UTC).timestamp())
        return hand_made_proof(world.old, iss=world.object_id, nbf=now, exp=now + 601)
    if case == "expired proof":
        now = int(dt.datetime.now(dt.UTC).timestamp()) - 3600
        return hand_made_proof(world.old, iss=world.object_id, nbf=now, exp=now + 600)
    if case == "bad signature":
        good = world.proof(world.old)
        head, body, signature = good.split(".")
        # Reversed bytes, re-encoded: still well-formed base64url (reversing the text is not always).
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))[::-1]
        return f"{head}.{body}.{base64.urlsafe_b64encode(raw).decode().rstrip('=')}"
    if case == "no valid certificate":
        world.idp.remove_certificate(TENANT, CLIENT, world.old.cert_pem)
        return world.proof(world.old)
    assert case == "garbage"
    return "not-a-proof"


PROOF_CASES = {
    "unregistered signer": "signed by a certificate not registered and valid on the application",
    "expired signer": "signed by a certificate not registered and valid on the application",
    "wrong aud": "wrong aud",
    "appId as iss": "wrong iss",
    "lifetime over 10 minutes": "lifetime over 10 minutes",
    "expired proof": "outside its lifetime",
    "bad signature": "bad signature",
    "no valid certificate": "the application has no valid certificate",
    "garbage": "not a JWT",
}


@pytest.mark.parametrize("case", list(PROOF_CASES))
async def test_every_bad_proof_is_refused_as_graph_does(world: World, case: str) -> None:
    read = world.read()  # the token is taken first: "no valid certificate" removes the one it uses
    new = client_credential_cert("exo-app-2027")
    world.canaries.append(new.key_pem)
    proof = _bad_proof(world, case)
    world.canaries.append(proof)

    raw = world.post(
        "addKey",
        read.token,
        {
            "keyCredential": {
                "type": "AsymmetricX509Cert",
                "usage": "Verify",
                "key": base64.b64encode(der(new)).decode(),
            },
            "passwordCredential": None,
            "proof": proof,
        },
    )
    assert raw.status_code == 401, raw.text
    assert raw.json()["error"]["code"] == "Authentication_MissingOrMalformed"
    assert raw.json()["error"]["message"] == "Access Token missing or malformed."

    failure = await world.refused(add_key(read, der(new), "renewed", proof))
    assert failure.reason is Reason.GRAPH_ACCESS_DENIED
    assert "proof of possession" in failure.message
    assert "object ID" in failure.message
    assert proof not in failure.message
    assert world.graph.proof_refusals == [PROOF_CASES[case]] * 2
    assert "error" in world.token(new, EXCHANGE_SCOPE)  # nothing was registered

    removal = await world.refused(remove_key(read, "00000000-0000-4000-8000-000000000000", proof))
    assert removal.reason is Reason.GRAPH_ACCESS_DENIED
    assert "removeKey" in removal.message


async def test_another_caller_needs_owned_by_as_owner(world: World) -> None:
    world.idp.register_app(TENANT, OTHER, OTHER_SECRET)
    world.canaries.append(OTHER_SECRET)
    new = client_credential_cert("exo-app-2027")
    world.canaries.append(new.key_pem)
    other = world.read(OTHER_SECRET, client=OTHER)
    failure = await world.refused(add_key(other, der(new), "renewed", world.proof(world.old)))
    assert failure.reason is Reason.GRAPH_ACCESS_DENIED
    assert "HTTP 403" in failure.message
    assert "own keys with no Graph permission" in failure.message
    assert "Application.ReadWrite.OwnedBy as an owner" in failure.message
    world.idp.grant_api_roles(TENANT, OTHER, GRAPH_RESOURCE, "Application.ReadWrite.OwnedBy")
    world.idp.expire_tokens()
    owned_by = world.read(OTHER_SECRET, client=OTHER)
    assert (await world.refused(add_key(owned_by, der(new), "x", world.proof(world.old)))).reason is (
        Reason.GRAPH_ACCESS_DENIED
    )
    world.idp.add_owner(TENANT, CLIENT, OTHER)
    added = await add_key(owned_by, der(new), "renewed by an owner", world.proof(world.old))
    assert added["displayName"] == "renewed by an owner"
    assert "access_token" in world.token(new, EXCHANGE_SCOPE)
    assert world.graph.requests["addKey"] == 1  # refused callers are not counted


async def test_duplicate_malformed_and_unknown_key(world: World) -> None:
    read = world.read()
    # The certificate already registered: 400, and the client says what Graph said.
    duplicate = world.post(
        "addKey",
        read.token,
        {
            "keyCredential": {
                "type": "AsymmetricX509Cert",
                "usage": "Verify",
                "key": base64.b64encode(der(world.old)).decode(),
            },
            "passwordCredential": None,
            "proof": world.proof(world.old),
        },
    )
    assert duplicate.status_code == 400
    assert duplicate.json()["error"]["code"] == "Request_BadRequest"
    assert "same certificate thumbprint already exists" in duplicate.json()["error"]["message"]
    failure = await world.refused(add_key(read, der(world.old), "again", world.proof(world.old)))
    assert "HTTP 400" in failure.message
    assert "already exists" in failure.message
    assert len(world.idp.app_record(TENANT, CLIENT).certificates) == 1

    for body in (
        {"keyCredential": {"type": "AsymmetricX509Cert", "usage": "Verify", "key": "bm90IGEgY2VydA=="}},
        {"keyCredential": {"type": "AsymmetricX509Cert", "usage": "Verify", "key": "%%%"}},
        {"keyCredential": {"type": "Symmetric", "usage": "Verify", "key": ""}},
        {"keyCredential": "MIIB"},
        {},
    ):
        answer = world.post("addKey", read.token, {**body, "proof": world.proof(world.old)})
        assert answer.status_code == 400, body
        assert answer.json()["error"]["code"] == "Request_BadRequest"
    expired = client_credential_cert("expired", not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    world.canaries.append(expired.key_pem)
    stale = await world.refused(add_key(read, der(expired), "stale", world.proof(world.old)))
    assert "has expired" in stale.message

    unknown = await world.refused(
        remove_key(read, "00000000-0000-4000-8000-000000000000", world.proof(world.old))
    )
    assert "HTTP 400" in unknown.message
    assert "No key credential found with keyId" in unknown.message
    assert world.graph.proof_refusals == []
    assert "access_token" in world.token(world.old, EXCHANGE_SCOPE)


async def test_throttled_and_denied_writes(world: World) -> None:
    read = world.read()
    new = client_credential_cert("exo-app-2027")
    world.canaries.append(new.key_pem)
    world.graph.throttle(retry_after=9, times=1, operation="write")
    throttled = await world.refused(add_key(read, der(new), "renewed", world.proof(world.old)))
    assert throttled.reason is Reason.GRAPH_THROTTLED
    assert throttled.retry_after == 9
    assert "addKey" in throttled.message
    world.graph.deny(times=1, operation="write")
    denied = await world.refused(
        remove_key(read, "00000000-0000-4000-8000-000000000000", world.proof(world.old))
    )
    assert denied.reason is Reason.GRAPH_ACCESS_DENIED
    assert "HTTP 403" in denied.message
    assert world.graph.requests["addKey"] == 0
    added = await add_key(read, der(new), "renewed", world.proof(world.old))
    assert base64.b64decode(added["customKeyIdentifier"]) == sha1(new)
    assert world.graph.requests["addKey"] == 1
