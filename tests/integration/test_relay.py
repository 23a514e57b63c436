"""The relay (``smtp-oauth-operator relay -f``) as a real process between real clients and the local
Entra ID and Exchange stand-ins: Python's smtplib, swaks and msmtp from Debian on one side, aiosmtplib's
XOAUTH2 to the Exchange stand-in on the other. Every refusal is checked with its exact reply.
"""

from __future__ import annotations

import base64
import email.policy
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from tests.integration.conftest import CANARY, CLIENT, MAILBOX, Peers

RELAY_USER = "alertmanager"
RELAY_PASSWORD = "RELAY~pa55word.CANARY_9876543210"  # a canary too: never in any output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RelayProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path, ca_file: str) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.ca_file = ca_file

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, *, tls: bool = True, login: bool = True) -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
        smtp.ehlo("client.test")
        if tls:
            smtp.starttls(context=ssl.create_default_context(cafile=self.ca_file))
            smtp.ehlo("client.test")
        if login:
            smtp.login(RELAY_USER, RELAY_PASSWORD)
        return smtp

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def relay_docs(peers: Peers, *, spec: dict[str, Any] | None = None, **relay: Any) -> None:
    peers.extra_docs.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/basic-auth",
            "metadata": {"name": "alerts-relay", "namespace": "mail"},
            "stringData": {"username": RELAY_USER, "password": RELAY_PASSWORD},
        }
    )
    peers.extra_docs.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": "relay-tls", "namespace": "mail"},
            "stringData": {
                "tls.crt": Path(peers.cert.cert_file).read_text(),
                "tls.key": Path(peers.cert.key_file).read_text(),
            },
        }
    )
    spec = spec if spec is not None else peers.spec()
    spec["relay"] = {"enabled": True, "credentialsSecretRef": {"name": "alerts-relay"}, **relay}
    peers.manifests(spec)


def start_relay(peers: Peers, *extra: str, wait: bool = True) -> RelayProcess:
    port = _free_port()
    log = peers.tmp / f"relay-{port}.log"
    args = [
        sys.executable,
        "-m",
        "smtp_oauth_operator.cli",
        "relay",
        "-f",
        str(peers.tmp / "mail.yaml"),
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--tls-secret",
        "mail/relay-tls",
        "--log-level",
        "debug",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    relay = RelayProcess(proc, port, log, str(peers.cert.ca_file))
    if wait:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"relay exited {proc.returncode}: {relay.output()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            relay.stop()
            raise AssertionError(f"relay did not listen: {relay.output()}")
    return relay


@pytest.fixture
def relay(peers: Peers) -> Iterator[RelayProcess]:
    relay_docs(peers)
    proc = start_relay(peers)
    yield proc
    proc.stop()
    assert_no_leak(proc, peers)


def assert_no_leak(relay: RelayProcess, peers: Peers) -> None:
    out = relay.output()
    tokens = peers.idp.issued_tokens
    for secret in (CANARY, RELAY_PASSWORD, *tokens):
        assert secret not in out
    assert base64.b64encode(f"\0{RELAY_USER}\0{RELAY_PASSWORD}".encode()).decode() not in out
    assert "Traceback" not in out


def message(sender: str = MAILBOX, to: str = "ops@contoso.com", size: int = 0) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = "relay test"
    msg.set_content("hello\n" + ("x" * 75 + "\n") * (size // 76))
    return msg


def send(smtp: smtplib.SMTP, msg: EmailMessage, sender: str | None = None) -> tuple[int, bytes]:
    """MAIL, RCPT, DATA by hand, returning the end-of-DATA reply (smtplib hides it on success)."""
    code, reply = smtp.mail(sender or str(msg["From"]))
    assert code == 250, reply
    code, reply = smtp.rcpt(str(msg["To"]))
    assert code == 250, reply
    return smtp.data(msg.as_bytes(policy=email.policy.SMTP))


# ---------------------------------------------------------------------------------------------------------
# Accepted


def test_smtplib_plain_arrives_with_xoauth2_and_the_upstream_queue_id(
    relay: RelayProcess, peers: Peers
) -> None:
    with relay.client() as smtp:
        code, reply = send(smtp, message())
    assert code == 250
    assert re.match(
        rb"2\.6\.0 <[0-9a-f]{32}@\S+> \[InternalId=\d+, Hostname=\S+\] .*Queued mail for delivery", reply
    )
    (received,) = peers.smtp.wait_for_messages(1)
    assert received.authenticated_as == MAILBOX
    assert received.client_id == CLIENT
    assert received.tls
    assert received.mail_from == MAILBOX
    assert received.rcpt_tos == ("ops@contoso.com",)
    assert received.message["Subject"] == "relay test"
    xoauth2 = [a for a in peers.smtp.auth_attempts if a.mechanism == "XOAUTH2" and a.code == 235]
    assert len(xoauth2) == 2  # the connection test at start, then the relayed message


def test_auth_login_and_one_token_for_many_messages(relay: RelayProcess, peers: Peers) -> None:
    before = peers.idp.token_requests
    for _ in range(3):
        with relay.client(login=False) as smtp:
            smtp.user, smtp.password = RELAY_USER, RELAY_PASSWORD
            code, reply = smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)
            assert (code, reply) == (235, b"2.7.0 Authentication successful")
            assert send(smtp, message())[0] == 250
    peers.smtp.wait_for_messages(3)
    # The connection test at start fetched the token; the messages reuse it from the cache.
    assert peers.idp.token_requests == before


def test_auth_login_challenges_are_the_usual_ones(relay: RelayProcess) -> None:
    """Go's net/smtp-based clients (Alertmanager's loginAuth) accept only "Username:" / "Password:"
    as LOGIN challenges; aiosmtpd's default ("User Name\\0") made Alertmanager give up."""
    with relay.client(login=False) as smtp:
        assert smtp.docmd("AUTH", "LOGIN") == (334, base64.b64encode(b"Username:"))
        assert smtp.docmd(base64.b64encode(RELAY_USER.encode()).decode()) == (
            334,
            base64.b64encode(b"Password:"),
        )
        assert smtp.docmd(base64.b64encode(RELAY_PASSWORD.encode()).decode()) == (
            235,
            b"2.7.0 Authentication successful",
        )


def test_upstream_sessions_are_reused_and_a_dropped_one_is_replaced(
    relay: RelayProcess, peers: Peers
) -> None:
    with relay.client() as smtp:
        assert send(smtp, message())[0] == 250
    opened = peers.smtp.connections
    for _ in range(3):
        with relay.client() as smtp:
            assert send(smtp, message())[0] == 250
    assert peers.smtp.connections == opened  # three more messages over the same Exchange session
    peers.smtp.drop_sessions()  # Exchange hangs up on the idle session
    with relay.client() as smtp:
        assert send(smtp, message())[0] == 250  # nothing of it reached the dead session: sent anew
    assert peers.smtp.connections == opened + 1
    assert len(peers.smtp.wait_for_messages(5)) == 5


def test_a_rejected_cached_token_is_retried_once_with_a_fresh_one(relay: RelayProcess, peers: Peers) -> None:
    before = peers.idp.token_requests
    peers.idp.expire_tokens(CLIENT)  # the cached token is now refused with 535 5.7.3
    with relay.client() as smtp:
        code, _ = send(smtp, message())
    assert code == 250
    assert peers.idp.token_requests == before + 1
    rejected = [a for a in peers.smtp.auth_attempts if a.code == 535]
    assert len(rejected) == 1


def test_a_fresh_token_rejected_is_not_retried(relay: RelayProcess, peers: Peers) -> None:
    peers.idp.expire_tokens(CLIENT)
    peers.smtp.revoke(MAILBOX, CLIENT)  # now even a fresh token gets 535 5.7.3
    before = peers.idp.token_requests
    with relay.client() as smtp:
        code, reply = send(smtp, message())
    assert code == 451
    assert reply.startswith(
        b"4.7.0 Exchange Online refused the relay's token: 535 5.7.3 Authentication unsuccessful"
    )
    assert peers.idp.token_requests == before + 1
    assert len([a for a in peers.smtp.auth_attempts if a.code == 535]) == 2
    assert peers.smtp.messages == []


def test_exchange_4xx_is_passed_on_then_the_retry_arrives(relay: RelayProcess, peers: Peers) -> None:
    peers.smtp.defer_data(1)
    with relay.client() as smtp:
        code, reply = send(smtp, message())
        assert code == 451
        assert reply.startswith(b"4.3.2 Temporary server error. Please try again later")
        assert peers.smtp.messages == []
        code, _ = send(smtp, message())  # the client's retry, in the same session
        assert code == 250
    assert len(peers.smtp.wait_for_messages(1)) == 1


def test_exchange_5xx_is_passed_on_with_its_text(relay: RelayProcess, peers: Peers) -> None:
    peers.smtp.defer_data(1, "554 5.6.211 Invalid MIME Content: Single text value size (32768) exceeded.")
    with relay.client() as smtp:
        assert send(smtp, message()) == (
            554,
            b"5.6.211 Invalid MIME Content: Single text value size (32768) exceeded.",
        )


# ---------------------------------------------------------------------------------------------------------
# Refused, each with its exact reply


def test_wrong_password_is_refused_slowly(relay: RelayProcess, peers: Peers) -> None:
    with relay.client(login=False) as smtp:
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            smtp.login(RELAY_USER, "wrong-" + RELAY_PASSWORD)
        first = time.monotonic() - started
    assert (err.value.smtp_code, err.value.smtp_error) == (535, b"5.7.8 Authentication credentials invalid")
    assert first >= 1.0
    with relay.client(login=False) as smtp:
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("nobody", RELAY_PASSWORD)
        assert time.monotonic() - started >= 2.0  # the second failure from this address waits longer
    with relay.client() as smtp:  # the right password still works at once
        assert send(smtp, message())[0] == 250
    assert "failed AUTH" in relay.output()


def test_auth_before_tls_and_mail_before_auth(relay: RelayProcess) -> None:
    with relay.client(tls=False, login=False) as smtp:
        assert "auth" not in smtp.esmtp_features
        assert smtp.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0a\0b").decode()) == (
            538,
            b"5.7.11 Encryption required for requested authentication mechanism",
        )
        assert smtp.mail(MAILBOX) == (530, b"5.7.0 Authentication required")
    with relay.client(login=False) as smtp:
        assert smtp.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        assert smtp.mail(MAILBOX) == (530, b"5.7.0 Authentication required")


def test_sender_not_allowed(relay: RelayProcess, peers: Peers) -> None:
    with relay.client() as smtp:
        assert smtp.mail("ceo@contoso.com") == (
            553,
            b"5.7.1 Sender <ceo@contoso.com> is not allowed for this login",
        )
        # An allowed envelope with a forged header From.
        assert send(smtp, message(sender="ceo@contoso.com"), sender=MAILBOX) == (
            550,
            b"5.7.1 Header From <ceo@contoso.com> is not allowed for this login",
        )
    assert peers.smtp.messages == []


def test_too_large_is_refused_while_streaming(peers: Peers) -> None:
    relay_docs(peers)
    proc = start_relay(peers, "--max-message-size", "20000")
    try:
        with proc.client() as smtp:
            assert smtp.esmtp_features["size"] == "20000"
            assert smtp.docmd("MAIL", f"FROM:<{MAILBOX}> SIZE=30000") == (
                552,
                b"5.3.4 Message size exceeds fixed maximum message size",
            )
            assert send(smtp, message(size=30_000)) == (
                552,
                b"5.3.4 Message size exceeds fixed maximum message size",
            )
            assert send(smtp, message(size=10_000))[0] == 250
    finally:
        proc.stop()
    assert len(peers.smtp.messages) == 1
    assert_no_leak(proc, peers)


def test_over_the_rate_limit(peers: Peers) -> None:
    relay_docs(peers, messagesPerMinute=2, recipientsPerDay=3)
    proc = start_relay(peers)
    try:
        with proc.client() as smtp:
            assert send(smtp, message())[0] == 250
            smtp.mail(MAILBOX)
            assert smtp.rcpt("a@contoso.com")[0] == 250
            assert smtp.rcpt("b@contoso.com")[0] == 250
            assert smtp.rcpt("c@contoso.com") == (
                451,
                f"4.7.0 Rate limit: {MAILBOX} may send to 3 recipients a day; try again later".encode(),
            )
            assert smtp.data(message().as_bytes(policy=email.policy.SMTP))[0] == 250
            code, reply = smtp.mail(MAILBOX)
            assert code == 451
            assert re.fullmatch(
                rf"4\.7\.0 Rate limit: {re.escape(MAILBOX)} may send 2 messages a minute; try again in \d+ s",
                reply.decode(),
            )
    finally:
        proc.stop()
    assert len(peers.smtp.messages) == 2


def test_configuration_not_ready(peers: Peers) -> None:
    peers.smtp.revoke(MAILBOX, CLIENT)  # the connection test at start fails: 535 5.7.3
    relay_docs(peers)
    proc = start_relay(peers)
    try:
        with proc.client(login=False) as smtp, pytest.raises(smtplib.SMTPAuthenticationError) as err:
            smtp.login(RELAY_USER, RELAY_PASSWORD)
    finally:
        proc.stop()
    assert (err.value.smtp_code, err.value.smtp_error) == (
        454,
        b"4.7.0 Configuration mail/mail is not Ready (AuthenticationRejected); try again later",
    )
    assert peers.smtp.messages == []
    assert_no_leak(proc, peers)


def test_bad_input_exits_2(peers: Peers) -> None:
    relay_docs(peers)
    peers.manifests(peers.spec())  # no spec.relay
    proc = start_relay(peers, wait=False)
    assert proc.proc.wait(timeout=60) == 2
    assert "no SmtpOAuthConfig in the files enables the relay" in proc.output()
    assert "Traceback" not in proc.output()


# ---------------------------------------------------------------------------------------------------------
# Independent clients from Debian


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (make bootstrap)")
def test_swaks_starttls_auth_login(relay: RelayProcess, peers: Peers) -> None:
    result = subprocess.run(
        [
            "swaks",
            "--server", f"127.0.0.1:{relay.port}",
            "--tls", "--tls-verify", "--tls-ca-path", relay.ca_file,
            "--auth", "LOGIN", "--auth-user", RELAY_USER, "--auth-password", RELAY_PASSWORD,
            "--from", MAILBOX, "--to", "ops@contoso.com",
            "--header", "Subject: from swaks",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"<~  250 2\.6\.0 <[0-9a-f]{32}@", result.stdout)
    (received,) = peers.smtp.wait_for_messages(1)
    assert received.message["Subject"] == "from swaks"


@pytest.mark.skipif(shutil.which("msmtp") is None, reason="msmtp is not installed (make bootstrap)")
def test_msmtp_starttls_auth_plain(relay: RelayProcess, peers: Peers) -> None:
    config = peers.tmp / "msmtprc"
    config.write_text(
        "\n".join(
            [
                "account relay",
                "host 127.0.0.1",
                f"port {relay.port}",
                "tls on",
                "tls_starttls on",
                f"tls_trust_file {relay.ca_file}",
                "auth plain",
                f"user {RELAY_USER}",
                f"password {RELAY_PASSWORD}",
                f"from {MAILBOX}",
                "account default : relay",
                "",
            ]
        )
    )
    config.chmod(0o600)
    mail = f"From: {MAILBOX}\nTo: ops@contoso.com\nSubject: from msmtp\n\nhello\n"
    result = subprocess.run(
        ["msmtp", "-C", str(config), "ops@contoso.com"],
        input=mail, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (received,) = peers.smtp.wait_for_messages(1)
    assert received.message["Subject"] == "from msmtp"
    assert received.authenticated_as == MAILBOX


# ---------------------------------------------------------------------------------------------------------
# Nothing acknowledged and then lost


def test_sigkill_while_clients_send_loses_no_accepted_message(peers: Peers) -> None:
    """Four clients send in a loop while the relay is SIGKILLed (Exchange answering slowly, so some
    submissions are in flight); the client retries what it did not see accepted against a new relay.
    Every message a client saw accepted is at the stand-in (at-least-once: a retried message whose
    acceptance was lost with the relay may arrive twice)."""
    import threading  # noqa: PLC0415

    peers.smtp.data_delay = 0.2
    relay_docs(peers, messagesPerMinute=10_000)
    relay = {"proc": start_relay(peers)}
    accepted: list[str] = []
    failed_attempts = 0
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        nonlocal failed_attempts
        i = 0
        while not stop.is_set():
            msg = message()
            msg["Message-ID"] = f"<c{n}-{i}@relay.test>"
            while True:  # retry this message until some relay accepts it (as a real client does)
                try:
                    with relay["proc"].client() as smtp:
                        code, _ = send(smtp, msg)
                    if code == 250:
                        with lock:
                            accepted.append(str(msg["Message-ID"]))
                        break
                except (OSError, smtplib.SMTPException):
                    pass
                with lock:
                    failed_attempts += 1
                if stop.is_set():
                    return
                time.sleep(0.2)
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while len(accepted) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = relay["proc"]
        killed.proc.kill()  # SIGKILL: no drain, no goodbye
        killed.proc.wait()
        relay["proc"] = start_relay(peers)
        deadline = time.monotonic() + 30
        target = len(accepted) + 8
        while len(accepted) < target and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        relay["proc"].stop()
    arrived = {str(m.message["Message-ID"]) for m in peers.smtp.messages}
    assert failed_attempts > 0  # the kill did hit clients
    assert len(accepted) >= 16
    missing = [mid for mid in accepted if mid not in arrived]
    assert missing == []


async def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    """cert-manager rewrites the mounted Secret; new handshakes present the new certificate."""
    import asyncio  # noqa: PLC0415

    from smtp_oauth_operator.services.relay import reload_certificate  # noqa: PLC0415
    from smtp_oauth_operator.testing.pki import CertificateAuthority  # noqa: PLC0415

    old = CertificateAuthority.create("old CA", directory=tmp_path / "old").issue(
        "127.0.0.1", directory=tmp_path / "old"
    )
    new = CertificateAuthority.create("new CA", directory=tmp_path / "new").issue(
        "127.0.0.1", directory=tmp_path / "new"
    )
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(Path(old.cert_file).read_bytes())
    key.write_bytes(Path(old.key_file).read_bytes())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]

    async def trusted_by(ca_file: str) -> bool:
        client = ssl.create_default_context(cafile=ca_file)
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        except ssl.SSLError:
            return False
        writer.close()
        return True

    reloader = asyncio.create_task(reload_certificate(context, str(cert), str(key), interval=0.05))
    try:
        assert await trusted_by(str(old.ca_file))
        await asyncio.sleep(0.1)
        os.utime(cert, (time.time() + 5, time.time() + 5))  # a later mtime, as a Secret volume update gives
        key.write_bytes(Path(new.key_file).read_bytes())
        cert.write_bytes(Path(new.cert_file).read_bytes())
        os.utime(cert, (time.time() + 10, time.time() + 10))
        for _ in range(100):
            if await trusted_by(str(new.ca_file)):
                break
            await asyncio.sleep(0.05)
        assert await trusted_by(str(new.ca_file))
        assert not await trusted_by(str(old.ca_file))
    finally:
        reloader.cancel()
        server.close()
        await server.wait_closed()


def test_sigterm_finishes_the_message_in_flight(peers: Peers) -> None:
    """A rollout's SIGTERM while Exchange is still answering: the client gets Exchange's 250, not a
    dropped connection, and the relay exits 0."""
    import threading  # noqa: PLC0415

    peers.smtp.data_delay = 1.5
    relay_docs(peers)
    proc = start_relay(peers)
    answers: list[tuple[int, bytes]] = []

    def client() -> None:
        with proc.client() as smtp:
            answers.append(send(smtp, message()))

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 10
    while peers.smtp.connections < 2 and time.monotonic() < deadline:  # the test at start, then ours
        time.sleep(0.05)
    time.sleep(0.5)  # DATA is with Exchange now
    proc.proc.terminate()
    thread.join(timeout=30)
    assert proc.proc.wait(timeout=30) == 0
    assert len(answers) == 1
    assert answers[0][0] == 250
    assert len(peers.smtp.messages) == 1
    assert_no_leak(proc, peers)


def test_relay_submits_through_an_authenticating_connect_proxy(peers: Peers) -> None:
    from smtp_oauth_operator.testing.peers import HttpConnectProxy  # noqa: PLC0415

    proxy_password = "PROXY~pa55.CANARY_42"
    with HttpConnectProxy(credentials=("relay-proxy", proxy_password)) as proxy:
        relay_docs(peers, spec=peers.spec(**{"proxy.url": proxy.url_with_credentials}))
        proc = start_relay(peers)
        try:
            tunnels = proxy.tunnels  # the connection test at start went through it too
            with proc.client() as smtp:
                assert send(smtp, message())[0] == 250
            assert proxy.tunnels == tunnels + 1
            assert f"127.0.0.1:{peers.smtp.port}" in proxy.targets
        finally:
            proc.stop()
    assert len(peers.smtp.messages) == 1
    assert proxy_password not in proc.output()
    assert_no_leak(proc, peers)


def test_dot_stuffing_and_line_ends_survive_the_relay(relay: RelayProcess, peers: Peers) -> None:
    """What the client dot-stuffs arrives unstuffed and byte for byte, also a body line that is a lone
    dot, a line ending in a dot, and a line starting with two dots."""
    body = (
        f"From: {MAILBOX}\r\nTo: ops@contoso.com\r\nSubject: dots\r\n\r\n"
        ".starts with a dot\r\n.\r\n..two dots\r\nends with a dot.\r\n" + "x" * 900 + "\r\n" + "y.\r\n" * 3000
    ).encode()
    with relay.client() as smtp:
        smtp.mail(MAILBOX)
        smtp.rcpt("ops@contoso.com")
        assert smtp.data(body)[0] == 250  # smtplib dot-stuffs and sends the terminator
        smtp.mail(MAILBOX)
        smtp.rcpt("ops@contoso.com")
        assert smtp.data(b"")[0] == 250  # an empty message: the terminator straight away
        smtp.mail(MAILBOX)
        smtp.rcpt("ops@contoso.com")
        assert smtp.data(b"Subject: long\r\n\r\n" + b"z" * 1200 + b"\r\n") == (
            500,
            b"5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
        )
    first, second = peers.smtp.wait_for_messages(2)
    assert first.data == body
    assert second.data == b"\r\n"  # smtplib ends even an empty message with CRLF
