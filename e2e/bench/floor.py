"""The protocol floor: what a bare script needs for the work one connection test does.

One round = a fresh MSAL ``ConfidentialClientApplication`` (so OIDC discovery and a real token
request, as the operator does for an app registration it has not seen) + TCP + EHLO + STARTTLS +
EHLO + AUTH XOAUTH2 + QUIT with aiosmtplib, against the same local servers as the operator. No
Kubernetes API work at all: that is the operator's overhead by definition.

``python -m e2e.bench.floor`` reads a JSON job on stdin (endpoints and one ``{client_id, secret}``
per round) and prints a JSON list of per-round seconds. It runs in its own process, like the
operator, so neither shares a GIL with the benchmark or the fake servers.
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


def token(job: dict[str, Any], client_id: str, secret: str) -> str:
    session = requests.Session()
    session.trust_env = False
    session.verify = job["ca_file"]
    try:
        app = msal.ConfidentialClientApplication(
            client_id,
            client_credential=secret,
            authority=f"{job['authority_host']}/{job['tenant_id']}",
            http_client=session,
            instance_discovery=False,
            validate_authority=False,
        )
        result = app.acquire_token_for_client(scopes=[job["scope"]])
    finally:
        session.close()
    if "access_token" not in result:
        raise RuntimeError(f"no token: {result.get('error')}")
    return str(result["access_token"])


async def smtp_auth(job: dict[str, Any], access_token: str, context: ssl.SSLContext) -> None:
    smtp = aiosmtplib.SMTP(
        hostname=job["smtp_host"], port=job["smtp_port"], start_tls=False, tls_context=context, timeout=10
    )
    await smtp.connect()
    await smtp.ehlo()
    await smtp.starttls(tls_context=context)
    await smtp.ehlo()
    await smtp.auth_xoauth2(job["mailbox"], access_token)
    await smtp.quit()


async def rounds(job: dict[str, Any]) -> list[float]:
    times = []
    for app in job["apps"]:
        started = time.perf_counter()
        access_token = token(job, app["client_id"], app["secret"])
        context = ssl.create_default_context(cafile=job["ca_file"])
        await smtp_auth(job, access_token, context)
        times.append(time.perf_counter() - started)
    return times


def main() -> int:
    job = json.load(sys.stdin)
    print(json.dumps(asyncio.run(rounds(job))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
