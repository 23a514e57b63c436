"""The local Entra ID and Exchange for the benchmark, in a process of their own.

Why a process: on a two-core machine the fake servers must not share a GIL with the benchmark's
own watch and create threads, or their latency would be charged to the operator.

``python -m e2e.bench.peers STATE_DIR`` starts a CA, a :class:`FakeEntraID` with one tenant and a
STARTTLS :class:`FakeExchange`, writes ``STATE_DIR/ca.pem``, prints one JSON line with the endpoints
and then answers JSON commands, one per stdin line, with one JSON line on stdout:

* ``{"cmd": "register", "client_id": ..., "secret": ...}`` — a new app registration with
  SMTP.SendAsApp, granted on the benchmark mailbox;
* ``{"cmd": "counters"}`` — ``token_requests``, ``token_requests_by_client``, ``discovery_requests``,
  ``smtp_connections``, ``auth_ok``, ``auth_failed``;
* ``{"cmd": "quit"}`` (or end of input) — stop.

``--rtt-ms N`` puts a relay in front of each server that delays every chunk by N/2 ms in each
direction, so that the round trips cost what they cost against a cloud region rather than loopback;
the endpoints printed are then the relays'. The counters stay the servers' own.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from smtp_oauth_operator.testing.idp import EXCHANGE_RESOURCE, FakeEntraID
from smtp_oauth_operator.testing.pki import CertificateAuthority
from smtp_oauth_operator.testing.smtpd import FakeExchange

TENANT = "72f988bf-0000-4000-8000-0000000be4c4"
DOMAIN = "contoso.onmicrosoft.com"
MAILBOX = f"bench@{DOMAIN}"


def _counters(idp: FakeEntraID, smtp: FakeExchange) -> dict[str, Any]:
    attempts = smtp.auth_attempts
    ok = sum(1 for a in attempts if a.code == 235)
    return {
        "token_requests": idp.token_requests,
        "token_requests_by_client": idp.token_requests_by_client,
        "discovery_requests": idp.discovery_requests,
        "smtp_connections": smtp.connections,
        "auth_ok": ok,
        "auth_failed": len(attempts) - ok,
    }


class DelayRelay:
    """A TCP relay on 127.0.0.1 that forwards each chunk ``delay`` seconds after it arrived, in order."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="delay-relay", daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> int:
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.sleep(self.delay * 2)  # the TCP handshake's round trip
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    break
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(forward())
        try:
            while True:
                data = await reader.read(65536)
                queue.put_nowait((time.monotonic() + self.delay, data))
                if not data:
                    break
            await sender
        except (OSError, asyncio.IncompleteReadError):
            sender.cancel()
        finally:
            try:
                if writer.can_write_eof():
                    writer.write_eof()
            except OSError:
                pass


class _EntraID(FakeEntraID):
    """Advertises ``public_host`` (the relay) in its discovery document, so the token request goes
    through the relay too."""

    public_host: str | None = None

    @property
    def authority_host(self) -> str:
        return self.public_host or super().authority_host


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    rtt_ms = 0.0
    if "--rtt-ms" in args:
        i = args.index("--rtt-ms")
        rtt_ms = float(args[i + 1])
        del args[i : i + 2]
    state = Path(args[0])
    state.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create("smtp-oauth-operator bench CA", directory=state)
    cert = ca.issue("127.0.0.1", "localhost")
    with _EntraID(cert) as idp, FakeExchange(idp, cert=cert) as smtp:
        idp.register_tenant(TENANT, DOMAIN)
        authority_host, smtp_port = idp.authority_host, smtp.port
        if rtt_ms > 0:
            authority_host = f"https://127.0.0.1:{DelayRelay(idp.port, rtt_ms / 2000).port}"
            idp.public_host = authority_host
            smtp_port = DelayRelay(smtp.port, rtt_ms / 2000).port
        print(
            json.dumps(
                {
                    "authority_host": authority_host,
                    "tenant_id": TENANT,
                    "smtp_host": smtp.host,
                    "smtp_port": smtp_port,
                    "rtt_ms": rtt_ms,
                    "ca_file": str(ca.cert_file.resolve()),
                    "mailbox": MAILBOX,
                    "scope": f"{EXCHANGE_RESOURCE}/.default",
                }
            ),
            flush=True,
        )
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            answer: dict[str, Any]
            if cmd["cmd"] == "register":
                idp.register_app(TENANT, cmd["client_id"], cmd["secret"])
                smtp.grant(MAILBOX, cmd["client_id"])
                answer = {"ok": True}
            elif cmd["cmd"] == "counters":
                answer = _counters(idp, smtp)
            elif cmd["cmd"] == "quit":
                break
            else:
                answer = {"error": f"unknown command {cmd['cmd']!r}"}
            print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
