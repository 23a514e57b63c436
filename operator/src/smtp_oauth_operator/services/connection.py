"""The connection test, shared by the operator and the ``check`` CLI (ISE's "Test Connection").

1. resolve: read the client secret, the optional trust bundles and the expiry date from the
   referenced Secret/ConfigMaps (through an :class:`ObjectSource`: the API server, or manifests);
2. acquire a token (clients/identity.py);
3. authenticate to SMTP with XOAUTH2 after TLS, optionally send a test message (clients/smtp.py).
Each step raises :class:`CheckFailed` with its reason; :func:`run` turns that into a ConnectionTestResult.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import ssl
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from smtp_oauth_operator.clients.identity import TokenProvider, TokenRequest
from smtp_oauth_operator.clients.smtp import Message, SmtpTarget, authenticate
from smtp_oauth_operator.domain.objects import ObjectSource, SourceObject
from smtp_oauth_operator.domain.reasons import CheckFailed, ConditionType, Reason
from smtp_oauth_operator.domain.redact import strip_userinfo
from smtp_oauth_operator.domain.spec import KeyRef, SmtpOAuthSpec, parse_time, proxy_url_problem
from smtp_oauth_operator.domain.status import ConnectionTestResult

__all__ = ["Inputs", "ObjectSource", "SourceObject", "resolve", "run", "send_mail", "token_request"]


@dataclass(frozen=True, slots=True)
class Inputs:
    client_secret: str = field(repr=False)
    identity_ca: str | None
    smtp_ca: str | None
    expires_at: datetime | None
    secret_metadata: Mapping[str, Any]
    fingerprint: str


_Seen = dict[tuple[str, str], "SourceObject | Exception | None"]


def _take(seen: _Seen, kind: str, name: str) -> SourceObject | None:
    """An object read in this pass; a failed read raises here, where a sequential read would have."""
    obj = seen[(kind, name)]
    if isinstance(obj, Exception):
        raise obj
    return obj


async def _read_all(source: ObjectSource, namespace: str, spec: SmtpOAuthSpec) -> _Seen:
    """Every referenced object, read at once: one API round trip of latency instead of one per object,
    and one GET for a ConfigMap holding both trust bundles (the usual case)."""
    keys: list[tuple[str, str]] = [("Secret", spec.secret_ref.name)]
    keys += [(r.kind, r.name) for r in (spec.identity_ca, spec.smtp_ca) if r is not None]
    keys = list(dict.fromkeys(keys))
    results = await asyncio.gather(
        *(source.read(kind, namespace, name) for kind, name in keys),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    seen: _Seen = {}
    for key, result in zip(keys, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result  # cancellation and the like
        seen[key] = result
    return seen


def _value(seen: _Seen, namespace: str, ref: KeyRef) -> tuple[str, str]:
    obj = _take(seen, ref.kind, ref.name)
    if obj is None:
        raise CheckFailed(Reason.CA_BUNDLE_NOT_FOUND, f"{ref.kind} {namespace}/{ref.name} does not exist")
    if ref.key not in obj.data:
        raise CheckFailed(
            Reason.CA_BUNDLE_NOT_FOUND, f"{ref.kind} {namespace}/{ref.name} has no key {ref.key!r}"
        )
    return obj.data[ref.key], str(obj.metadata.get("resourceVersion", ""))


@functools.lru_cache(maxsize=64)
def _holds_certificates(pem: str) -> bool:
    if "-----BEGIN CERTIFICATE-----" not in pem:
        return False
    try:
        # A bare context: only the PEM is parsed, not the system's anchors (tens of ms per call).
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
    except (ValueError, ssl.SSLError):
        return False
    return True


def _check_pem(pem: str, ref: KeyRef, namespace: str) -> str:
    if not _holds_certificates(pem):
        raise CheckFailed(
            Reason.CA_BUNDLE_NOT_FOUND,
            f"{ref.kind} {namespace}/{ref.name} key {ref.key!r} does not hold PEM certificates",
        ) from None
    return pem


async def resolve(spec: SmtpOAuthSpec, namespace: str, generation: int, source: ObjectSource) -> Inputs:
    """Read everything the test needs from the referenced objects."""
    ref = spec.secret_ref
    seen = await _read_all(source, namespace, spec)
    obj = _take(seen, "Secret", ref.name)
    if obj is None:
        raise CheckFailed(
            Reason.SECRET_NOT_FOUND,
            f"Secret {namespace}/{ref.name} does not exist (is the SealedSecret unsealed?)",
        )
    secret = obj.data.get(ref.key)
    if secret is None:
        raise CheckFailed(
            Reason.SECRET_KEY_NOT_FOUND, f"Secret {namespace}/{ref.name} has no key {ref.key!r}"
        )
    secret = secret.strip()
    if not secret:
        raise CheckFailed(
            Reason.SECRET_KEY_NOT_FOUND, f"Secret {namespace}/{ref.name} key {ref.key!r} is empty"
        )
    versions = [str(obj.metadata.get("resourceVersion", ""))]

    expires_at = spec.expires_at
    if spec.expires_at_key:
        raw = obj.data.get(spec.expires_at_key)
        if raw is None:
            raise CheckFailed(
                Reason.SECRET_KEY_NOT_FOUND,
                f"Secret {namespace}/{ref.name} has no key {spec.expires_at_key!r} (expiresAtKey)",
            )
        try:
            expires_at = parse_time(raw)
        except ValueError:
            raise CheckFailed(
                Reason.INVALID_SPEC,
                f"Secret {namespace}/{ref.name} key {spec.expires_at_key!r} is not an RFC 3339 date "
                "like 2027-05-31T00:00:00Z",
                condition=ConditionType.SECRET_RESOLVED,
            ) from None

    cas: dict[str, str | None] = {}
    for name, ca_ref in (("identity", spec.identity_ca), ("smtp", spec.smtp_ca)):
        if ca_ref is None:
            cas[name] = None
            continue
        pem, version = _value(seen, namespace, ca_ref)
        cas[name] = _check_pem(pem, ca_ref, namespace)
        versions.append(version)

    fingerprint = hashlib.sha256(json.dumps([generation, *versions]).encode()).hexdigest()[:32]
    return Inputs(
        client_secret=secret,
        identity_ca=cas["identity"],
        smtp_ca=cas["smtp"],
        expires_at=expires_at,
        secret_metadata=obj.metadata,
        fingerprint=fingerprint,
    )


def proxy_for(spec: SmtpOAuthSpec, url_host: str) -> str | None:
    """``spec.proxy.url``, else the operator's HTTPS_PROXY unless NO_PROXY exempts the host.

    The environment is the cluster-wide default (the chart's ``proxy.httpsProxy``); a resource's own
    ``spec.proxy.url`` wins. MSAL's session ignores the environment (trust_env=False), so the choice is
    made here, once, for both endpoints.
    """
    if spec.proxy_url:
        return spec.proxy_url
    env = urllib.request.getproxies_environment()
    proxy = env.get("https")
    if not proxy or urllib.request.proxy_bypass_environment(url_host, env):  # type: ignore[attr-defined]  # stdlib, untyped
        return None
    proxy = proxy if "://" in proxy else f"http://{proxy}"
    problem = proxy_url_problem(proxy)
    if problem is not None:
        raise CheckFailed(
            Reason.INVALID_SPEC,
            f"the operator's HTTPS_PROXY ({strip_userinfo(proxy)}) {problem}; fix the chart's "
            "proxy.httpsProxy, or set spec.proxy.url",
            condition=ConditionType.SECRET_RESOLVED,
        )
    return proxy


def token_request(spec: SmtpOAuthSpec, inputs: Inputs) -> TokenRequest:
    return TokenRequest(
        authority_host=spec.authority_host,
        tenant_id=spec.tenant_id,
        client_id=spec.client_id,
        scope=spec.scope,
        client_secret=inputs.client_secret,
        ca_pem=inputs.identity_ca,
        proxy_url=proxy_for(spec, urlsplit(spec.authority_host).hostname or ""),
        timeout=spec.identity_timeout,
    )


def smtp_target(spec: SmtpOAuthSpec, inputs: Inputs) -> SmtpTarget:
    return SmtpTarget(
        host=spec.smtp_host,
        port=spec.smtp_port,
        implicit_tls=spec.implicit_tls,
        timeout=spec.connection_timeout,
        ca_pem=inputs.smtp_ca,
        proxy_url=proxy_for(spec, spec.smtp_host),
    )


async def run(
    spec: SmtpOAuthSpec,
    inputs: Inputs,
    tokens: TokenProvider,
    *,
    where: str,
    now: datetime | None = None,
) -> ConnectionTestResult:
    """Acquire a token and authenticate to SMTP; the result, never an exception, for CheckFailed."""
    started = now or datetime.now(UTC)
    clock = time.monotonic()
    try:
        request = token_request(spec, inputs)
        target = smtp_target(spec, inputs)
    except CheckFailed as exc:  # an unusable HTTPS_PROXY
        return ConnectionTestResult(
            failure=exc, tested_at=started, duration=0.0, fingerprint=inputs.fingerprint, scope=spec.scope
        )
    message = None
    if spec.test_message_to:
        message = Message(
            sender=spec.test_message_from or spec.username,
            to=(spec.test_message_to,),
            subject="smtp-oauth-operator connection test",
            body=f"This message tests the SMTP OAuth configuration {where}. No action is needed.\n",
        )
    failure: CheckFailed | None = None
    sent = False
    try:
        token = await tokens.acquire(request, owner=where)
        try:
            result = await authenticate(target, spec.username, token.value, message=message)
            sent = result.sent is not None
        except CheckFailed as exc:
            if exc.reason is Reason.AUTHENTICATION_REJECTED:
                tokens.invalidate(request)
            raise
    except CheckFailed as exc:
        failure = exc
    return ConnectionTestResult(
        failure=failure,
        tested_at=started,
        duration=time.monotonic() - clock,
        fingerprint=inputs.fingerprint,
        token_endpoint=request.token_endpoint,
        scope=spec.scope,
        smtp_endpoint=target.describe(),
        sent=sent,
    )


async def send_mail(
    spec: SmtpOAuthSpec, inputs: Inputs, tokens: TokenProvider, to: tuple[str, ...], subject: str, body: str
) -> None:
    """Send one message through this very configuration (alarm e-mails); raises CheckFailed."""
    token = await tokens.acquire(token_request(spec, inputs))
    await authenticate(
        smtp_target(spec, inputs),
        spec.username,
        token.value,
        message=Message(sender=spec.username, to=to, subject=subject, body=body),
    )
