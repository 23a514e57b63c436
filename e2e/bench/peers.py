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
"""

from __future__ import annotations

import json
import sys
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    state = Path(args[0])
    state.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create("smtp-oauth-operator bench CA", directory=state)
    cert = ca.issue("127.0.0.1", "localhost")
    with FakeEntraID(cert) as idp, FakeExchange(idp, cert=cert) as smtp:
        idp.register_tenant(TENANT, DOMAIN)
        print(
            json.dumps(
                {
                    "authority_host": idp.authority_host,
                    "tenant_id": TENANT,
                    "smtp_host": smtp.host,
                    "smtp_port": smtp.port,
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
