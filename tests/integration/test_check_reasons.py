"""Every failure reason of the contract, produced for real by ``smtp-oauth-operator check``.

Each case sets up the local peers the way the failure happens in production (a wrong secret, a
throttling identity provider, a server without STARTTLS, a proxy, a certificate nobody trusts…),
runs the CLI in-process and checks the exit code, the Ready reason, the failing step's condition and
that the leak canary (the client secret) and every issued token are absent from all output.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from tests.integration.conftest import CANARY, CLIENT, MAILBOX, TENANT, Peers

from smtp_oauth_operator import cli
from smtp_oauth_operator.testing.peers import GarbageSmtpServer, HttpConnectProxy, SilentServer, closed_port
from smtp_oauth_operator.testing.smtpd import FakeExchange


def run_check(
    peers: Peers, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, path: Any
) -> tuple[int, dict[str, Any]]:
    caplog.set_level(logging.DEBUG)
    code = cli.main(["check", "-f", str(path), "-o", "json"])
    out, err = capsys.readouterr()
    # The fake servers share this process; only what the client side logs is the operator's output.
    ours = [r for r in caplog.records if not r.name.startswith(("mail.log", "smtp_oauth_operator.testing"))]
    everything = out + err + "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in ours)
    assert CANARY not in everything
    for token in peers.idp.issued_tokens:
        assert token not in everything
    for form in PROXY_CANARIES:
        assert form not in everything, form
    results = json.loads(out)
    assert len(results) == 1
    return code, results[0]


# Proxy credentials are a secret too: the password, the user-info and the Proxy-Authorization value.
PROXY_USER = "proxy-user"
PROXY_PASSWORD = "PROXY~canary.pa55-0123456789"
PROXY_BASIC = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
PROXY_CANARIES = (PROXY_PASSWORD, f"{PROXY_USER}:{PROXY_PASSWORD}", PROXY_BASIC)


def _authenticating_proxy(**options: Any) -> HttpConnectProxy:
    return HttpConnectProxy(credentials=(PROXY_USER, PROXY_PASSWORD), **options)


def _with_credentials(proxy: HttpConnectProxy, password: str = PROXY_PASSWORD) -> str:
    return f"http://{PROXY_USER}:{quote(password, safe='')}@127.0.0.1:{proxy.port}"


def conditions(result: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in result["conditions"]}


Setup = Callable[[Peers], Any]


def _spec(**overrides: Any) -> Setup:
    return lambda p: p.manifests(p.spec(**overrides))


def _idp(action: Callable[[Peers], None], **overrides: Any) -> Setup:
    def setup(p: Peers) -> Any:
        action(p)
        return p.manifests(p.spec(**overrides))

    return setup


def _smtp_server(server: Callable[[Peers], Any], **overrides: Any) -> Setup:
    """Point spec.smtp at another server; it is stopped by the test's cleanup list."""

    def setup(p: Peers) -> Any:
        srv = server(p)
        srv.start()
        p.servers.append(srv)
        port = srv.port
        return p.manifests(p.spec(**{"smtp.port": port, **overrides}))

    return setup


CASES: list[tuple[str, Setup, str, str]] = [
    ("secret-missing", lambda p: p.manifests(secret=False), "SecretNotFound", "SecretResolved"),
    (
        "secret-key-missing",
        _spec(**{"identity.clientSecret": {"secretKeyRef": {"name": "exo-app", "key": "nope"}}}),
        "SecretKeyNotFound",
        "SecretResolved",
    ),
    (
        "ca-bundle-missing",
        _spec(**{"smtp.caBundle": {"configMapKeyRef": {"name": "trust", "key": "missing.pem"}}}),
        "CaBundleNotFound",
        "SecretResolved",
    ),
    (
        "ca-bundle-not-pem",
        _spec(**{"smtp.caBundle": {"secretKeyRef": {"name": "exo-app", "key": "client-secret"}}}),
        "CaBundleNotFound",
        "SecretResolved",
    ),
    ("invalid-spec", _spec(**{"identity.clientId": "not-a-guid"}), "InvalidSpec", "SecretResolved"),
    (
        "tenant-unknown",
        _spec(**{"identity.tenantId": "33333333-3333-4333-8333-333333333333"}),
        "TenantNotFound",
        "TokenAcquired",
    ),
    (
        "application-unknown",
        _spec(**{"identity.clientId": "44444444-4444-4444-8444-444444444444"}),
        "ApplicationNotFound",
        "TokenAcquired",
    ),
    (
        "client-secret-wrong",
        lambda p: (setattr(p, "secret", "the-secret-ID-not-its-value"), p.manifests())[1],
        "InvalidClientSecret",
        "TokenAcquired",
    ),
    (
        "client-secret-expired",
        _idp(lambda p: p.idp.set_secret(TENANT, CLIENT, CANARY, expired=True)),
        "ClientSecretExpired",
        "TokenAcquired",
    ),
    (
        "exchange-not-in-tenant",
        _idp(
            lambda p: (
                p.idp.register_tenant(TENANT, "contoso.onmicrosoft.com", resources=())
                or p.idp.register_app(TENANT, CLIENT, CANARY)
            )
        ),
        "InvalidScope",
        "TokenAcquired",
    ),
    ("throttled", _idp(lambda p: p.idp.throttle(retry_after=60)), "Throttled", "TokenAcquired"),
    (
        "throttled-json",
        _idp(lambda p: p.idp.throttle(retry_after=30, json_body=True)),
        "Throttled",
        "TokenAcquired",
    ),
    ("idp-5xx", _idp(lambda p: p.idp.fail(status=503)), "IdentityProviderUnavailable", "TokenAcquired"),
    (
        "idp-discovery-5xx",
        _idp(lambda p: p.idp.fail(status=500, endpoint="discovery")),
        "IdentityProviderUnavailable",
        "TokenAcquired",
    ),
    (
        "idp-refused",
        lambda p: p.manifests(p.spec(**{"identity.authorityHost": f"https://127.0.0.1:{closed_port()}"})),
        "IdentityProviderUnreachable",
        "TokenAcquired",
    ),
    (
        "idp-timeout",
        _idp(lambda p: p.idp.hang(), **{"identity.timeoutSeconds": 1}),
        "IdentityProviderUnreachable",
        "TokenAcquired",
    ),
    (
        "idp-untrusted-certificate",
        _spec(**{"identity.caBundle": None}),
        "TLSVerificationFailed",
        "TokenAcquired",
    ),
    (
        "smtp-untrusted-certificate",
        _spec(**{"smtp.caBundle": None}),
        "TLSVerificationFailed",
        "SmtpAuthenticated",
    ),
    (
        "smtp-silent",
        _smtp_server(lambda p: SilentServer(), **{"smtp.connectionTimeoutSeconds": 1}),
        "SmtpConnectionTimeout",
        "SmtpAuthenticated",
    ),
    (
        "smtp-refused",
        lambda p: p.manifests(p.spec(**{"smtp.port": closed_port()})),
        "SmtpConnectionRefused",
        "SmtpAuthenticated",
    ),
    (
        "smtp-host-unknown",
        _spec(**{"smtp.host": "smtp.invalid"}),
        "SmtpConnectionRefused",
        "SmtpAuthenticated",
    ),
    (
        "no-starttls",
        # A downgrade: no STARTTLS, but AUTH XOAUTH2 offered in plaintext (what a STARTTLS-stripping
        # man in the middle shows). test_no_starttls_sends_no_auth proves nothing was sent.
        _smtp_server(
            lambda p: _granted(FakeExchange(p.idp, offer_starttls=False, allow_plaintext_auth=True))
        ),
        "StartTLSNotOffered",
        "SmtpAuthenticated",
    ),
    (
        "no-xoauth2",
        _smtp_server(lambda p: FakeExchange(p.idp, cert=p.cert, offer_xoauth2=False)),
        "XOAuth2NotOffered",
        "SmtpAuthenticated",
    ),
    (
        "mailbox-permission-missing",
        _idp(lambda p: p.smtp.revoke(MAILBOX, CLIENT)),
        "AuthenticationRejected",
        "SmtpAuthenticated",
    ),
    (
        "smtp-auth-disabled-tenant",
        _smtp_server(lambda p: _granted(FakeExchange(p.idp, cert=p.cert, auth_disabled="tenant"))),
        "SmtpAuthDisabled",
        "SmtpAuthenticated",
    ),
    (
        "smtp-auth-disabled-mailbox",
        _idp(lambda p: p.smtp.set_mailbox_smtp_auth(MAILBOX, disabled=True)),
        "SmtpAuthDisabled",
        "SmtpAuthenticated",
    ),
    (
        "send-as-denied",
        _spec(**{"testMessage.to": "ops@contoso.com", "testMessage.from": "ceo@contoso.com"}),
        "SendRejected",
        "SmtpAuthenticated",
    ),
    (
        "garbage-after-greeting",
        _smtp_server(lambda p: GarbageSmtpServer()),
        "UnexpectedResponse",
        "SmtpAuthenticated",
    ),
    (
        "garbage-greeting",
        _smtp_server(lambda p: GarbageSmtpServer(greet_with_garbage=True)),
        "UnexpectedResponse",
        "SmtpAuthenticated",
    ),
]


def _granted(server: FakeExchange) -> FakeExchange:
    server.grant(MAILBOX, CLIENT)
    return server


@pytest.mark.parametrize(("setup", "reason", "step"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_reports_reason(
    peers: Peers,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    setup: Setup,
    reason: str,
    step: str,
) -> None:
    path = setup(peers)
    try:
        code, result = run_check(peers, capsys, caplog, path)
    finally:
        for server in peers.servers:
            server.stop()
    # An unusable spec is bad input (exit 2), every other failure a result (exit 1).
    assert code == (2 if reason == "InvalidSpec" else 1)
    assert result["ready"] is False
    assert result["reason"] == reason, result["message"]
    assert conditions(result)["Ready"] == ("False", reason)
    assert conditions(result)[step] == ("False", reason)
    assert result["message"]


def test_check_ready(
    peers: Peers, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    code, result = run_check(peers, capsys, caplog, peers.manifests())
    assert code == 0
    assert result["ready"] is True
    assert result["reason"] == "ConnectionTested"
    conds = conditions(result)
    for step, ok in (
        ("SecretResolved", "Resolved"),
        ("TokenAcquired", "TokenIssued"),
        ("SmtpAuthenticated", "Authenticated"),
    ):
        assert conds[step] == ("True", ok)
    assert result["tokenEndpoint"] == f"{peers.idp.authority_host}/{TENANT}/oauth2/v2.0/token"
    assert peers.smtp.auth_attempts[-1].user == MAILBOX


def test_check_sends_test_message(
    peers: Peers, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    code, result = run_check(
        peers, capsys, caplog, peers.manifests(peers.spec(**{"testMessage.to": "ops@contoso.com"}))
    )
    assert code == 0, result
    messages = peers.smtp.wait_for_messages(1)
    assert list(messages[0].rcpt_tos) == ["ops@contoso.com"]


def test_check_through_connect_proxy(
    peers: Peers, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with HttpConnectProxy() as proxy:
        spec = peers.spec(**{"proxy.url": f"http://127.0.0.1:{proxy.port}"})
        code, result = run_check(peers, capsys, caplog, peers.manifests(spec))
        assert code == 0, result["message"]
        targets = proxy.targets
    assert f"127.0.0.1:{peers.idp.port}" in targets
    assert f"127.0.0.1:{peers.smtp.port}" in targets


def test_check_proxy_down_is_unreachable(
    peers: Peers, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    spec = peers.spec(**{"proxy.url": f"http://127.0.0.1:{closed_port()}"})
    code, result = run_check(peers, capsys, caplog, peers.manifests(spec))
    assert code == 1
    assert result["reason"] == "IdentityProviderUnreachable"
    assert "proxy" in result["message"]


def test_check_exit_code_2_on_unusable_input(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed\n")
    assert cli.main(["check", "-f", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert cli.main(["check", "-f", str(tmp_path / "missing.yaml")]) == 2
    empty = tmp_path / "empty.yaml"
    empty.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert cli.main(["check", "-f", str(empty)]) == 2
    assert "no SmtpOAuthConfig" in capsys.readouterr().err


def test_check_uses_https_proxy_from_the_environment(
    peers: Peers,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with HttpConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("https_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        code, result = run_check(peers, capsys, caplog, peers.manifests())
        assert code == 0, result["message"]
        assert f"127.0.0.1:{peers.idp.port}" in proxy.targets
        assert f"127.0.0.1:{peers.smtp.port}" in proxy.targets
        # NO_PROXY exempts a host: nothing more goes through the proxy.
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        before = len(proxy.targets)
        code, result = run_check(peers, capsys, caplog, peers.manifests())
        assert code == 0, result["message"]
        assert len(proxy.targets) == before


def test_no_starttls_sends_no_auth(
    peers: Peers, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The security property of StartTLSNotOffered: the token never crosses the wire in plaintext.

    The server offers AUTH XOAUTH2 without TLS and would accept the token (the mailbox is granted):
    only the client's refusal keeps the token off the wire, and the server must have seen no AUTH.
    """
    with _granted(FakeExchange(peers.idp, offer_starttls=False, allow_plaintext_auth=True)) as server:
        code, result = run_check(
            peers, capsys, caplog, peers.manifests(peers.spec(**{"smtp.port": server.port}))
        )
        assert server.connections == 1  # it was the server we talked to
        assert server.auth_attempts == []
    assert code == 1
    assert result["reason"] == "StartTLSNotOffered"
    assert "never authenticates in plaintext" in result["message"]


def test_check_through_an_authenticating_proxy(
    peers: Peers, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Both tunnels (token endpoint and SMTP) send Proxy-Authorization; the credentials stay secret."""
    with _authenticating_proxy() as proxy:
        spec = peers.spec(**{"proxy.url": _with_credentials(proxy)})
        code, result = run_check(peers, capsys, caplog, peers.manifests(spec))
        assert code == 0, result["message"]
        assert proxy.targets == [f"127.0.0.1:{peers.idp.port}", f"127.0.0.1:{peers.smtp.port}"]
        assert proxy.authorizations == [f"Basic {PROXY_BASIC}"] * 2
        assert proxy.tunnels == 2
    assert peers.smtp.auth_attempts[-1].tls is True


def test_check_through_a_proxy_that_sends_the_greeting_with_its_reply(
    peers: Peers, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The SMTP greeting in the same segment as the proxy's 200 is not lost (python-socks alone loses it)."""
    with _authenticating_proxy(coalesce=True) as proxy:
        spec = peers.spec(**{"proxy.url": _with_credentials(proxy), "smtp.connectionTimeoutSeconds": 5})
        code, result = run_check(peers, capsys, caplog, peers.manifests(spec))
        assert code == 0, result["message"]
        assert proxy.tunnels == 2


def test_check_wrong_proxy_password_for_the_token_request(
    peers: Peers, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with _authenticating_proxy() as proxy:
        spec = peers.spec(**{"proxy.url": _with_credentials(proxy, password=PROXY_PASSWORD[::-1])})
        code, result = run_check(peers, capsys, caplog, peers.manifests(spec))
        port = proxy.port
    assert code == 1
    assert result["reason"] == "IdentityProviderUnreachable"
    assert f"The proxy 127.0.0.1:{port} did not connect us" in result["message"]
    assert "407" in result["message"]
    assert PROXY_PASSWORD[::-1] not in json.dumps(result)
    assert PROXY_USER not in json.dumps(result)


def test_check_wrong_proxy_password_for_smtp(
    peers: Peers,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The token endpoint reached directly (NO_PROXY), the SMTP server through the proxy: a 407 there."""
    with _authenticating_proxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", _with_credentials(proxy, password=PROXY_PASSWORD[::-1]))
        monkeypatch.delenv("https_proxy", raising=False)
        monkeypatch.setenv("NO_PROXY", "localhost")
        monkeypatch.delenv("no_proxy", raising=False)
        authority = peers.idp.authority_host.replace("127.0.0.1", "localhost")
        spec = peers.spec(**{"identity.authorityHost": authority})
        code, result = run_check(peers, capsys, caplog, peers.manifests(spec))
        assert proxy.targets == [f"127.0.0.1:{peers.smtp.port}"]
        assert proxy.authorizations[0] is not None  # credentials were sent, just the wrong ones
        port = proxy.port
    assert code == 1
    assert result["reason"] == "SmtpConnectionRefused", result["message"]
    assert conditions(result)["TokenAcquired"][0] == "True"
    assert f"The proxy 127.0.0.1:{port} refused the tunnel" in result["message"]
    assert "407" in result["message"]
    assert "check the user and password" in result["message"]
    assert PROXY_PASSWORD[::-1] not in json.dumps(result)
    assert PROXY_USER not in json.dumps(result)


def test_check_https_proxy_url_is_invalid_spec(
    peers: Peers, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """TLS to the proxy is not supported; it used to be a plaintext CONNECT on port 80 for SMTP."""
    with _authenticating_proxy() as proxy:
        url = _with_credentials(proxy).replace("http://", "https://")
        code, result = run_check(peers, capsys, caplog, peers.manifests(peers.spec(**{"proxy.url": url})))
        assert proxy.connections == 0
    assert code == 2
    assert result["reason"] == "InvalidSpec"
    assert "spec.proxy.url" in result["message"]
    assert "use http://host:port" in result["message"]


def test_check_https_proxy_from_the_environment_is_invalid_spec(
    peers: Peers,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with _authenticating_proxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", _with_credentials(proxy).replace("http://", "https://"))
        monkeypatch.delenv("https_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        code, result = run_check(peers, capsys, caplog, peers.manifests())
        assert proxy.connections == 0
        port = proxy.port
    assert code == 2
    assert result["reason"] == "InvalidSpec"
    assert f"HTTPS_PROXY (https://127.0.0.1:{port})" in result["message"]
    assert "proxy.httpsProxy" in result["message"]
    assert peers.smtp.auth_attempts == []
