"""Microsoft Graph: read an app registration's credentials, and where Graph failures are decided.

One request, ``GET {graph}/v1.0/applications(appId='…')?$select=id,passwordCredentials,keyCredentials``,
with a token for Graph's own resource (``https://graph.microsoft.com/.default`` in the public cloud;
one token can not carry both Graph's and Exchange's audience). requests is synchronous, so the call
runs in a thread; it trusts the same anchors as the token request (the system's plus
spec.identity.caBundle) and goes through the same proxy, never through environment variables.

Renewal writes: addPassword/removePassword (Application.ReadWrite.OwnedBy as an owner of the app), and
for a certificate addKey/removeKey, which need no permission when the app rolls its own keys (its own
token) but carry a proof of possession (domain.credentials.proof_of_possession) signed with a
certificate already registered on the app.

Graph's errors are ``{"error": {"code", "message", "innerError": {…}}}``: 403
``Authorization_RequestDenied`` (a missing permission), 404 ``Request_ResourceNotFound`` (no such
application in the tenant), 429 ``TooManyRequests`` with ``Retry-After``, and for addKey/removeKey 401
``Authentication_MissingOrMalformed`` (the proof was refused). Each becomes a reason of the
ExpiryDiscovered condition; nothing here decides Ready.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from smtp_oauth_operator.clients.identity import _trust, _TrustAdapter
from smtp_oauth_operator.domain.reasons import CheckFailed, Reason
from smtp_oauth_operator.domain.redact import quote_reply

__all__ = ["GraphRead", "add_key", "add_password", "read_application", "remove_key", "remove_password"]

SELECT = "id,passwordCredentials,keyCredentials"
_KEY_ACTIONS = frozenset({"addKey", "removeKey"})
_MAX_BODY = 4 << 20  # 64 credentials of an app are some 30 KB; a page of that size is not Graph


@dataclass(frozen=True, slots=True)
class GraphRead:
    """Where and how to read one application. ``token`` never appears in ``repr``."""

    graph_host: str
    app_id: str
    token: str = field(repr=False)
    ca_pem: str | None = None
    proxy_url: str | None = None
    timeout: float = 30.0
    secrets: tuple[str, ...] = field(default=(), repr=False)  # never quoted back

    @property
    def url(self) -> str:
        return f"{self.graph_host.rstrip('/')}/v1.0/applications(appId='{quote(self.app_id, safe='-')}')"


async def read_application(read: GraphRead) -> dict[str, Any]:
    """The application object, or CheckFailed with a Graph reason."""
    return await asyncio.to_thread(_request_sync, read, "GET", "", None)


async def add_password(read: GraphRead, display_name: str, end: str) -> dict[str, Any]:
    """``POST …/addPassword``: the new passwordCredential, ``secretText`` included (the only time Graph
    returns a value; the caller stores it and never logs it). Needs Application.ReadWrite.OwnedBy as an
    owner of the app (or Application.ReadWrite.All)."""
    body = {"passwordCredential": {"displayName": display_name, "endDateTime": end}}
    return await asyncio.to_thread(_request_sync, read, "POST", "/addPassword", body)


async def remove_password(read: GraphRead, key_id: str) -> None:
    """``POST …/removePassword`` (204)."""
    await asyncio.to_thread(_request_sync, read, "POST", "/removePassword", {"keyId": key_id})


async def add_key(read: GraphRead, certificate_der: bytes, display_name: str, proof: str) -> dict[str, Any]:
    """``POST …/addKey``: register a certificate (its public part only) on the app; returns the new
    keyCredential (``keyId``, ``customKeyIdentifier`` = SHA-1 thumbprint, validity dates). ``proof``
    (domain.credentials.proof_of_possession) is signed with a certificate the app already has; with the
    app's own token no Graph permission is needed."""
    body = {
        "keyCredential": {
            "type": "AsymmetricX509Cert",
            "usage": "Verify",
            "key": base64.b64encode(certificate_der).decode("ascii"),
            "displayName": display_name,
        },
        "passwordCredential": None,
        "proof": proof,
    }
    return await asyncio.to_thread(_request_sync, read, "POST", "/addKey", body, (proof,))


async def remove_key(read: GraphRead, key_id: str, proof: str) -> None:
    """``POST …/removeKey`` (204), with a proof signed by a certificate that stays registered (or the one
    removed, while it is still valid)."""
    await asyncio.to_thread(
        _request_sync, read, "POST", "/removeKey", {"keyId": key_id, "proof": proof}, (proof,)
    )


def _request_sync(
    read: GraphRead,
    method: str,
    action: str,
    body: dict[str, Any] | None,
    conceal: tuple[str, ...] = (),
) -> dict[str, Any]:
    host = urlsplit(read.graph_host).netloc
    hidden = (read.token, *read.secrets, *conceal)
    with requests.Session() as session:
        session.trust_env = False  # HTTPS_PROXY and REQUESTS_CA_BUNDLE would override the spec
        session.mount("https://", _TrustAdapter(_trust(read.ca_pem or "")))
        if read.proxy_url:
            session.proxies = {"https": read.proxy_url, "http": read.proxy_url}
        try:
            response = session.request(
                method,
                read.url + action,
                params={"$select": SELECT} if method == "GET" else None,
                json=body,
                headers={"Authorization": f"Bearer {read.token}", "Accept": "application/json"},
                timeout=read.timeout,
                stream=True,
            )
            raw = response.raw.read(_MAX_BODY + 1, decode_content=True)
        except requests.exceptions.SSLError:
            raise CheckFailed(
                Reason.GRAPH_UNAVAILABLE,
                f"Microsoft Graph at {host} presented a certificate that is not trusted; add its issuing CA "
                "to spec.identity.caBundle",
            ) from None
        except requests.exceptions.Timeout:
            raise CheckFailed(
                Reason.GRAPH_UNAVAILABLE,
                f"no answer from Microsoft Graph at {host} within {read.timeout:g} s",
            ) from None
        except requests.exceptions.RequestException as exc:
            detail = quote_reply(type(exc).__name__, hidden)
            raise CheckFailed(
                Reason.GRAPH_UNAVAILABLE, f"cannot connect to Microsoft Graph at {host} ({detail})"
            ) from None
    status = response.status_code
    if status == 204 and method == "POST":
        return {}
    try:
        payload = json.loads(raw) if len(raw) <= _MAX_BODY else None
    except ValueError:
        payload = None
    if status == 200 and isinstance(payload, dict):
        return payload
    raise _failure(
        status, payload, response.headers.get("Retry-After"), read, host, hidden, action.strip("/")
    )


def _failure(
    status: int,
    payload: Any,
    retry_after: str | None,
    read: GraphRead,
    host: str,
    hidden: tuple[str, ...],
    action: str = "",
) -> CheckFailed:
    error = payload.get("error") if isinstance(payload, dict) else None
    code = str(error.get("code", "")) if isinstance(error, dict) else ""
    message = quote_reply(str(error.get("message", "")), hidden) if isinstance(error, dict) else ""
    said = f" ({code}: {message})" if code else ""
    if status == 429:
        delay = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
        after = f"; trying again after {delay:g} s as asked" if delay else ""
        what = action or "the read"
        return CheckFailed(
            Reason.GRAPH_THROTTLED, f"Microsoft Graph throttled {what} (HTTP 429){after}", retry_after=delay
        )
    if status == 401 and action in _KEY_ACTIONS and code != "InvalidAuthenticationToken":
        return CheckFailed(
            Reason.GRAPH_ACCESS_DENIED,
            f"Microsoft Graph refused the proof of possession for {action} on app {read.app_id} "
            f"(HTTP 401{said}): the proof must be signed with a certificate that is still registered on the "
            "app and not expired, and its iss must be the application's object ID (not the appId); if the "
            "certificate in use was removed or has expired, register the new one in the portal once",
        )
    if status == 403 and action in _KEY_ACTIONS:
        return CheckFailed(
            Reason.GRAPH_ACCESS_DENIED,
            f"Microsoft Graph refused {action} on app {read.app_id} (HTTP 403{said}): an app rolls its own "
            "keys with no Graph permission when it calls with its own token; any other caller needs the "
            "application permission Application.ReadWrite.OwnedBy as an owner of the app",
        )
    if status in (401, 403) and action:
        return CheckFailed(
            Reason.GRAPH_ACCESS_DENIED,
            f"Microsoft Graph refused {action} on app {read.app_id} (HTTP {status}{said}): renewal needs the "
            "application permission Application.ReadWrite.OwnedBy with the app as an owner of itself",
        )
    if status in (401, 403):
        return CheckFailed(
            Reason.GRAPH_ACCESS_DENIED,
            f"Microsoft Graph refused to read app {read.app_id} (HTTP {status}{said}): the app needs the "
            "application permission Application.Read.All (or Application.ReadWrite.OwnedBy as an owner of "
            "itself) with admin consent",
        )
    if status == 404:
        return CheckFailed(
            Reason.GRAPH_APPLICATION_NOT_FOUND,
            f"Microsoft Graph at {host} has no application with appId {read.app_id} in the token's tenant "
            f"(HTTP 404{said})",
        )
    if status == 200:
        return CheckFailed(Reason.GRAPH_UNAVAILABLE, f"Microsoft Graph at {host} answered something not JSON")
    return CheckFailed(
        Reason.GRAPH_UNAVAILABLE,
        f"Microsoft Graph at {host} failed with HTTP {status}{said}",
        retry_after=float(retry_after) if retry_after and retry_after.strip().isdigit() else None,
    )
