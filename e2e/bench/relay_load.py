"""The load generator of the relay benchmark: ``python -m e2e.bench.relay_load`` reads a JSON job on stdin and
prints one JSON object (messages sent, errors, per-message seconds).

Each of ``clients`` workers sends messages one after another for ``seconds``, each over a NEW connection
(as Alertmanager does): connect, EHLO, STARTTLS, EHLO, AUTH, MAIL, RCPT, DATA (``size`` bytes), QUIT.

* ``mode: floor`` — straight to the Exchange stand-in with AUTH XOAUTH2 and a token fetched once (msal):
  what a client that does OAuth itself costs;
* ``mode: login`` — to a relay (ours or email-oauth2-proxy) with AUTH PLAIN, username and password.

It runs in its own process, so that its CPU is not charged to the relay or the stand-ins.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from typing import Any

import aiosmtplib
import msal
import requests


def _token(job: dict[str, Any]) -> str:
    session = requests.Session()
    session.trust_env = False
    session.verify = job["upstream_ca"]
    app = msal.ConfidentialClientApplication(
        job["client_id"],
        client_credential=job["client_secret"],
        authority=f"{job['authority_host']}/{job['tenant_id']}",
        http_client=session,
        instance_discovery=False,
        validate_authority=False,
    )
    result = app.acquire_token_for_client(scopes=[job["scope"]])
    if "access_token" not in result:
        raise RuntimeError(f"no token: {result.get('error')}")
    return str(result["access_token"])


def _body(job: dict[str, Any], n: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    head = (
        f"From: {job['sender']}\r\nTo: {job['to']}\r\nSubject: bench {n}\r\n"
        f"Message-ID: <bench-{n}-{time.monotonic_ns()}@bench.test>\r\n\r\n"
    ).encode()
    return head + line * (int(job["size"]) // len(line))


async def _one(job: dict[str, Any], context: ssl.SSLContext, token: str | None, n: int) -> None:
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=job["port"], start_tls=False, tls_context=context, timeout=60
    )
    await smtp.connect()
    try:
        await smtp.ehlo()
        await smtp.starttls(tls_context=context)
        await smtp.ehlo()
        if token is not None:
            await smtp.auth_xoauth2(job["sender"], token)
        else:
            await smtp.auth_plain(job["username"], job["password"])
        await smtp.sendmail(job["sender"], [job["to"]], _body(job, n))
        await smtp.quit()
    finally:
        smtp.close()


async def run(job: dict[str, Any]) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=job["ca_file"])
    context.check_hostname = False  # the certificates name localhost/127.0.0.1; the chain is checked
    token = await asyncio.to_thread(_token, job) if job["mode"] == "floor" else None
    latencies: list[float] = []
    errors: list[str] = []
    counter = 0
    warmup_until = time.monotonic() + float(job.get("warmup", 1.0))
    stop_at = warmup_until + float(job["seconds"])

    async def worker() -> None:
        nonlocal counter
        while time.monotonic() < stop_at:
            counter += 1
            started = time.monotonic()
            try:
                await _one(job, context, token, counter)
            except Exception as exc:  # every failure is a counted error
                if started >= warmup_until:
                    errors.append(type(exc).__name__ + ": " + str(exc)[:120])
                continue
            if started >= warmup_until:
                latencies.append(time.monotonic() - started)

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(int(job["clients"]))))
    measured = time.monotonic() - max(began, warmup_until)
    return {"sent": len(latencies), "seconds": measured, "latencies": latencies, "errors": errors}


def main() -> int:
    job = json.load(sys.stdin)
    print(json.dumps(asyncio.run(run(job))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
