"""Expiry discovery: read the app registration from Microsoft Graph, at most once per recheck interval.

A thousand SmtpOAuthConfigs of one app registration cost one Graph read per recheck interval: the
application object is cached per (Graph host, tenant, app), and concurrent passes for the same app wait
for the one read in flight. A failure is cached too, per credential (a Secret with a wrong value must not
spoil the read of a colleague's correct one): until Retry-After for throttling, with a short backoff for
an unreachable Graph, and for the recheck interval for a refusal that needs an admin. A manual recheck
(the smtpoauth.dev/recheck annotation) reads again at once.

The Graph token is a second client-credentials token for the same credential, through the same
TokenProvider (one MSAL application, one cached token per scope).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from smtp_oauth_operator.clients.graph import GraphRead, read_application
from smtp_oauth_operator.clients.identity import TokenProvider, TokenRequest
from smtp_oauth_operator.domain.discovery import (
    Discovery,
    GraphApplication,
    failed,
    identify,
    parse_application,
)
from smtp_oauth_operator.domain.reasons import CheckFailed, Reason
from smtp_oauth_operator.domain.spec import SmtpOAuthSpec
from smtp_oauth_operator.services.connection import Inputs, proxy_for, token_request

__all__ = ["GraphDiscovery"]

TRANSIENT_RETRY = timedelta(minutes=1)
MAX_ENTRIES = 4096

_AppKey = tuple[str, str, str]


@dataclass(slots=True)
class _Entry:
    result: GraphApplication | CheckFailed
    fresh_until: datetime


def _credential_id(inputs: Inputs) -> str:
    """Which credential (never the secret itself), as TokenRequest.credential_id names it."""
    if inputs.certificate is not None:
        return f"cert:{inputs.certificate.thumbprint_sha256}"
    if inputs.assertion is not None:
        return f"federated:{inputs.assertion.identity}"
    return "secret:" + hashlib.sha256(inputs.client_secret.encode()).hexdigest()


def _throttled(result: GraphApplication | CheckFailed) -> bool:
    return isinstance(result, CheckFailed) and result.reason in {Reason.GRAPH_THROTTLED, Reason.THROTTLED}


class GraphDiscovery:
    """Loop-only, like the reconciler: one per process (the CLI makes its own)."""

    def __init__(self) -> None:
        self._apps: dict[_AppKey, _Entry] = {}
        self._failures: dict[tuple[str, ...], _Entry] = {}
        self._locks: dict[_AppKey, asyncio.Lock] = {}
        self.reads = 0  # Graph reads attempted (tokens included), for tests and the benchmark

    async def discover(
        self,
        spec: SmtpOAuthSpec,
        inputs: Inputs,
        tokens: TokenProvider,
        *,
        now: datetime,
        refresh: bool = False,
    ) -> Discovery | None:
        """Graph's view of the credential in use; ``None`` when discovery is off."""
        if not spec.discover_graph:
            return None
        app_key: _AppKey = (spec.graph_host.lower(), spec.tenant_id.lower(), spec.client_id.lower())
        failure_key = (*app_key, _credential_id(inputs))
        lock = self._locks.setdefault(app_key, asyncio.Lock())
        async with lock:
            entry = self._apps.get(app_key)
            failure = self._failures.get(failure_key)
            # A manual recheck reads again at once, except while Graph (or Entra ID) asked us to wait.
            waiting = failure is not None and failure.fresh_until > now and _throttled(failure.result)
            if (refresh and not waiting) or (
                (entry is None or entry.fresh_until <= now)
                and (failure is None or failure.fresh_until <= now)
            ):
                # Built only for a read: choosing the proxy costs more than the whole cached path.
                request = dataclasses.replace(
                    token_request(spec, inputs),
                    scope=spec.graph_scope,
                    proxy_url=proxy_for(spec, urlsplit(spec.graph_host).hostname or ""),
                )
                entry, failure = await self._read(spec, inputs, tokens, request, app_key, failure_key, now)
        known = self._identify(spec, inputs, entry, now)
        if (
            failure is not None
            and isinstance(failure.result, CheckFailed)
            and (entry is None or failure.fresh_until > now)
        ):
            error = failure.result
            retry = failure.fresh_until - now if error.transient else None
            result = failed(error, now, retry)
            if known is not None:
                # The last good read still says when the credential expires: the alarms keep that date.
                result = dataclasses.replace(
                    result, expires_at=known.expires_at, credentials=known.credentials, in_use=known.in_use
                )
            return result
        return known

    @staticmethod
    def _identify(
        spec: SmtpOAuthSpec, inputs: Inputs, entry: _Entry | None, now: datetime
    ) -> Discovery | None:
        if entry is None or not isinstance(entry.result, GraphApplication):
            return None
        certificate = inputs.certificate
        return identify(
            entry.result,
            client_id=spec.client_id,
            secret=inputs.client_secret if spec.credential_kind == "ClientSecret" else None,
            sha1=certificate.thumbprint_sha1 if certificate is not None else None,
            now=now,
        )

    async def _read(
        self,
        spec: SmtpOAuthSpec,
        inputs: Inputs,
        tokens: TokenProvider,
        request: TokenRequest,
        app_key: _AppKey,
        failure_key: tuple[str, ...],
        now: datetime,
    ) -> tuple[_Entry | None, _Entry | None]:
        self.reads += 1
        self._prune(now)
        try:
            token = await tokens.acquire(request)
            payload = await read_application(
                GraphRead(
                    graph_host=spec.graph_host,
                    app_id=spec.client_id,
                    token=token.value,
                    ca_pem=inputs.identity_ca,
                    proxy_url=request.proxy_url,
                    timeout=spec.identity_timeout,
                    secrets=(inputs.client_secret,) if inputs.client_secret else (),
                )
            )
            try:
                app = parse_application(payload)
            except ValueError as exc:
                raise CheckFailed(
                    Reason.GRAPH_UNAVAILABLE, f"Microsoft Graph answered an unexpected object ({exc})"
                ) from None
        except CheckFailed as exc:
            if exc.transient:
                delay = timedelta(seconds=exc.retry_after) if exc.retry_after else TRANSIENT_RETRY
                until = now + min(delay, max(spec.recheck_interval, TRANSIENT_RETRY))
            else:
                until = now + spec.recheck_interval
            entry = _Entry(exc, until)
            self._failures[failure_key] = entry
            return self._apps.get(app_key), entry
        self._failures.pop(failure_key, None)
        fresh = _Entry(app, now + spec.recheck_interval)
        self._apps[app_key] = fresh
        return fresh, None

    def forget(self, spec: SmtpOAuthSpec) -> None:
        """The app's credentials changed (renewal wrote to Graph): the next pass reads again."""
        self._apps.pop((spec.graph_host.lower(), spec.tenant_id.lower(), spec.client_id.lower()), None)

    def _prune(self, now: datetime) -> None:
        if len(self._apps) + len(self._failures) < MAX_ENTRIES:
            return
        for table in (self._apps, self._failures):
            for key in [k for k, e in table.items() if e.fresh_until <= now]:
                del table[key]  # type: ignore[arg-type]
