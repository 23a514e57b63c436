"""The closed set of reasons a connection test can end with, and what each one means.

This is the one place where a reason is *defined*: its condition (the step that failed), whether it is
transient (retry with backoff) or needs a change from a human (wait), and the one-sentence remedy that
goes into Events, conditions and the README's troubleshooting table. Where a reason is *decided* from a
vendor error lives next to the vendor: ``clients/identity.py`` (MSAL, Entra ID) and ``clients/smtp.py``
(aiosmtplib, Exchange Online).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "CheckFailed",
    "ConditionType",
    "Reason",
    "ReasonInfo",
    "info",
]


class ConditionType(enum.StrEnum):
    """Condition types written to ``status.conditions``."""

    READY = "Ready"
    SECRET_RESOLVED = "SecretResolved"
    TOKEN_ACQUIRED = "TokenAcquired"
    SMTP_AUTHENTICATED = "SmtpAuthenticated"
    CREDENTIAL_EXPIRING = "CredentialExpiring"
    SECRET_PROTECTED = "SecretProtected"
    EXPIRY_DISCOVERED = "ExpiryDiscovered"
    RENEWAL = "Renewal"


class Reason(enum.StrEnum):
    """Reasons of the connection test (the contract of the Ready condition)."""

    # success, and the per-step reasons of the sub-conditions
    CONNECTION_TESTED = "ConnectionTested"
    RESOLVED = "Resolved"
    TOKEN_ISSUED = "TokenIssued"
    AUTHENTICATED = "Authenticated"
    NOT_TESTED = "NotTested"
    # resolving references
    SECRET_NOT_FOUND = "SecretNotFound"
    SECRET_KEY_NOT_FOUND = "SecretKeyNotFound"
    CA_BUNDLE_NOT_FOUND = "CaBundleNotFound"
    INVALID_SPEC = "InvalidSpec"
    ACCESS_DENIED = "AccessDenied"
    # identity provider
    TENANT_NOT_FOUND = "TenantNotFound"
    APPLICATION_NOT_FOUND = "ApplicationNotFound"
    INVALID_CLIENT_SECRET = "InvalidClientSecret"
    CLIENT_SECRET_EXPIRED = "ClientSecretExpired"
    INVALID_SCOPE = "InvalidScope"
    # certificate and federated credentials (domain/credentials.py, clients/identity.py)
    CERTIFICATE_NOT_FOUND = "CertificateNotFound"
    CERTIFICATE_INVALID = "CertificateInvalid"
    CERTIFICATE_EXPIRED = "CertificateExpired"
    CERTIFICATE_NOT_REGISTERED = "CertificateNotRegistered"
    FEDERATED_CREDENTIAL_MISMATCH = "FederatedCredentialMismatch"
    SERVICE_ACCOUNT_NOT_FOUND = "ServiceAccountNotFound"
    TOKEN_REQUEST_DENIED = "TokenRequestDenied"
    CLOCK_SKEW = "ClockSkew"
    ISSUER_UNREACHABLE = "IssuerUnreachable"
    THROTTLED = "Throttled"
    IDENTITY_PROVIDER_UNAVAILABLE = "IdentityProviderUnavailable"
    IDENTITY_PROVIDER_UNREACHABLE = "IdentityProviderUnreachable"
    # either endpoint
    TLS_VERIFICATION_FAILED = "TLSVerificationFailed"
    # SMTP server
    SMTP_CONNECTION_TIMEOUT = "SmtpConnectionTimeout"
    SMTP_CONNECTION_REFUSED = "SmtpConnectionRefused"
    STARTTLS_NOT_OFFERED = "StartTLSNotOffered"
    XOAUTH2_NOT_OFFERED = "XOAuth2NotOffered"
    AUTHENTICATION_REJECTED = "AuthenticationRejected"
    SMTP_AUTH_DISABLED = "SmtpAuthDisabled"
    SEND_REJECTED = "SendRejected"
    UNEXPECTED_RESPONSE = "UnexpectedResponse"
    # client secret expiry (domain/expiry.py)
    NOT_EXPIRING = "NotExpiring"
    EXPIRING_SOON = "ExpiringSoon"
    EXPIRED = "Expired"
    EXPIRY_UNKNOWN = "ExpiryUnknown"
    # secret protection (domain/protection.py)
    PROTECTED = "Protected"
    NOT_SEALED = "NotSealed"
    NOT_EXCLUDED_FROM_BACKUP = "NotExcludedFromBackup"
    POLICY_IGNORED = "PolicyIgnored"
    SECRET_NOT_PROTECTED = "SecretNotProtected"
    # expiry discovery from Microsoft Graph (domain/discovery.py, clients/graph.py)
    DISCOVERED = "Discovered"
    CREDENTIAL_NOT_LISTED = "CredentialNotListed"
    CREDENTIAL_AMBIGUOUS = "CredentialAmbiguous"
    GRAPH_ACCESS_DENIED = "GraphAccessDenied"
    GRAPH_APPLICATION_NOT_FOUND = "GraphApplicationNotFound"
    GRAPH_THROTTLED = "GraphThrottled"
    GRAPH_UNAVAILABLE = "GraphUnavailable"
    # renewal through Microsoft Graph (services/renewal.py; the Renewal condition)
    RENEWAL_SCHEDULED = "RenewalScheduled"
    RENEWING = "Renewing"
    RENEWED = "Renewed"
    RENEWAL_FAILED = "RenewalFailed"


@dataclass(frozen=True, slots=True)
class ReasonInfo:
    """What the operator and the user need to know about one reason."""

    condition: ConditionType
    transient: bool
    remedy: str


_S = ConditionType.SECRET_RESOLVED
_T = ConditionType.TOKEN_ACQUIRED
_M = ConditionType.SMTP_AUTHENTICATED
_E = ConditionType.CREDENTIAL_EXPIRING
_P = ConditionType.SECRET_PROTECTED
_D = ConditionType.EXPIRY_DISCOVERED
_R = ConditionType.RENEWAL

_INFO: dict[Reason, ReasonInfo] = {
    Reason.RENEWAL_SCHEDULED: ReasonInfo(_R, transient=False, remedy="Nothing to do."),
    Reason.RENEWING: ReasonInfo(_R, transient=False, remedy="Nothing to do: one step per pass until done."),
    Reason.RENEWED: ReasonInfo(_R, transient=False, remedy="Nothing to do."),
    Reason.RENEWAL_FAILED: ReasonInfo(
        _R,
        transient=True,
        remedy="The message names the step and what refused it (Graph permission, RBAC, the test): fix that "
        "and the step is retried by itself; the credential in use keeps working meanwhile.",
    ),
    Reason.CONNECTION_TESTED: ReasonInfo(
        ConditionType.READY, transient=False, remedy="Nothing to do: the configuration works."
    ),
    Reason.RESOLVED: ReasonInfo(_S, transient=False, remedy="Nothing to do."),
    Reason.TOKEN_ISSUED: ReasonInfo(_T, transient=False, remedy="Nothing to do."),
    Reason.AUTHENTICATED: ReasonInfo(_M, transient=False, remedy="Nothing to do."),
    Reason.NOT_TESTED: ReasonInfo(
        ConditionType.READY, transient=False, remedy="Fix the step that failed first; this one runs after it."
    ),
    Reason.NOT_EXPIRING: ReasonInfo(_E, transient=False, remedy="Nothing to do yet."),
    Reason.EXPIRING_SOON: ReasonInfo(
        _E,
        transient=False,
        remedy="Create a new client secret in Entra ID, then update the Secret and the expiry date.",
    ),
    Reason.EXPIRED: ReasonInfo(
        _E,
        transient=False,
        remedy="Create a new client secret in Entra ID and update the Secret and the expiry date now.",
    ),
    Reason.EXPIRY_UNKNOWN: ReasonInfo(
        _E,
        transient=False,
        remedy="Set spec.identity.clientSecret.expiresAt (or expiresAtKey) to the date Entra ID shows.",
    ),
    Reason.PROTECTED: ReasonInfo(_P, transient=False, remedy="Nothing to do."),
    Reason.NOT_SEALED: ReasonInfo(
        _P,
        transient=False,
        remedy="Manage the Secret with a SealedSecret (or an ExternalSecret) so that only ciphertext is "
        "committed and backed up.",
    ),
    Reason.NOT_EXCLUDED_FROM_BACKUP: ReasonInfo(
        _P,
        transient=False,
        remedy="Label the Secret velero.io/exclude-from-backup=true (for Sealed Secrets: in the "
        "SealedSecret's spec.template.metadata.labels).",
    ),
    Reason.POLICY_IGNORED: ReasonInfo(
        _P, transient=False, remedy="Nothing to do: spec.secretPolicy is Ignore."
    ),
    Reason.SECRET_NOT_FOUND: ReasonInfo(
        _S,
        transient=False,
        remedy="Create the Secret (or the SealedSecret that unseals into it) in the same namespace.",
    ),
    Reason.SECRET_KEY_NOT_FOUND: ReasonInfo(
        _S, transient=False, remedy="Add the key to the Secret or fix the key name in the reference."
    ),
    Reason.CA_BUNDLE_NOT_FOUND: ReasonInfo(
        _S,
        transient=False,
        remedy="Create the referenced ConfigMap or Secret key holding PEM certificates, or fix the "
        "reference.",
    ),
    Reason.ACCESS_DENIED: ReasonInfo(
        _S,
        transient=True,
        remedy="Grant the operator's ServiceAccount get, list and watch on Secrets and ConfigMaps in "
        "this namespace (the chart's rbac values).",
    ),
    Reason.INVALID_SPEC: ReasonInfo(_S, transient=False, remedy="Fix the spec field named in the message."),
    Reason.TENANT_NOT_FOUND: ReasonInfo(
        _T,
        transient=False,
        remedy="Check spec.identity.tenantId (directory ID or verified domain) and spec.identity.cloud.",
    ),
    Reason.APPLICATION_NOT_FOUND: ReasonInfo(
        _T,
        transient=False,
        remedy="Check spec.identity.clientId: it must be the Application (client) ID of an app "
        "registered in this tenant.",
    ),
    Reason.INVALID_CLIENT_SECRET: ReasonInfo(
        _T,
        transient=False,
        remedy="Put the client secret's Value (not its Secret ID) from Entra ID into the Secret.",
    ),
    Reason.CLIENT_SECRET_EXPIRED: ReasonInfo(
        _T,
        transient=False,
        remedy="Create a new client secret in Entra ID, update the Secret and "
        "spec.identity.clientSecret.expiresAt.",
    ),
    Reason.INVALID_SCOPE: ReasonInfo(
        _T,
        transient=False,
        remedy="Use the scope https://outlook.office365.com/.default (or your cloud's equivalent) and "
        "make sure Exchange Online exists in the tenant.",
    ),
    Reason.CERTIFICATE_NOT_FOUND: ReasonInfo(
        _S,
        transient=False,
        remedy="Create the kubernetes.io/tls Secret named in spec.identity.clientCertificate.secretRef "
        "(for example with cert-manager) in the same namespace.",
    ),
    Reason.CERTIFICATE_INVALID: ReasonInfo(
        _S,
        transient=False,
        remedy="Put the certificate (leaf first) in tls.crt and its unencrypted RSA private key in "
        "tls.key of a kubernetes.io/tls Secret.",
    ),
    Reason.CERTIFICATE_EXPIRED: ReasonInfo(
        _S,
        transient=False,
        remedy="Issue a new certificate, upload it to the app registration and update the TLS Secret.",
    ),
    Reason.CERTIFICATE_NOT_REGISTERED: ReasonInfo(
        _T,
        transient=False,
        remedy="Upload the certificate (the thumbprint in the message) to the app registration under "
        "Certificates & secrets.",
    ),
    Reason.FEDERATED_CREDENTIAL_MISMATCH: ReasonInfo(
        _T,
        transient=False,
        remedy="Make the app's federated credential match the issuer, subject and audience quoted in the "
        "message exactly (matching is case-sensitive).",
    ),
    Reason.SERVICE_ACCOUNT_NOT_FOUND: ReasonInfo(
        _S,
        transient=False,
        remedy="Create the ServiceAccount named in spec.identity.workloadIdentity.serviceAccountName in "
        "the resource's namespace.",
    ),
    Reason.TOKEN_REQUEST_DENIED: ReasonInfo(
        _S,
        transient=False,
        remedy="Grant the operator create on serviceaccounts/token in this namespace (the chart's "
        "rbac.serviceAccountTokens value).",
    ),
    Reason.CLOCK_SKEW: ReasonInfo(
        _T,
        transient=True,
        remedy="Synchronise the clocks (NTP) of the cluster's nodes: Entra ID found the assertion outside "
        "its valid time range.",
    ),
    Reason.ISSUER_UNREACHABLE: ReasonInfo(
        _T,
        transient=True,
        remedy="Publish the cluster's service-account issuer discovery document and keys where Entra ID "
        "can fetch them (the issuer URL over public HTTPS).",
    ),
    Reason.THROTTLED: ReasonInfo(
        _T, transient=True, remedy="Wait: the operator retries after the delay Entra ID asked for."
    ),
    Reason.IDENTITY_PROVIDER_UNAVAILABLE: ReasonInfo(
        _T, transient=True, remedy="Wait: the identity provider failed; the operator retries."
    ),
    Reason.IDENTITY_PROVIDER_UNREACHABLE: ReasonInfo(
        _T,
        transient=True,
        remedy="Allow egress to the token endpoint on port 443, or set spec.proxy.url to your HTTP proxy.",
    ),
    Reason.TLS_VERIFICATION_FAILED: ReasonInfo(
        _T,
        transient=False,
        remedy="Add the issuing CA (e.g. your TLS-inspecting proxy's) as a caBundle for that endpoint.",
    ),
    Reason.SMTP_CONNECTION_TIMEOUT: ReasonInfo(
        _M,
        transient=True,
        remedy="Allow egress to the SMTP host and port (587 is often blocked), or set spec.proxy.url.",
    ),
    Reason.SMTP_CONNECTION_REFUSED: ReasonInfo(
        _M, transient=True, remedy="Check spec.smtp.host and spec.smtp.port and the network path."
    ),
    Reason.STARTTLS_NOT_OFFERED: ReasonInfo(
        _M,
        transient=False,
        remedy="Point spec.smtp at a server that offers STARTTLS (smtp.office365.com:587) or use "
        "tls: ImplicitTLS on port 465.",
    ),
    Reason.XOAUTH2_NOT_OFFERED: ReasonInfo(
        _M,
        transient=False,
        remedy="The server does not accept OAuth: use smtp.office365.com or your cloud's SMTP host.",
    ),
    Reason.AUTHENTICATION_REJECTED: ReasonInfo(
        _M,
        transient=False,
        remedy="Grant SMTP.SendAsApp with admin consent, register the service principal "
        "(New-ServicePrincipal) and give it FullAccess on the mailbox (Add-MailboxPermission).",
    ),
    Reason.SMTP_AUTH_DISABLED: ReasonInfo(
        _M,
        transient=False,
        remedy="Enable SMTP AUTH for the mailbox (Set-CASMailbox -SmtpClientAuthenticationDisabled "
        "$false) or the tenant (Set-TransportConfig).",
    ),
    Reason.SEND_REJECTED: ReasonInfo(
        _M,
        transient=False,
        remedy="Send as the authenticated mailbox, or grant it SendAs on the sender address.",
    ),
    Reason.UNEXPECTED_RESPONSE: ReasonInfo(
        _M,
        transient=True,
        remedy="Check that spec.smtp points at an Exchange Online SMTP endpoint; the reply is quoted.",
    ),
    Reason.SECRET_NOT_PROTECTED: ReasonInfo(
        ConditionType.SECRET_PROTECTED,
        transient=False,
        remedy="Unseal the Secret from a SealedSecret labelled velero.io/exclude-from-backup=true.",
    ),
    Reason.DISCOVERED: ReasonInfo(_D, transient=False, remedy="Nothing to do: Graph's expiry is used."),
    Reason.CREDENTIAL_NOT_LISTED: ReasonInfo(
        _D,
        transient=False,
        remedy="The credential in the Secret is not among the app's credentials in Graph: check "
        "spec.identity.clientId, or set expiresAt by hand.",
    ),
    Reason.CREDENTIAL_AMBIGUOUS: ReasonInfo(
        _D,
        transient=False,
        remedy="Several client secrets of the app start with the same three characters: remove the "
        "unused ones (the earliest expiry is used meanwhile).",
    ),
    Reason.GRAPH_ACCESS_DENIED: ReasonInfo(
        _D,
        transient=False,
        remedy="Grant the app the Microsoft Graph application permission Application.Read.All with admin "
        "consent (docs/credentials.md), or turn spec.identity.discovery.graph off.",
    ),
    Reason.GRAPH_APPLICATION_NOT_FOUND: ReasonInfo(
        _D,
        transient=False,
        remedy="Check spec.identity.clientId and the cloud: Graph has no application with that appId in "
        "the tenant.",
    ),
    Reason.GRAPH_THROTTLED: ReasonInfo(
        _D, transient=True, remedy="Wait: the operator reads Graph again after the delay Graph asked for."
    ),
    Reason.GRAPH_UNAVAILABLE: ReasonInfo(
        _D,
        transient=True,
        remedy="Check that spec.identity.discovery.graphHost (or the cloud's Graph host) is reachable "
        "through the proxy and trusted; the operator retries.",
    ),
}


def info(reason: Reason) -> ReasonInfo:
    """Return what is known about ``reason``."""
    return _INFO[reason]


class CheckFailed(Exception):
    """A step of the connection test failed for a classified reason.

    ``message`` is one sentence safe to show anywhere: callers never put secret or token values in it
    (the clients scrub the replies they quote). ``retry_after`` is the delay the peer asked for, if any.
    ``condition`` overrides the reason's default step where a reason can happen at either endpoint
    (``TLSVerificationFailed``).
    """

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        retry_after: float | None = None,
        condition: ConditionType | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        self.condition = condition or info(reason).condition

    @property
    def transient(self) -> bool:
        return info(self.reason).transient

    @property
    def remedy(self) -> str:
        return info(self.reason).remedy
