"""The SmtpOAuthConfig spec as typed values, parsed from the resource body.

The API server already enforces the CRD's schema and CEL rules; this parser exists because the `check`
CLI reads manifests that no API server has validated, and because an operator must survive objects
written before a schema tightened. It raises :class:`SpecError` with the field path, never a KeyError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

__all__ = [
    "CLOUDS",
    "DEFAULT_WARN_BEFORE_DAYS",
    "EARLIEST",
    "GROUP",
    "KIND",
    "LATEST",
    "PLURAL",
    "RECHECK_ANNOTATION",
    "VERSION",
    "ClientCertificate",
    "Cloud",
    "CredentialKind",
    "KeyRef",
    "RelaySpec",
    "SmtpOAuthSpec",
    "SpecError",
    "WorkloadIdentity",
    "parse_duration",
    "parse_spec",
    "parse_time",
    "proxy_url_problem",
    "recheck_token",
    "utc_time",
]

GROUP = "smtpoauth.dev"
VERSION = "v1alpha1"
PLURAL = "smtpoauthconfigs"
KIND = "SmtpOAuthConfig"
RECHECK_ANNOTATION = f"{GROUP}/recheck"
DEFAULT_WARN_BEFORE_DAYS: tuple[int, ...] = (30, 14, 7, 1)


@dataclass(frozen=True, slots=True)
class Cloud:
    authority_host: str
    scope: str
    smtp_host: str
    # The audience Entra ID expects in a federated (workload identity) assertion in this cloud.
    federation_audience: str = "api://AzureADTokenExchange"
    # Microsoft Graph's host, which is also its token resource (scope = graph_host + "/.default").
    graph_host: str = "https://graph.microsoft.com"

    @property
    def graph_scope(self) -> str:
        return f"{self.graph_host}/.default"


# Sovereign-cloud endpoints are community-sourced (protocol-facts.md §7): every one can be overridden.
CLOUDS: dict[str, Cloud] = {
    "AzurePublic": Cloud(
        "https://login.microsoftonline.com",
        "https://outlook.office365.com/.default",
        "smtp.office365.com",
    ),
    "AzureUSGovernment": Cloud(
        "https://login.microsoftonline.us",
        "https://outlook.office365.us/.default",
        "smtp.office365.us",
        "api://AzureADTokenExchangeUSGov",
        "https://graph.microsoft.us",
    ),
    "AzureChina": Cloud(
        "https://login.partner.microsoftonline.cn",
        "https://partner.outlook.cn/.default",
        "smtp.partner.outlook.cn",
        "api://AzureADTokenExchangeChina",
        "https://microsoftgraph.chinacloudapi.cn",
    ),
}


class SpecError(ValueError):
    """The spec cannot be used; ``field`` is the JSON path of the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"spec.{field}: {problem}" if field else f"spec: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class KeyRef:
    """A key in a Secret or ConfigMap of the resource's namespace."""

    kind: Literal["Secret", "ConfigMap"]
    name: str
    key: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r} key {self.key!r}"


CredentialKind = Literal["ClientSecret", "ClientCertificate", "WorkloadIdentity"]


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A kubernetes.io/tls Secret (tls.crt, tls.key) whose certificate is registered on the app."""

    secret_name: str
    send_certificate_chain: bool = False
    renewal_grace: timedelta | None = None  # clientCertificate.renewal.gracePeriod; None: renewal off


@dataclass(frozen=True, slots=True)
class Renewal:
    """spec.identity.clientSecret.renewal: add a new secret this long before expiry, valid this long, and
    remove the old one this long after the switch."""

    renew_before: timedelta
    validity: timedelta
    grace_period: timedelta


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """Federation: a ServiceAccount token of the resource's namespace (or the operator's own) is the
    client assertion. ``service_account`` is None exactly when ``use_operator_identity``."""

    service_account: str | None
    audience: str
    use_operator_identity: bool = False

    def subject(self, namespace: str) -> str | None:
        """The federated credential's subject Entra ID must hold for this ServiceAccount."""
        if self.service_account is None:
            return None
        return f"system:serviceaccount:{namespace}:{self.service_account}"


@dataclass(frozen=True, slots=True)
class RelaySpec:
    """``spec.relay``: who may log in to the relay for this configuration and what they may send."""

    credentials_secret: str
    allowed_senders: tuple[str, ...]
    messages_per_minute: int = 30
    recipients_per_day: int = 10_000

    def allows(self, address: str) -> bool:
        return address.lower() in {a.lower() for a in self.allowed_senders}


@dataclass(frozen=True, slots=True)
class SmtpOAuthSpec:
    username: str
    smtp_host: str
    smtp_port: int
    implicit_tls: bool
    connection_timeout: float
    smtp_ca: KeyRef | None
    tenant_id: str
    client_id: str
    cloud: str
    authority_host: str
    scope: str
    identity_timeout: float
    identity_ca: KeyRef | None
    secret_ref: KeyRef | None
    expires_at: datetime | None
    expires_at_key: str | None
    proxy_url: str | None = field(repr=False)  # may carry credentials (user:password@)
    test_message_to: str | None
    test_message_from: str | None
    recheck_interval: timedelta
    warn_before_days: tuple[int, ...] = DEFAULT_WARN_BEFORE_DAYS
    notify_to: tuple[str, ...] = ()
    secret_policy: Literal["Warn", "Require", "Ignore"] = "Warn"
    client_certificate: ClientCertificate | None = None
    workload_identity: WorkloadIdentity | None = None
    discover_graph: bool = False  # spec.identity.discovery.graph
    renewal: Renewal | None = None  # spec.identity.clientSecret.renewal
    graph_host: str = "https://graph.microsoft.com"  # where Graph is reached (overridable for tests)

    @property
    def graph_scope(self) -> str:
        """Graph's token scope: the cloud's Graph resource, whatever host serves it."""
        return CLOUDS[self.cloud].graph_scope

    @property
    def credential_kind(self) -> CredentialKind:
        if self.client_certificate is not None:
            return "ClientCertificate"
        if self.workload_identity is not None:
            return "WorkloadIdentity"
        return "ClientSecret"

    @property
    def renews(self) -> bool:
        """A renewal is configured: clientSecret.renewal, or clientCertificate.renewal."""
        cert = self.client_certificate
        return self.renewal is not None or (cert is not None and cert.renewal_grace is not None)

    @property
    def credential_secret(self) -> str | None:
        """The name of the Secret holding the credential (client secret or private key), if any."""
        if self.client_certificate is not None:
            return self.client_certificate.secret_name
        return self.secret_ref.name if self.secret_ref is not None else None

    def referenced_objects(self) -> set[tuple[Literal["Secret", "ConfigMap"], str]]:
        """(kind, name) of every object in the resource's namespace whose change calls for a new test."""
        refs: set[tuple[Literal["Secret", "ConfigMap"], str]] = set()
        secret = self.credential_secret
        if secret is not None:
            refs.add(("Secret", secret))
        for ref in (self.identity_ca, self.smtp_ca):
            if ref is not None:
                refs.add((ref.kind, ref.name))
        return refs

    relay: RelaySpec | None = None  # None: not relayed (unset, or enabled false)

    @property
    def authority(self) -> str:
        return f"{self.authority_host.rstrip('/')}/{self.tenant_id}"

    @property
    def token_endpoint(self) -> str:
        """The endpoint Entra ID serves for this tenant (ISE's auto-populated field)."""
        return f"{self.authority}/oauth2/v2.0/token"


# Digit counts bounded so that no value overflows Go's time.Duration (the CRD's CEL duration()) or timedelta.
_DURATION = re.compile(r"^(?:([0-9]{1,6})h)?(?:([0-9]{1,7})m)?(?:([0-9]{1,8})s)?$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]{2,63}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_DNS1123 = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def recheck_token(annotations: Mapping[str, Any] | None) -> str | None:
    """The ``smtpoauth.dev/recheck`` annotation as stored in status.handledRecheck (≤ 1024 chars)."""
    if not isinstance(annotations, Mapping):
        return None
    value = annotations.get(RECHECK_ANNOTATION)
    if value is None:
        return None
    value = str(value)
    if len(value) <= 128:
        return value
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


_LONG_DURATION = re.compile(r"^(?:([0-9]{1,4})d)?(?:([0-9]{1,6})h)?(?:([0-9]{1,7})m)?(?:([0-9]{1,8})s)?$")


def parse_long_duration(text: str) -> timedelta:
    """A duration that may start with days (``30d``, ``180d``, ``1d12h``, ``90s``)."""
    match = _LONG_DURATION.match(text.strip()) if isinstance(text, str) else None
    if not match or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration like 30d, 24h or 1d12h")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def parse_duration(text: str) -> timedelta:
    """Parse a Go-style duration limited to hours, minutes and seconds (``1h30m``, ``90s``)."""
    match = _DURATION.match(text.strip()) if text else None
    if not match or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration like 1h, 30m or 1h30m")
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return timedelta(hours=hours, minutes=minutes, seconds=seconds)


# Times are kept in UTC and written back as RFC 3339 with a four-digit year (status, Events, metrics):
# 9999-12-31T23:59:59-05:00 is valid RFC 3339, but lies in the year 10000 once in UTC.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)


def utc_time(moment: datetime, what: str) -> datetime:
    """``moment`` in UTC (naive means UTC), or ValueError when it is outside 1970..9999 in UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    problem = f"{what} is outside 1970-01-01 to 9999-12-31T23:59:59Z"
    try:
        moment = moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(problem) from None
    if not EARLIEST <= moment <= LATEST:
        raise ValueError(problem)
    return moment


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (``2027-05-31T00:00:00Z``) or a bare date into an aware UTC time.

    Raises ValueError (never OverflowError) for anything that is not a time between 1970 and 9999 UTC.
    """
    value = text.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        value += "T00:00:00+00:00"
    value = value.replace("z", "Z")
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text[:64]!r} is not an RFC 3339 time like 2027-05-31T00:00:00Z") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{text[:64]!r} has no time zone (use Z for UTC)")
    return utc_time(parsed, repr(text[:64]))


class _Reader:
    """Typed access to a nested mapping that reports the JSON path of a bad field."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise SpecError(path, "must be an object")
        self.data = data
        self.path = path

    def _p(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def sub(self, key: str) -> _Reader:
        return _Reader(self.data.get(key), self._p(key))

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def text(self, key: str, default: str | None = None) -> str:
        value = self.data.get(key, default)
        if value is None:
            raise SpecError(self._p(key), "is required")
        if not isinstance(value, str) or not value.strip():
            raise SpecError(self._p(key), "must be a non-empty string")
        return value.strip()

    def opt_text(self, key: str) -> str | None:
        return self.text(key) if self.has(key) else None

    def int(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(self._p(key), "must be an integer")
        if not lo <= value <= hi:
            raise SpecError(self._p(key), f"must be between {lo} and {hi}")
        return value

    def enum(self, key: str, default: str, allowed: Sequence[str]) -> str:
        value = self.text(key, default)
        if value not in allowed:
            raise SpecError(self._p(key), f"must be one of {', '.join(allowed)}")
        return value

    def key_ref(self, key: str) -> KeyRef | None:
        if not self.has(key):
            return None
        ref = self.sub(key)
        kinds = [k for k in ("secretKeyRef", "configMapKeyRef") if ref.has(k)]
        if len(kinds) != 1:
            raise SpecError(ref.path, "needs exactly one of secretKeyRef or configMapKeyRef")
        inner = ref.sub(kinds[0])
        kind: Literal["Secret", "ConfigMap"] = "Secret" if kinds[0] == "secretKeyRef" else "ConfigMap"
        return KeyRef(kind, inner.text("name"), inner.text("key"))


def _https_url(value: str, path: str) -> str:
    if not re.fullmatch(r"https://[^\s/]+(/[^\s]*)?", value):
        raise SpecError(path, "must be an https:// URL")
    return value.rstrip("/")


def proxy_url_problem(value: str) -> str | None:
    """What is wrong with a proxy URL (spec.proxy.url or the operator's HTTPS_PROXY), if anything.

    Only plain ``http://`` proxies: the CONNECT tunnel carries TLS end to end to Entra ID and Exchange
    either way, and an ``https://`` URL (TLS to the proxy itself) used to get a plaintext CONNECT on
    port 80 for SMTP. It is refused with the fix rather than guessed at.
    """
    if value.lower().startswith("https://"):
        return (
            "https:// (TLS to the proxy) is not supported: use http://host:port; the tunnel through the "
            "proxy is TLS to Entra ID and Exchange anyway"
        )
    if not re.fullmatch(r"http://[^\s/]+/?", value):
        return "must be http://host:port"
    try:
        port = urlsplit(value).port
    except ValueError:
        return "has an invalid port"
    if port == 0:
        return "has an invalid port"
    return None


def _proxy_url(value: str, path: str) -> str:
    problem = proxy_url_problem(value)
    if problem is not None:
        raise SpecError(path, problem)
    return value.rstrip("/")


def parse_spec(spec: Any) -> SmtpOAuthSpec:
    """Turn ``body['spec']`` into an :class:`SmtpOAuthSpec`, applying the CRD's defaults."""
    r = _Reader(spec, "")
    username = r.text("username")
    if not _EMAIL.match(username):
        raise SpecError("username", "must be a mailbox address like no-reply@contoso.com")

    smtp = r.sub("smtp")
    tls = smtp.enum("tls", "StartTLS", ("StartTLS", "ImplicitTLS"))

    ident = r.sub("identity")
    cloud_name = ident.enum("cloud", "AzurePublic", tuple(CLOUDS))
    cloud = CLOUDS[cloud_name]
    tenant_id = ident.text("tenantId")
    if not (_GUID.match(tenant_id) or _DOMAIN.match(tenant_id)):
        raise SpecError("identity.tenantId", "must be a directory (tenant) GUID or a verified domain")
    client_id = ident.text("clientId")
    if not _GUID.match(client_id):
        raise SpecError("identity.clientId", "must be the application (client) ID, a GUID")
    authority_host = _https_url(ident.text("authorityHost", cloud.authority_host), "identity.authorityHost")
    scope = ident.text("scope", cloud.scope)
    if not scope.endswith("/.default"):
        # The client-credentials flow only grants a resource's /.default scope (AADSTS1002012 otherwise).
        raise SpecError(
            "identity.scope", "must end in /.default, e.g. https://outlook.office365.com/.default"
        )

    secret_ref, expires_at, expires_at_key, certificate, workload = _parse_credential(ident, cloud)
    discovery = ident.sub("discovery")
    discover_graph = discovery.data.get("graph", False)
    if not isinstance(discover_graph, bool):
        raise SpecError("identity.discovery.graph", "must be true or false")
    graph_host = _https_url(discovery.text("graphHost", cloud.graph_host), "identity.discovery.graphHost")
    secret_r = ident.sub("clientSecret")
    renewal = _parse_renewal(secret_r.sub("renewal"), discover_graph) if secret_r.has("renewal") else None
    cert_r = ident.sub("clientCertificate")
    if certificate is not None and cert_r.has("renewal"):
        grace = _parse_certificate_renewal(cert_r.sub("renewal"), discover_graph)
        certificate = dataclasses.replace(certificate, renewal_grace=grace)

    proxy_url = r.sub("proxy").opt_text("url")
    if proxy_url is not None:
        proxy_url = _proxy_url(proxy_url, "proxy.url")

    test_to = r.sub("testMessage").opt_text("to")
    if test_to is not None and not _EMAIL.match(test_to):
        raise SpecError("testMessage.to", "must be a mail address")
    test_from = r.sub("testMessage").opt_text("from")
    if test_from is not None and not _EMAIL.match(test_from):
        raise SpecError("testMessage.from", "must be a mail address")

    try:
        recheck = parse_duration(r.text("recheckInterval", "1h"))
    except ValueError as exc:
        raise SpecError("recheckInterval", str(exc)) from None
    if recheck < timedelta(minutes=1):
        raise SpecError("recheckInterval", "must be at least 1m")

    alarms = r.sub("alarms")
    warn_raw = alarms.data.get("warnBeforeDays", list(DEFAULT_WARN_BEFORE_DAYS))
    if not isinstance(warn_raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 3650 for d in warn_raw
    ):
        raise SpecError("alarms.warnBeforeDays", "must be a list of whole days between 1 and 3650")
    if len(warn_raw) > 10:
        raise SpecError("alarms.warnBeforeDays", "must have at most 10 items")
    notify_raw = alarms.sub("notify").data.get("to", [])
    if not isinstance(notify_raw, list) or not all(
        isinstance(a, str) and _EMAIL.match(a) for a in notify_raw
    ):
        raise SpecError("alarms.notify.to", "must be a list of mail addresses")
    if len(notify_raw) > 20:
        raise SpecError("alarms.notify.to", "must have at most 20 items")

    policy = r.enum("secretPolicy", "Warn", ("Warn", "Require", "Ignore"))
    relay = _relay(r.sub("relay"), username)

    return SmtpOAuthSpec(
        username=username,
        smtp_host=smtp.text("host", cloud.smtp_host),
        smtp_port=smtp.int("port", 465 if tls == "ImplicitTLS" else 587, 1, 65535),
        implicit_tls=tls == "ImplicitTLS",
        connection_timeout=float(smtp.int("connectionTimeoutSeconds", 60, 1, 300)),
        smtp_ca=smtp.key_ref("caBundle"),
        tenant_id=tenant_id,
        client_id=client_id,
        cloud=cloud_name,
        authority_host=authority_host,
        scope=scope,
        identity_timeout=float(ident.int("timeoutSeconds", 30, 1, 300)),
        identity_ca=ident.key_ref("caBundle"),
        secret_ref=secret_ref,
        expires_at=expires_at,
        expires_at_key=expires_at_key,
        proxy_url=proxy_url,
        test_message_to=test_to,
        test_message_from=test_from,
        recheck_interval=recheck,
        warn_before_days=tuple(sorted(set(warn_raw), reverse=True)),
        notify_to=tuple(notify_raw),
        secret_policy=policy,  # type: ignore[arg-type]  # enum() checked it
        client_certificate=certificate,
        workload_identity=workload,
        discover_graph=discover_graph,
        graph_host=graph_host.rstrip("/"),
        renewal=renewal,
        relay=relay,
    )


def _relay(r: _Reader, username: str) -> RelaySpec | None:
    enabled = r.data.get("enabled", False)
    if not isinstance(enabled, bool):
        raise SpecError("relay.enabled", "must be true or false")
    if not enabled:
        return None
    if not r.has("credentialsSecretRef"):
        raise SpecError("relay.credentialsSecretRef", "is required when the relay is enabled")
    secret = r.sub("credentialsSecretRef").text("name")
    senders_raw = r.data.get("allowedSenders", [username])
    if not isinstance(senders_raw, list) or not all(
        isinstance(a, str) and _EMAIL.match(a) for a in senders_raw
    ):
        raise SpecError("relay.allowedSenders", "must be a list of mail addresses")
    if not 1 <= len(senders_raw) <= 20:
        raise SpecError("relay.allowedSenders", "must have 1 to 20 items")
    return RelaySpec(
        credentials_secret=secret,
        allowed_senders=tuple(dict.fromkeys(senders_raw)),
        messages_per_minute=r.int("messagesPerMinute", 30, 1, 10_000),
        recipients_per_day=r.int("recipientsPerDay", 10_000, 1, 1_000_000),
    )


def _parse_renewal(r: _Reader, discover_graph: bool) -> Renewal | None:
    path = "identity.clientSecret.renewal"
    if not discover_graph:
        raise SpecError(path, "needs identity.discovery.graph: true (renewal starts from Graph's expiry)")
    values = {}
    for key, default in (("renewBefore", "30d"), ("validity", "180d"), ("gracePeriod", "24h")):
        try:
            values[key] = parse_long_duration(r.text(key, default))
        except ValueError as exc:
            raise SpecError(f"{path}.{key}", str(exc)) from None
    if not timedelta(minutes=1) <= values["validity"] <= timedelta(days=730):
        raise SpecError(f"{path}.validity", "must be between 1m and 730d (Entra ID's longest secret)")
    if values["renewBefore"] >= values["validity"]:
        raise SpecError(f"{path}.renewBefore", "must be shorter than validity")
    return Renewal(values["renewBefore"], values["validity"], values["gracePeriod"])


def _parse_certificate_renewal(r: _Reader, discover_graph: bool) -> timedelta:
    path = "identity.clientCertificate.renewal"
    if not discover_graph:
        raise SpecError(
            path, "needs identity.discovery.graph: true (the registered certificates are read there)"
        )
    try:
        return parse_long_duration(r.text("gracePeriod", "24h"))
    except ValueError as exc:
        raise SpecError(f"{path}.gracePeriod", str(exc)) from None


_CredentialParts = tuple[
    KeyRef | None, datetime | None, str | None, ClientCertificate | None, WorkloadIdentity | None
]


def _parse_credential(ident: _Reader, cloud: Cloud) -> _CredentialParts:
    """Exactly one of clientSecret, clientCertificate and workloadIdentity (the CRD's CEL rule)."""
    kinds = [k for k in ("clientSecret", "clientCertificate", "workloadIdentity") if ident.has(k)]
    if len(kinds) != 1:
        raise SpecError("identity", "set exactly one of clientSecret, clientCertificate or workloadIdentity")
    if kinds[0] == "clientCertificate":
        cert = ident.sub("clientCertificate")
        name = cert.sub("secretRef").text("name")
        if not _DNS1123.match(name):
            raise SpecError("identity.clientCertificate.secretRef.name", "must be the name of a Secret")
        chain = cert.data.get("sendCertificateChain", False)
        if not isinstance(chain, bool):
            raise SpecError("identity.clientCertificate.sendCertificateChain", "must be true or false")
        return None, None, None, ClientCertificate(name, chain), None
    if kinds[0] == "workloadIdentity":
        wi = ident.sub("workloadIdentity")
        own = wi.data.get("useOperatorIdentity", False)
        if not isinstance(own, bool):
            raise SpecError("identity.workloadIdentity.useOperatorIdentity", "must be true or false")
        account = wi.opt_text("serviceAccountName")
        if (account is None) == (not own):
            raise SpecError(
                "identity.workloadIdentity",
                "set serviceAccountName or useOperatorIdentity: true, not both and not neither",
            )
        if account is not None and not _DNS1123.match(account):
            raise SpecError(
                "identity.workloadIdentity.serviceAccountName", "must be the name of a ServiceAccount"
            )
        audience = wi.text("audience", cloud.federation_audience)
        if len(audience) > 512 or any(c.isspace() for c in audience):
            raise SpecError(
                "identity.workloadIdentity.audience", "must be one word of at most 512 characters"
            )
        return None, None, None, None, WorkloadIdentity(account, audience, own)

    secret = ident.sub("clientSecret")
    secret_ref_r = secret.sub("secretKeyRef")
    secret_ref = KeyRef("Secret", secret_ref_r.text("name"), secret_ref_r.text("key"))
    expires_at: datetime | None = None
    if secret.has("expiresAt"):
        raw = secret.data["expiresAt"]
        try:
            # YAML (the check CLI) turns an unquoted timestamp into a datetime; JSON never does.
            expires_at = utc_time(raw, repr(str(raw))) if isinstance(raw, datetime) else parse_time(str(raw))
        except ValueError as exc:
            raise SpecError("identity.clientSecret.expiresAt", str(exc)) from None
    expires_at_key = secret.opt_text("expiresAtKey")
    if expires_at is not None and expires_at_key is not None:
        raise SpecError("identity.clientSecret", "set expiresAt or expiresAtKey, not both")
    return secret_ref, expires_at, expires_at_key, None, None
