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
import os
import ssl
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from smtp_oauth_operator.clients.identity import FederatedAssertion, TokenProvider, TokenRequest
from smtp_oauth_operator.clients.smtp import Message, SmtpResult, SmtpTarget, authenticate
from smtp_oauth_operator.domain.credentials import CertificateCredential, CertificateError, parse_certificate
from smtp_oauth_operator.domain.objects import ObjectSource, SourceObject
from smtp_oauth_operator.domain.reasons import CheckFailed, ConditionType, Reason
from smtp_oauth_operator.domain.redact import strip_userinfo
from smtp_oauth_operator.domain.spec import KeyRef, SmtpOAuthSpec, parse_time, proxy_url_problem
from smtp_oauth_operator.domain.status import ConnectionTestResult

__all__ = [
    "Inputs",
    "ObjectSource",
    "ServiceAccountTokens",
    "SourceObject",
    "resolve",
    "run",
    "send_mail",
    "token_file_reader",
    "token_request",
]

# Azure Workload Identity's webhook injects these into the operator's Pod (protocol-facts.md §6).
FEDERATED_TOKEN_FILE = "AZURE_FEDERATED_TOKEN_FILE"
TLS_SECRET_TYPE = "kubernetes.io/tls"


@runtime_checkable
class ServiceAccountTokens(Protocol):
    """Where ServiceAccount tokens come from: the API server's TokenRequest, or a file (the CLI)."""

    def assertion_source(self, namespace: str, service_account: str, audience: str) -> Callable[[], str]:
        """A function returning a fresh token; it raises CheckFailed (ServiceAccountNotFound,
        TokenRequestDenied) and is called from a worker thread."""
        ...


@dataclass(frozen=True, slots=True)
class Inputs:
    client_secret: str = field(repr=False)
    identity_ca: str | None
    smtp_ca: str | None
    expires_at: datetime | None
    secret_metadata: Mapping[str, Any]
    fingerprint: str
    certificate: CertificateCredential | None = None
    assertion: FederatedAssertion | None = None


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
    keys: list[tuple[str, str]] = sorted(spec.referenced_objects())
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


def _certificate(
    seen: _Seen, namespace: str, spec: SmtpOAuthSpec
) -> tuple[CertificateCredential, SourceObject]:
    assert spec.client_certificate is not None
    name = spec.client_certificate.secret_name
    obj = _take(seen, "Secret", name)
    if obj is None:
        raise CheckFailed(
            Reason.CERTIFICATE_NOT_FOUND,
            f"Secret {namespace}/{name} does not exist (has cert-manager issued the certificate yet?)",
        )
    if obj.type is not None and obj.type != TLS_SECRET_TYPE:
        raise CheckFailed(
            Reason.CERTIFICATE_INVALID,
            f"Secret {namespace}/{name} is of type {obj.type}, not {TLS_SECRET_TYPE}",
        )
    missing = [k for k in ("tls.crt", "tls.key") if not obj.data.get(k, "").strip()]
    if missing:
        raise CheckFailed(
            Reason.CERTIFICATE_INVALID, f"Secret {namespace}/{name} has no {' and no '.join(missing)}"
        )
    try:
        return parse_certificate(obj.data["tls.crt"], obj.data["tls.key"]), obj
    except CertificateError as exc:
        raise CheckFailed(Reason.CERTIFICATE_INVALID, f"Secret {namespace}/{name}: {exc}") from None


def _operator_assertion() -> FederatedAssertion:
    path = os.environ.get(FEDERATED_TOKEN_FILE)
    if not path:
        raise CheckFailed(
            Reason.SERVICE_ACCOUNT_NOT_FOUND,
            f"useOperatorIdentity is set but the operator has no federated token ({FEDERATED_TOKEN_FILE} "
            "is unset): label its ServiceAccount and Pod for Azure Workload Identity",
        )

    return FederatedAssertion(f"file:{path}", token_file_reader(path, "the operator's federated token"))


def token_file_reader(path: str, what: str) -> Callable[[], str]:
    """Reads a ServiceAccount token file on each call (kubelet rotates it); a failure is
    ServiceAccountNotFound naming ``what``, never the token."""

    def read() -> str:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read().strip()
        except OSError as exc:
            raise CheckFailed(
                Reason.SERVICE_ACCOUNT_NOT_FOUND,
                f"cannot read {what} {path} ({exc.strerror or 'unreadable'})",
            ) from None

    return read


def _check_operator_identity(spec: SmtpOAuthSpec) -> None:
    """useOperatorIdentity: the injected app must be the one the spec names, or the test would
    silently test another app."""
    for variable, value in (("AZURE_TENANT_ID", spec.tenant_id), ("AZURE_CLIENT_ID", spec.client_id)):
        injected = os.environ.get(variable)
        if injected and injected.lower() != value.lower():
            raise CheckFailed(
                Reason.INVALID_SPEC,
                f"useOperatorIdentity: the operator's {variable} is {injected}, the spec says {value}",
                condition=ConditionType.SECRET_RESOLVED,
            )
    host = os.environ.get("AZURE_AUTHORITY_HOST")
    if host and host.rstrip("/") != spec.authority_host.rstrip("/"):
        raise CheckFailed(
            Reason.INVALID_SPEC,
            f"useOperatorIdentity: the operator's AZURE_AUTHORITY_HOST is {host}, the spec's authority "
            f"host is {spec.authority_host}; set spec.identity.authorityHost or cloud to match",
            condition=ConditionType.SECRET_RESOLVED,
        )


def _federated(spec: SmtpOAuthSpec, namespace: str, source: ObjectSource) -> FederatedAssertion:
    wi = spec.workload_identity
    assert wi is not None
    if wi.use_operator_identity:
        _check_operator_identity(spec)
        return _operator_assertion()
    assert wi.service_account is not None
    if not isinstance(source, ServiceAccountTokens):
        raise CheckFailed(
            Reason.SERVICE_ACCOUNT_NOT_FOUND,
            f"no way to get a token of ServiceAccount {namespace}/{wi.service_account} here "
            "(the check command takes it with --token-file)",
        )
    fetch = source.assertion_source(namespace, wi.service_account, wi.audience)
    return FederatedAssertion(f"serviceaccount:{namespace}/{wi.service_account} aud={wi.audience}", fetch)


async def _resolve_other(
    spec: SmtpOAuthSpec, namespace: str, generation: int, source: ObjectSource, seen: _Seen
) -> Inputs:
    """A certificate or workload identity credential, plus the trust bundles."""
    certificate: CertificateCredential | None = None
    assertion: FederatedAssertion | None = None
    metadata: Mapping[str, Any] = {}
    versions: list[str] = []
    if spec.client_certificate is not None:
        certificate, obj = _certificate(seen, namespace, spec)
        metadata = obj.metadata
        versions.append(str(obj.metadata.get("resourceVersion", "")) + ":" + certificate.thumbprint_sha256)
    else:
        assertion = _federated(spec, namespace, source)
        versions.append(assertion.identity)
    cas = _bundles(seen, namespace, spec, versions)
    fingerprint = hashlib.sha256(json.dumps([generation, *versions]).encode()).hexdigest()[:32]
    return Inputs(
        client_secret="",
        identity_ca=cas["identity"],
        smtp_ca=cas["smtp"],
        expires_at=certificate.not_after if certificate else None,
        secret_metadata=metadata,
        fingerprint=fingerprint,
        certificate=certificate,
        assertion=assertion,
    )


def _bundles(seen: _Seen, namespace: str, spec: SmtpOAuthSpec, versions: list[str]) -> dict[str, str | None]:
    cas: dict[str, str | None] = {}
    for name, ca_ref in (("identity", spec.identity_ca), ("smtp", spec.smtp_ca)):
        if ca_ref is None:
            cas[name] = None
            continue
        pem, version = _value(seen, namespace, ca_ref)
        cas[name] = _check_pem(pem, ca_ref, namespace)
        versions.append(version)
    return cas


async def resolve(spec: SmtpOAuthSpec, namespace: str, generation: int, source: ObjectSource) -> Inputs:
    """Read everything the test needs from the referenced objects."""
    seen = await _read_all(source, namespace, spec)
    if spec.secret_ref is None:
        return await _resolve_other(spec, namespace, generation, source, seen)
    ref = spec.secret_ref
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
        certificate=inputs.certificate,
        send_certificate_chain=bool(
            spec.client_certificate and spec.client_certificate.send_certificate_chain
        ),
        assertion=inputs.assertion,
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


# Each step's timeouts are per socket operation; a peer that trickles bytes, or a thread stuck in a
# black-holed connection, could hold a worker for ever. A deadline per step bounds the whole step:
# a token request may take two round trips (metadata, then token), an SMTP session several.
DEADLINE_FACTOR = 2.0


async def _token(
    tokens: TokenProvider, request: TokenRequest, deadline: float | None = None, *, owner: str | None = None
) -> str:
    limit = deadline if deadline is not None else request.timeout * DEADLINE_FACTOR
    try:
        async with asyncio.timeout(limit):
            token = await tokens.acquire(request, owner=owner)
    except TimeoutError:
        raise CheckFailed(
            Reason.IDENTITY_PROVIDER_UNREACHABLE,
            f"the identity provider {urlsplit(request.authority_host).netloc} did not issue a token "
            f"within {limit:g} s",
        ) from None
    return token.value


async def _session(
    target: SmtpTarget, username: str, token: str, message: Message | None, deadline: float | None = None
) -> SmtpResult:
    limit = deadline if deadline is not None else target.timeout * DEADLINE_FACTOR
    try:
        async with asyncio.timeout(limit):
            return await authenticate(target, username, token, message=message)
    except TimeoutError:
        raise CheckFailed(
            Reason.SMTP_CONNECTION_TIMEOUT,
            f"the SMTP session with {target.describe()} did not end within {limit:g} s",
        ) from None


async def run(
    spec: SmtpOAuthSpec,
    inputs: Inputs,
    tokens: TokenProvider,
    *,
    where: str,
    now: datetime | None = None,
    deadline: float | None = None,
    send_message: bool = True,
) -> ConnectionTestResult:
    """Acquire a token and authenticate to SMTP; the result, never an exception, for CheckFailed.

    ``deadline`` bounds each step (default: twice its timeout); without ``send_message`` the test
    stops after AUTH even when spec.testMessage is set."""
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
    if spec.test_message_to and send_message:
        message = Message(
            sender=spec.test_message_from or spec.username,
            to=(spec.test_message_to,),
            subject="smtp-oauth-operator connection test",
            body=f"This message tests the SMTP OAuth configuration {where}. No action is needed.\n",
        )
    failure: CheckFailed | None = None
    sent = False
    try:
        token = await _token(tokens, request, deadline, owner=where)
        try:
            result = await _session(target, spec.username, token, message, deadline)
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
    token = await _token(tokens, token_request(spec, inputs))
    await _session(
        smtp_target(spec, inputs),
        spec.username,
        token,
        Message(sender=spec.username, to=to, subject=subject, body=body),
    )
