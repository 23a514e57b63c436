"""The local Microsoft Graph answers like graph.microsoft.com and shares Entra ID's directory.

Real HTTPS with requests and tokens from the local Entra ID's token endpoint (through MSAL): a password
Graph adds works at the token endpoint, one it removes stops working, and the errors have Graph's shape.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterator

import msal
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from smtp_oauth_operator.testing.graph import GRAPH_RESOURCE, FakeGraph
from smtp_oauth_operator.testing.idp import FakeEntraID
from smtp_oauth_operator.testing.pki import CertificateAuthority, ServerCert

from .conftest import CANARY, CLIENT, TENANT

GRAPH_SCOPE = f"{GRAPH_RESOURCE}/.default"


@pytest.fixture
def world(cert: ServerCert) -> Iterator[tuple[FakeEntraID, FakeGraph, requests.Session]]:
    with FakeEntraID(cert) as idp:
        idp.register_tenant(TENANT, "contoso.onmicrosoft.com")
        idp.register_app(TENANT, CLIENT, CANARY)
        with FakeGraph(idp) as graph, requests.Session() as session:
            session.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise override verify
            session.verify = str(cert.ca_file)
            yield idp, graph, session


def token(
    idp: FakeEntraID, session: requests.Session, secret: str = CANARY, scope: str = GRAPH_SCOPE
) -> dict:  # type: ignore[type-arg]
    app = msal.ConfidentialClientApplication(
        CLIENT,
        client_credential=secret,
        authority=idp.authority(TENANT),
        http_client=session,
        instance_discovery=False,
        validate_authority=False,
    )
    result: dict = app.acquire_token_for_client(scopes=[scope])  # type: ignore[type-arg]
    return result


def read(graph: FakeGraph, session: requests.Session, bearer: str, app_id: str = CLIENT) -> requests.Response:
    return session.get(
        f"{graph.base_url}/v1.0/applications(appId='{app_id}')",
        params={"$select": "id,passwordCredentials,keyCredentials"},
        headers={"Authorization": f"Bearer {bearer}"},
        timeout=10,
    )


def test_reads_the_application_with_graph_shapes(world, ca: CertificateAuthority) -> None:  # type: ignore[no-untyped-def]
    idp, graph, session = world
    idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.Read.All")
    end = dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    idp.set_secret_end(TENANT, CLIENT, CANARY, end)
    leaf = ca.issue("client.example")
    idp.add_certificate(TENANT, CLIENT, leaf.cert_pem)
    answer = read(graph, session, token(idp, session)["access_token"])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"@odata.context", "id", "passwordCredentials", "keyCredentials"}
    assert body["@odata.context"].endswith("#applications(id,passwordCredentials,keyCredentials)/$entity")
    (password,) = body["passwordCredentials"]
    assert password["hint"] == CANARY[:3]
    assert password["secretText"] is None
    assert password["endDateTime"] == "2031-01-02T03:04:05.0000000Z"
    assert dt.datetime.fromisoformat(password["endDateTime"]) == end
    (key,) = body["keyCredentials"]
    assert key["type"] == "AsymmetricX509Cert"
    sha1 = x509.load_pem_x509_certificate(leaf.cert_pem.encode()).fingerprint(hashes.SHA1())
    assert base64.b64decode(key["customKeyIdentifier"]) == sha1
    assert CANARY not in answer.text


def test_token_checks(world) -> None:  # type: ignore[no-untyped-def]
    idp, graph, session = world
    idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.Read.All")
    missing = read(graph, session, "")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "InvalidAuthenticationToken"
    exchange_token = token(idp, session, scope="https://outlook.office365.com/.default")["access_token"]
    wrong_audience = read(graph, session, exchange_token)
    assert wrong_audience.status_code == 401
    assert "Invalid audience" in wrong_audience.json()["error"]["message"]


def test_permissions_and_faults(world) -> None:  # type: ignore[no-untyped-def]
    idp, graph, session = world
    # No Graph role granted: Entra still issues a token (no roles), Graph refuses.
    bearer = token(idp, session)["access_token"]
    denied = read(graph, session, bearer)
    assert denied.status_code == 403
    error = denied.json()["error"]
    assert error["code"] == "Authorization_RequestDenied"
    assert set(error["innerError"]) == {"date", "request-id", "client-request-id"}
    # OwnedBy reads an application only when the caller owns it.
    idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.ReadWrite.OwnedBy")
    bearer = token(idp, session)["access_token"]
    assert read(graph, session, bearer).status_code == 403
    idp.add_owner(TENANT, CLIENT, CLIENT)
    assert read(graph, session, bearer).status_code == 200
    missing = read(graph, session, bearer, app_id="33333333-3333-4333-8333-333333333333")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "Request_ResourceNotFound"
    graph.throttle(retry_after=7, times=1)
    throttled = read(graph, session, bearer)
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "7"
    assert throttled.json()["error"]["code"] == "TooManyRequests"
    assert read(graph, session, bearer).status_code == 200
    graph.deny(times=1)
    assert read(graph, session, bearer).status_code == 403


def test_added_password_works_and_removed_one_stops(world) -> None:  # type: ignore[no-untyped-def]
    idp, graph, session = world
    idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.ReadWrite.OwnedBy")
    idp.add_owner(TENANT, CLIENT, CLIENT)
    bearer = token(idp, session)["access_token"]
    app = read(graph, session, bearer).json()
    added = session.post(
        f"{graph.base_url}/v1.0/applications/{app['id']}/addPassword",
        json={"passwordCredential": {"displayName": "renewed", "endDateTime": "2030-05-06T00:00:00Z"}},
        headers={"Authorization": f"Bearer {bearer}"},
        timeout=10,
    )
    assert added.status_code == 200, added.text
    credential = added.json()
    secret = credential["secretText"]
    assert secret in graph.returned_secrets
    assert credential["hint"] == secret[:3]
    assert len(secret) == 40
    assert credential["endDateTime"].startswith("2030-05-06T00:00:00")
    assert "access_token" in token(idp, session, secret, scope="https://outlook.office365.com/.default")
    listed = read(graph, session, bearer).json()["passwordCredentials"]
    assert {p["keyId"] for p in listed} >= {credential["keyId"]}
    assert all(p["secretText"] is None for p in listed)
    removed = session.post(
        f"{graph.base_url}/v1.0/applications/{app['id']}/removePassword",
        json={"keyId": credential["keyId"]},
        headers={"Authorization": f"Bearer {bearer}"},
        timeout=10,
    )
    assert removed.status_code == 204
    refused = token(idp, session, secret, scope="https://outlook.office365.com/.default")
    assert refused.get("error_codes") == [7000215]
    # Reading alone is not enough to write.
    idp.grant_api_roles(TENANT, CLIENT, GRAPH_RESOURCE, "Application.Read.All")
    idp.expire_tokens()
    reader = token(idp, session)["access_token"]
    refused_write = session.post(
        f"{graph.base_url}/v1.0/applications(appId='{CLIENT}')/addPassword",
        json={"passwordCredential": {}},
        headers={"Authorization": f"Bearer {reader}"},
        timeout=10,
    )
    assert refused_write.status_code == 403
