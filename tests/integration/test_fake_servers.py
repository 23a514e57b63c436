"""The local fake servers behave like the real services, as seen by the real clients.

Nothing is mocked: MSAL talks HTTPS to :class:`FakeEntraID`, aiosmtplib talks SMTP/STARTTLS to
:class:`FakeExchange`, and the misbehaving peers are real sockets. If these tests pass, a client
that works against the fakes is exercising the same replies it will get from Entra ID and
Exchange Online (protocol-facts.md).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiosmtplib
import msal
import pytest
import requests
from cryptography import x509

from smtp_oauth_operator.clients.smtp import hang_up
from smtp_oauth_operator.testing.devservers import DevServers
from smtp_oauth_operator.testing.idp import EXCHANGE_APP_ID, EXCHANGE_RESOURCE, FakeEntraID
from smtp_oauth_operator.testing.peers import (
    GarbageSmtpServer,
    HttpConnectProxy,
    SilentServer,
    closed_port,
)
from smtp_oauth_operator.testing.pki import CertificateAuthority, ServerCert
from smtp_oauth_operator.testing.smtpd import FakeExchange

TENANT = "3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
DOMAIN = "fabrikam.onmicrosoft.com"
CLIENT = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"
SECRET = "Fk8Q~s3cr3t-value.for_tests-only"
MAILBOX = "robot@fabrikam.com"
SCOPE = [f"{EXCHANGE_RESOURCE}/.default"]
GRAPH = "https://graph.microsoft.com"

AADSTS_DESCRIPTION = re.compile(
    r"^AADSTS(\d+): .+\r\nTrace ID: [0-9a-f-]{36}\r\nCorrelation ID: [0-9a-f-]{36}\r\n"
    r"Timestamp: \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$",
    re.DOTALL,
)
BANNER = re.compile(
    r"^\S+\.outlook\.office365\.com Microsoft ESMTP MAIL Service ready at "
    r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$"
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("fake-servers test CA")


@pytest.fixture(scope="module")
def cert(ca: CertificateAuthority) -> ServerCert:
    return ca.issue("127.0.0.1", "localhost")


@pytest.fixture
def idp(cert: ServerCert) -> Iterator[FakeEntraID]:
    with FakeEntraID(cert, resources=(EXCHANGE_RESOURCE, GRAPH)) as server:
        server.register_tenant(TENANT, DOMAIN)
        server.register_app(TENANT, CLIENT, SECRET)
        yield server


@pytest.fixture
def exchange(idp: FakeEntraID, cert: ServerCert) -> Iterator[FakeExchange]:
    with FakeExchange(idp, cert=cert) as server:
        yield server


class Http:
    """A requests.Session for MSAL that trusts our CA and records every response."""

    def __init__(self, ca_file: str | None, *, timeout: float = 10.0) -> None:
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise override verify
        self.session.verify = ca_file if ca_file is not None else True
        self.session.request = functools.partial(self.session.request, timeout=timeout)  # type: ignore[method-assign]
        self.responses: list[requests.Response] = []
        self.session.hooks["response"].append(self._record)

    def _record(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.responses.append(response)

    @property
    def last(self) -> requests.Response:
        return self.responses[-1]


@pytest.fixture
def http(cert: ServerCert) -> Iterator[Http]:
    client = Http(str(cert.ca_file))
    yield client
    client.session.close()


def make_app(
    idp: FakeEntraID,
    http: Http,
    *,
    tenant: str = TENANT,
    client_id: str = CLIENT,
    secret: str = SECRET,
) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=secret,
        authority=idp.authority(tenant),
        instance_discovery=False,
        http_client=http.session,
    )


def get_token(idp: FakeEntraID, http: Http, scopes: list[str] | None = None) -> str:
    result = make_app(idp, http).acquire_token_for_client(scopes or SCOPE)
    assert "access_token" in result, result
    return str(result["access_token"])


def assert_entra_error(result: dict[str, Any], error: str, code: int) -> None:
    assert result["error"] == error, result
    assert result["error_codes"] == [code]
    match = AADSTS_DESCRIPTION.match(result["error_description"])
    assert match, result["error_description"]
    assert int(match.group(1)) == code
    assert set(result) >= {"timestamp", "trace_id", "correlation_id", "error_uri"}
    assert result["error_uri"].endswith(f"/error?code={code}")


# --------------------------------------------------------------------------- pki


def test_pki_issues_ip_and_dns_sans_and_a_chain(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.issue("127.0.0.1", "mail.example.test", directory=tmp_path)
    leaf = x509.load_pem_x509_certificates(issued.cert_file.read_bytes())
    assert len(leaf) == 2  # leaf + CA
    san = leaf[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test"]
    assert issued.key_file.stat().st_mode & 0o077 == 0
    assert ca.write(tmp_path / "trust" / "ca.pem").read_text() == ca.cert_pem


# --------------------------------------------------------------------------- FakeEntraID


def test_discovery_document_as_msal_needs_it(idp: FakeEntraID, http: Http) -> None:
    doc = http.session.get(idp.discovery_url(DOMAIN)).json()
    # Asked by domain, the endpoints carry the tenant GUID, like Entra ID.
    assert doc["token_endpoint"] == f"{idp.authority_host}/{TENANT}/oauth2/v2.0/token"
    assert doc["token_endpoint"] == idp.token_endpoint(DOMAIN)
    assert doc["authorization_endpoint"].startswith(f"{idp.authority_host}/{TENANT}/")
    assert doc["issuer"] == f"{idp.authority_host}/{TENANT}/v2.0"
    assert idp.discovery_requests == 1


def test_msal_gets_an_exchange_token_and_caches_it(idp: FakeEntraID, http: Http) -> None:
    app = make_app(idp, http, tenant=DOMAIN)
    first = app.acquire_token_for_client(SCOPE)
    assert first["token_type"] == "Bearer"
    assert first["token_source"] == "identity_provider"
    assert first["expires_in"] == 3599
    token = first["access_token"]
    assert 1500 <= len(token) <= 2100
    assert token.count(".") == 2
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["typ"] == "JWT"
    info = idp.validate(token)
    assert info is not None
    assert (info.tenant_id, info.client_id, info.audience) == (TENANT, CLIENT, EXCHANGE_RESOURCE)
    assert "SMTP.SendAsApp" in info.roles
    assert idp.issued_tokens == [token]

    second = app.acquire_token_for_client(SCOPE)
    assert second["token_source"] == "cache"
    assert idp.token_requests == 1
    assert idp.token_requests_for(CLIENT) == 1
    assert idp.discovery_requests == 1
    sent = http.responses[-1].request
    assert sent.headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_exchange_app_id_scope_is_the_same_resource(idp: FakeEntraID, http: Http) -> None:
    token = get_token(idp, http, [f"{EXCHANGE_APP_ID}/.default"])
    info = idp.validate(token)
    assert info is not None
    assert info.audience == EXCHANGE_RESOURCE


def test_unknown_tenant_fails_discovery_with_90002(idp: FakeEntraID, http: Http) -> None:
    unknown = "0badc0de-0000-4000-8000-000000000000"
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        make_app(idp, http, tenant=unknown)
    response = http.last
    assert response.status_code == 400
    assert_entra_error(response.json(), "invalid_tenant", 90002)
    response = http.session.get(idp.discovery_url("nobody.onmicrosoft.com"))
    assert_entra_error(response.json(), "invalid_tenant", 90002)


def test_malformed_tenant_fails_with_900023(idp: FakeEntraID, http: Http) -> None:
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        make_app(idp, http, tenant="not_a_tenant")
    assert http.last.status_code == 400
    assert_entra_error(http.last.json(), "invalid_request", 900023)


@pytest.mark.parametrize(
    ("setup", "client_id", "secret", "scopes", "status", "error", "code"),
    [
        pytest.param(None, "00000000-0000-4000-8000-00000000dead", SECRET, SCOPE, 400,
                     "unauthorized_client", 700016, id="unknown-client"),
        pytest.param(None, CLIENT, "wrong", SCOPE, 401, "invalid_client", 7000215, id="wrong-secret"),
        pytest.param("expire", CLIENT, SECRET, SCOPE, 401, "invalid_client", 7000222, id="expired-secret"),
        pytest.param(None, CLIENT, SECRET, [f"{EXCHANGE_RESOURCE}/SMTP.Send"], 400, "invalid_scope",
                     1002012, id="scope-without-default"),
        pytest.param(None, CLIENT, SECRET, ["https://ps.outlook.com/.default"], 400, "invalid_resource",
                     500011, id="resource-not-in-tenant"),
        pytest.param("no-exchange", CLIENT, SECRET, SCOPE, 400, "invalid_resource", 500011,
                     id="exchange-not-provisioned"),
        pytest.param(None, CLIENT, SECRET, [*SCOPE, f"{GRAPH}/.default"], 400, "invalid_scope", 700022,
                     id="two-resources"),
    ],
)  # fmt: skip
def test_token_errors_have_entra_codes(
    idp: FakeEntraID,
    http: Http,
    setup: str | None,
    client_id: str,
    secret: str,
    scopes: list[str],
    status: int,
    error: str,
    code: int,
) -> None:
    if setup == "expire":
        idp.expire_secret(TENANT, CLIENT)
    elif setup == "no-exchange":
        idp.register_tenant(TENANT, DOMAIN, resources=())
        idp.register_app(TENANT, CLIENT, SECRET)
    result = make_app(idp, http, client_id=client_id, secret=secret).acquire_token_for_client(scopes)
    assert_entra_error(result, error, code)
    assert http.last.status_code == status
    # Entra echoes the client-request-id MSAL sent as the correlation ID.
    assert result["correlation_id"] == http.last.request.headers["client-request-id"]
    assert idp.issued_tokens == []


def test_multi_tenant_alias_cannot_do_client_credentials(idp: FakeEntraID, http: Http) -> None:
    response = http.session.post(
        f"{idp.authority_host}/common/oauth2/v2.0/token",
        data={"client_id": CLIENT, "client_secret": SECRET, "grant_type": "client_credentials",
              "scope": SCOPE[0]},
    )  # fmt: skip
    assert response.status_code == 400
    assert_entra_error(response.json(), "invalid_request", 50059)


def test_secret_rotation(idp: FakeEntraID, http: Http) -> None:
    idp.set_secret(TENANT, CLIENT, "new-secret")
    old = make_app(idp, http).acquire_token_for_client(SCOPE)
    assert old["error_codes"] == [7000215]
    assert "access_token" in make_app(idp, http, secret="new-secret").acquire_token_for_client(SCOPE)
    idp.add_secret(TENANT, CLIENT, "third-secret")
    assert "access_token" in make_app(idp, http, secret="third-secret").acquire_token_for_client(SCOPE)


def test_throttling_plain_body_with_retry_after(idp: FakeEntraID, http: Http) -> None:
    idp.throttle(retry_after=60)
    app = make_app(idp, http)
    with pytest.raises(json.JSONDecodeError):  # MSAL cannot parse Entra's plain-text 429
        app.acquire_token_for_client(SCOPE)
    response = http.last
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "60"
    assert response.text == "Too Many Requests"
    # MSAL honours Retry-After: the same request is answered from its throttle cache.
    with pytest.raises(json.JSONDecodeError):
        app.acquire_token_for_client(SCOPE)
    assert idp.token_requests == 1


def test_throttling_json_body(idp: FakeEntraID, http: Http) -> None:
    idp.throttle(retry_after=30, json_body=True)
    result = make_app(idp, http).acquire_token_for_client(SCOPE)
    assert http.last.status_code == 429
    assert http.last.headers["Retry-After"] == "30"
    assert_entra_error(result, "temporarily_unavailable", 90055)


def test_server_error_once_then_success(idp: FakeEntraID, http: Http) -> None:
    idp.fail(status=503, times=1)
    with pytest.raises(msal.exceptions.MsalServiceError, match="503"):
        make_app(idp, http).acquire_token_for_client(SCOPE)
    assert http.last.status_code == 503
    assert "access_token" in make_app(idp, http).acquire_token_for_client(SCOPE)
    assert idp.token_requests == 2


def test_faults_are_scoped_to_a_tenant(idp: FakeEntraID, http: Http) -> None:
    other = "7e57e57e-0000-4000-8000-000000000001"
    idp.register_tenant(other, "other.onmicrosoft.com")
    idp.register_app(other, CLIENT, SECRET)
    idp.fail(status=500, tenant=DOMAIN)  # matched by domain or GUID alike
    with pytest.raises(msal.exceptions.MsalServiceError):
        make_app(idp, http).acquire_token_for_client(SCOPE)
    assert "access_token" in make_app(idp, http, tenant=other).acquire_token_for_client(SCOPE)
    idp.clear_faults()
    assert "access_token" in make_app(idp, http).acquire_token_for_client(SCOPE)


def test_discovery_fault(idp: FakeEntraID, http: Http) -> None:
    idp.fail(status=500, endpoint="discovery")
    with pytest.raises(msal.exceptions.MsalServiceError):
        make_app(idp, http)
    assert idp.discovery_requests == 1


def test_hang_makes_the_client_time_out(idp: FakeEntraID, cert: ServerCert) -> None:
    impatient = Http(str(cert.ca_file), timeout=0.5)
    try:
        app = make_app(idp, impatient)
        idp.hang()
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ReadTimeout):
            app.acquire_token_for_client(SCOPE)
        assert time.monotonic() - started < 5
        assert idp.hung_requests >= 1
    finally:
        impatient.session.close()


def test_stop_releases_a_hung_request(cert: ServerCert) -> None:
    server = FakeEntraID(cert).start()
    server.register_tenant(TENANT)
    server.hang(endpoint="any")
    with requests.Session() as session:
        session.trust_env = False
        session.verify = str(cert.ca_file)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(session.get, server.discovery_url(TENANT), timeout=30)
            deadline = time.monotonic() + 5
            while server.hung_requests == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.monotonic()
            server.stop()
            assert time.monotonic() - started < 2
            with pytest.raises(requests.exceptions.ConnectionError):
                pending.result(timeout=5)


def test_untrusted_certificate_is_rejected(idp: FakeEntraID) -> None:
    stranger = CertificateAuthority.create("untrusted CA")
    client = Http(str(stranger.cert_file))
    try:
        with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
            make_app(idp, client)
    finally:
        client.session.close()


def test_expired_tokens_stop_validating(idp: FakeEntraID, http: Http) -> None:
    token = get_token(idp, http)
    assert idp.validate(token) is not None
    idp.expire_tokens()
    assert idp.validate(token) is None
    info = idp.lookup(token)
    assert info is not None
    assert info.expired
    assert idp.validate("not-a-token") is None


def test_token_endpoint_through_connect_proxy(idp: FakeEntraID, http: Http) -> None:
    with HttpConnectProxy() as proxy:
        http.session.proxies = {"https": proxy.url}
        assert "access_token" in make_app(idp, http).acquire_token_for_client(SCOPE)
        assert proxy.tunnels >= 1
        assert proxy.targets[0] == f"127.0.0.1:{idp.port}"


def test_proxy_authentication_and_refusal(idp: FakeEntraID, http: Http) -> None:
    with HttpConnectProxy(credentials=("proxyuser", "proxypass")) as proxy:
        http.session.proxies = {"https": proxy.url}
        with pytest.raises(requests.exceptions.ProxyError, match="407"):
            http.session.get(idp.discovery_url(TENANT))
        http.session.proxies = {"https": proxy.url_with_credentials}
        assert http.session.get(idp.discovery_url(TENANT)).status_code == 200
    with HttpConnectProxy(reject_status=403) as proxy:
        http.session.proxies = {"https": proxy.url}
        with pytest.raises(requests.exceptions.ProxyError, match="403"):
            http.session.get(idp.discovery_url(TENANT))
        assert proxy.tunnels == 0
        assert proxy.targets == [f"127.0.0.1:{idp.port}"]


# --------------------------------------------------------------------------- FakeExchange


@contextlib.asynccontextmanager
async def connected(client: aiosmtplib.SMTP) -> AsyncIterator[aiosmtplib.SMTP]:
    """Connected, then hung up as the operator does (clients/smtp.hang_up). aiosmtplib's own ``async with``
    closes a TLS transport with close(), whose TLS shutdown can outlive the test's event loop and leave the
    socket to a ResourceWarning in some later test (seen in CI)."""
    await client.connect()
    try:
        yield client
    finally:
        await hang_up(client)


def smtp_client(server: FakeExchange, ca: CertificateAuthority, **kwargs: Any) -> aiosmtplib.SMTP:
    options: dict[str, Any] = {"start_tls": True, "tls_context": ca.client_context(), "timeout": 5}
    options.update(kwargs)
    return aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, **options)


def message(sender: str, to: str = "ops@example.net") -> str:
    return f"From: {sender}\r\nTo: {to}\r\nSubject: connection test\r\n\r\nHello.\r\n"


async def test_session_looks_like_exchange_online(exchange: FakeExchange, ca: CertificateAuthority) -> None:
    client = smtp_client(exchange, ca, start_tls=False)
    greeting = await client.connect()
    try:
        assert greeting.code == 220
        assert BANNER.match(greeting.message), greeting.message
        await client.ehlo()
        assert client.supports_extension("starttls")
        assert not client.supports_extension("auth")
        assert client.supports_extension("size")
        assert client.esmtp_extensions["size"] == "157286400"
        reply = await client.starttls(tls_context=ca.client_context())
        assert (reply.code, reply.message) == (220, "2.0.0 SMTP server ready")
        await client.ehlo()
        assert not client.supports_extension("starttls")
        assert client.esmtp_extensions["auth"] == "LOGIN XOAUTH2"
        assert client.server_auth_methods == ["login", "xoauth2"]
    finally:
        await hang_up(client)


async def test_xoauth2_success_with_a_real_sized_token(
    idp: FakeEntraID, http: Http, exchange: FakeExchange, ca: CertificateAuthority
) -> None:
    token = get_token(idp, http)
    assert len(base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {token}\x01\x01".encode())) > 2000
    exchange.grant(MAILBOX, CLIENT)
    async with connected(smtp_client(exchange, ca)) as client:
        reply = await client.auth_xoauth2(MAILBOX, token)
        assert (reply.code, reply.message) == (235, "2.7.0 Authentication successful")
        errors, final = await client.sendmail(MAILBOX, ["ops@example.net"], message(MAILBOX))
        assert errors == {}
        assert final.startswith("2.6.0 <")
        assert final.endswith("Queued mail for delivery")
    received = exchange.wait_for_messages(1)
    assert received[0].mail_from == MAILBOX
    assert received[0].rcpt_tos == ("ops@example.net",)
    assert received[0].message["Subject"] == "connection test"
    assert received[0].authenticated_as == MAILBOX
    assert received[0].client_id == CLIENT
    attempts = exchange.auth_attempts
    assert [(a.mechanism, a.user, a.code, a.client_id, a.tls) for a in attempts] == [
        ("XOAUTH2", MAILBOX, 235, CLIENT, True)
    ]
    assert token not in repr(attempts)
    assert token not in repr(received)


async def test_two_step_xoauth2_form(
    idp: FakeEntraID, http: Http, exchange: FakeExchange, ca: CertificateAuthority
) -> None:
    token = get_token(idp, http)
    exchange.grant(MAILBOX, CLIENT)
    blob = base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {token}\x01\x01".encode())
    async with connected(smtp_client(exchange, ca)) as client:
        await client.ehlo()
        reply = await client.execute_command(b"AUTH", b"XOAUTH2")
        assert (reply.code, reply.message) == (334, "")
        reply = await client.execute_command(blob)
        assert reply.code == 235


async def test_no_mailbox_permission_is_a_direct_535_5_7_3(
    idp: FakeEntraID, http: Http, exchange: FakeExchange, ca: CertificateAuthority
) -> None:
    token = get_token(idp, http)
    blob = base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {token}\x01\x01".encode())
    async with connected(smtp_client(exchange, ca)) as client:
        await client.ehlo()
        reply = await client.execute_command(b"AUTH", b"XOAUTH2", blob)
        assert reply.code == 535  # no 334 challenge first, unlike Gmail
        assert re.match(r"^5\.7\.3 Authentication unsuccessful \[\S+\.PROD\.OUTLOOK\.COM \S+Z \w+\]$",
                        reply.message), reply.message  # fmt: skip
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
            await client.auth_xoauth2(MAILBOX, token)
        assert failure.value.code == 535


@pytest.mark.parametrize("problem", ["expired", "graph-audience", "no-role", "unknown-token", "garbage"])
async def test_rejected_tokens_get_535_5_7_3(
    idp: FakeEntraID,
    http: Http,
    exchange: FakeExchange,
    ca: CertificateAuthority,
    problem: str,
) -> None:
    exchange.grant(MAILBOX, CLIENT)
    if problem == "graph-audience":
        token = get_token(idp, http, [f"{GRAPH}/.default"])
    elif problem == "no-role":
        idp.register_app(TENANT, CLIENT, SECRET, roles=())
        token = get_token(idp, http)
    elif problem == "unknown-token":
        token = "eyJ0eXAiOiJKV1QifQ.e30." + "x" * 1500
    else:
        token = get_token(idp, http)
        idp.expire_tokens()
    async with connected(smtp_client(exchange, ca)) as client:
        await client.ehlo()
        if problem == "garbage":
            reply = await client.execute_command(b"AUTH", b"XOAUTH2", base64.b64encode(b"hello"))
            assert reply.code == 535
        else:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
                await client.auth_xoauth2(MAILBOX, token)
            assert failure.value.code == 535
            assert failure.value.message.startswith("5.7.3 Authentication unsuccessful [")


async def test_google_style_challenge(
    idp: FakeEntraID, http: Http, cert: ServerCert, ca: CertificateAuthority
) -> None:
    token = get_token(idp, http)
    with FakeExchange(idp, cert=cert, challenge_style="google") as server:
        blob = base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {token}\x01\x01".encode())
        async with connected(smtp_client(server, ca)) as client:
            await client.ehlo()
            reply = await client.execute_command(b"AUTH", b"XOAUTH2", blob)
            assert reply.code == 334
            assert json.loads(base64.b64decode(reply.message)) == {
                "status": "401",
                "schemes": "bearer",
                "scope": "https://mail.google.com/",
            }
            reply = await client.execute_command(b"")
            assert reply.code == 535
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
                await client.auth_xoauth2(MAILBOX, token)  # aiosmtplib answers the 334 itself
            assert failure.value.code == 535


@pytest.mark.parametrize(
    ("scope", "text"),
    [
        ("tenant", "SmtpClientAuthentication is disabled for the Tenant. "
                   "Visit https://aka.ms/smtp_auth_disabled for more information."),
        ("mailbox", "SmtpClientAuthentication is disabled for the Mailbox. "
                    "Visit https://aka.ms/smtp_auth_disabled for more information."),
        ("policy", "the request did not meet the criteria to be authenticated successfully. "
                   "Contact your administrator."),
    ],
)  # fmt: skip
async def test_smtp_auth_disabled_replies_5_7_139(
    idp: FakeEntraID,
    http: Http,
    cert: ServerCert,
    ca: CertificateAuthority,
    scope: Any,
    text: str,
) -> None:
    token = get_token(idp, http)
    with FakeExchange(idp, cert=cert, auth_disabled=scope) as server:
        server.grant(MAILBOX, CLIENT)
        async with connected(smtp_client(server, ca)) as client:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
                await client.auth_xoauth2(MAILBOX, token)
    assert failure.value.code == 535
    assert failure.value.message.startswith(f"5.7.139 Authentication unsuccessful, {text} [")


async def test_mailbox_setting_overrides_the_tenant(
    idp: FakeEntraID, http: Http, exchange: FakeExchange, ca: CertificateAuthority
) -> None:
    token = get_token(idp, http)
    exchange.grant(MAILBOX, CLIENT)
    exchange.set_mailbox_smtp_auth(MAILBOX, disabled=True)
    async with connected(smtp_client(exchange, ca)) as client:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError, match="disabled for the Mailbox"):
            await client.auth_xoauth2(MAILBOX, token)
    exchange.auth_disabled = "tenant"
    exchange.set_mailbox_smtp_auth(MAILBOX, disabled=False)
    async with connected(smtp_client(exchange, ca)) as client:
        assert (await client.auth_xoauth2(MAILBOX, token)).code == 235


async def test_mail_without_auth_is_530_5_7_57(exchange: FakeExchange, ca: CertificateAuthority) -> None:
    async with connected(smtp_client(exchange, ca)) as client:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as failure:
            await client.sendmail(MAILBOX, ["ops@example.net"], message(MAILBOX))
    assert failure.value.code == 530
    assert failure.value.message == "5.7.57 Client not authenticated to send mail."


async def test_sending_as_someone_else_is_554_send_as_denied(
    idp: FakeEntraID, http: Http, exchange: FakeExchange, ca: CertificateAuthority
) -> None:
    token = get_token(idp, http)
    exchange.grant(MAILBOX, CLIENT)
    other = "ceo@fabrikam.com"
    async with connected(smtp_client(exchange, ca)) as client:
        await client.auth_xoauth2(MAILBOX, token)
        with pytest.raises(aiosmtplib.SMTPDataError) as failure:
            await client.sendmail(other, ["ops@example.net"], message(other))
        assert failure.value.code == 554
        assert failure.value.message.startswith(
            f"5.2.252 SendAsDenied; {MAILBOX} not allowed to send as {other}; "
            "STOREDRV.Submission.Exception:SendAsDeniedException"
        )
        # The envelope is right but the From header is not: Exchange checks it too.
        with pytest.raises(aiosmtplib.SMTPDataError):
            await client.sendmail(MAILBOX, ["ops@example.net"], message(other))
        exchange.grant_send_as(MAILBOX, other)
        await client.sendmail(other, ["ops@example.net"], message(other))
    assert len(exchange.messages) == 1


async def test_basic_auth_is_refused(exchange: FakeExchange, ca: CertificateAuthority) -> None:
    async with connected(smtp_client(exchange, ca)) as client:
        await client.ehlo()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
            await client.auth_login(MAILBOX, "password")
        assert failure.value.code == 550
        assert failure.value.message == "5.7.30 Basic authentication is not supported for Client Submission."
        reply = await client.execute_command(b"AUTH", b"PLAIN", base64.b64encode(b"\0a\0b"))
        assert reply.code == 504


async def test_auth_before_starttls_is_refused(exchange: FakeExchange, ca: CertificateAuthority) -> None:
    async with connected(smtp_client(exchange, ca, start_tls=False)) as client:
        await client.ehlo()
        reply = await client.execute_command(b"AUTH", b"XOAUTH2", base64.b64encode(b"x"))
        assert reply.code == 538


async def test_implicit_tls_mode(
    idp: FakeEntraID, http: Http, cert: ServerCert, ca: CertificateAuthority
) -> None:
    token = get_token(idp, http)
    with FakeExchange(idp, cert=cert, implicit_tls=True) as server:
        server.grant(MAILBOX, CLIENT)
        async with connected(smtp_client(server, ca, start_tls=False, use_tls=True)) as client:
            await client.ehlo()
            assert not client.supports_extension("starttls")
            assert client.supports_extension("auth")
            assert (await client.auth_xoauth2(MAILBOX, token)).code == 235


async def test_plaintext_only_server(idp: FakeEntraID, ca: CertificateAuthority) -> None:
    with FakeExchange(idp, offer_starttls=False) as server:
        client = smtp_client(server, ca)
        with pytest.raises(aiosmtplib.SMTPException, match="STARTTLS"):
            await client.connect()
        await hang_up(client)
    with FakeExchange(idp, offer_starttls=False, allow_plaintext_auth=True) as server:
        async with connected(smtp_client(server, ca, start_tls=False)) as client:
            await client.ehlo()
            assert not client.supports_extension("starttls")
            assert client.server_auth_methods == ["login", "xoauth2"]


async def test_without_xoauth2(
    idp: FakeEntraID, http: Http, cert: ServerCert, ca: CertificateAuthority
) -> None:
    token = get_token(idp, http)
    with FakeExchange(idp, cert=cert, offer_xoauth2=False) as server:
        async with connected(smtp_client(server, ca)) as client:
            await client.ehlo()
            assert client.server_auth_methods == ["login"]
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
                await client.auth_xoauth2(MAILBOX, token)
            assert failure.value.code == 504


async def test_untrusted_certificate_on_starttls(exchange: FakeExchange) -> None:
    stranger = CertificateAuthority.create("untrusted CA")
    client = smtp_client(exchange, stranger)
    with pytest.raises(ssl.SSLCertVerificationError):
        await client.connect()
    await hang_up(client)
    assert exchange.connections == 1


async def test_smtp_through_connect_proxy(
    idp: FakeEntraID, http: Http, exchange: FakeExchange, ca: CertificateAuthority
) -> None:
    token = get_token(idp, http)
    exchange.grant(MAILBOX, CLIENT)
    with HttpConnectProxy() as proxy:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        sock.sendall(f"CONNECT 127.0.0.1:{exchange.port} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200 ")
        sock.setblocking(False)
        # aiosmtplib owns the tunnelled socket from here on and closes it on QUIT.
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", sock=sock, start_tls=True, tls_context=ca.client_context(), timeout=5
        )
        async with connected(client):
            assert (await client.auth_xoauth2(MAILBOX, token)).code == 235
        assert proxy.tunnels == 1
        assert proxy.targets == [f"127.0.0.1:{exchange.port}"]


async def test_starts_fast_and_stops_clean(
    idp: FakeEntraID, cert: ServerCert, ca: CertificateAuthority
) -> None:
    started = time.monotonic()
    server = FakeExchange(idp, cert=cert).start()
    assert time.monotonic() - started < 1
    client = smtp_client(server, ca, start_tls=False)
    await client.connect()
    server.stop()  # with a client still connected
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.ehlo()
    await hang_up(client)


# --------------------------------------------------------------------------- misbehaving peers


async def test_silent_server_times_out_smtp_and_https() -> None:
    with SilentServer() as silent:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=silent.port, timeout=0.3)
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            await client.connect()
        await hang_up(client)
        with requests.Session() as session:
            session.trust_env = False
            with pytest.raises(requests.exceptions.ReadTimeout):
                session.get(f"https://127.0.0.1:{silent.port}/", timeout=0.3)
        assert silent.connections == 2
        assert silent.bytes_received > 0  # the TLS ClientHello, never answered


def test_peers_stop_themselves_after_their_lifetime() -> None:
    silent = SilentServer(lifetime=0.2).start()
    port = silent.port
    time.sleep(0.5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    silent.stop()


async def test_garbage_after_a_proper_greeting() -> None:
    with GarbageSmtpServer() as garbage:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=garbage.port, timeout=2, start_tls=False)
        greeting = await client.connect()
        assert greeting.code == 220
        with pytest.raises(aiosmtplib.SMTPException):
            await client.ehlo()
        await hang_up(client)
        assert garbage.received[0].startswith(b"EHLO ")


async def test_garbage_greeting() -> None:
    with GarbageSmtpServer(greet_with_garbage=True) as garbage:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=garbage.port, timeout=2)
        with pytest.raises(aiosmtplib.SMTPException):
            await client.connect()
        await hang_up(client)


async def test_scripted_replies() -> None:
    script = [b"250-fake.example.test\r\n250 SIZE 10\r\n", "421 4.3.2 Service not available"]
    with GarbageSmtpServer(script, greeting="220 fake.example.test ESMTP") as garbage:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=garbage.port, timeout=2, start_tls=False)
        await client.connect()
        await client.ehlo()
        assert client.esmtp_extensions["size"] == "10"
        with pytest.raises(aiosmtplib.SMTPResponseException) as failure:
            await client.noop()
        assert failure.value.code == 421
        await hang_up(client)


async def test_closed_port_refuses() -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=closed_port(), timeout=2)
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await client.connect()
    await hang_up(client)


# --------------------------------------------------------------------------- dev servers


async def test_devservers_end_to_end_without_writing_the_secret(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    with DevServers(tmp_path / "state", client_secret=SECRET, mailboxes=[MAILBOX]) as dev:
        endpoints = json.loads(dev.endpoints_file.read_text())
        assert set(endpoints) >= {"authorityHost", "tokenEndpoint", "smtpHost", "smtpPort", "caFile",
                                  "tenantId", "clientId", "mailbox"}  # fmt: skip
        assert endpoints["mailbox"] == MAILBOX
        assert Path(endpoints["caFile"]).read_text() == (tmp_path / "state" / "ca.pem").read_text()
        http = Http(endpoints["caFile"])
        try:
            app = msal.ConfidentialClientApplication(
                endpoints["clientId"],
                client_credential=SECRET,
                authority=f"{endpoints['authorityHost']}/{endpoints['tenantId']}",
                instance_discovery=False,
                http_client=http.session,
            )
            result = app.acquire_token_for_client(SCOPE)
        finally:
            http.session.close()
        tls = ssl.create_default_context(cafile=endpoints["caFile"])
        async with aiosmtplib.SMTP(
            hostname=endpoints["smtpHost"], port=endpoints["smtpPort"], start_tls=True, tls_context=tls
        ) as client:
            await client.auth_xoauth2(endpoints["mailbox"], result["access_token"])
            await client.sendmail(MAILBOX, ["ops@example.net"], message(MAILBOX))
        assert len(dev.exchange.messages) == 1
        assert SECRET not in dev.summary()
    for path in (tmp_path / "state").rglob("*"):
        assert SECRET.encode() not in path.read_bytes()


def test_serve_command(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "SMTP_OAUTH_DEV_CLIENT_SECRET": SECRET}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2] / "operator" / "src"),
                                         env.get("PYTHONPATH", "")])  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "smtp_oauth_operator.testing", "serve", "--state-dir", str(state),
         "--mailbox", MAILBOX],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (state / "endpoints.json").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        endpoints = json.loads((state / "endpoints.json").read_text())
        with socket.create_connection((endpoints["smtpHost"], endpoints["smtpPort"]), timeout=5) as probe:
            assert probe.recv(4) == b"220 "
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert out.count("\n") == 1
    assert str(endpoints["smtpPort"]) in out
    assert SECRET not in out + err
    for path in state.rglob("*"):
        assert SECRET.encode() not in path.read_bytes()
