"""Which of an app registration's credentials (as Microsoft Graph lists them) is the one in use.

Graph never returns a secret's value after creation, only its ``hint``: the first three characters.
A client secret is therefore identified by comparing the hint with the first three characters of the
value in the Secret (which stays here, in memory, and is never quoted); when several of the app's
secrets share a hint, the match is ambiguous and this says so, using the earliest of their expiries so
that an alarm is early rather than late. A certificate is identified by its SHA-1 thumbprint, which is
what Graph keeps in ``customKeyIdentifier`` (base64 of the digest) for an uploaded certificate.

Pure: the Graph payload comes in as a mapping, the result goes out as data for ``status``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from smtp_oauth_operator.domain.reasons import CheckFailed, Reason

__all__ = [
    "MISMATCH_TOLERANCE",
    "AppCredential",
    "Discovery",
    "GraphApplication",
    "failed",
    "identify",
    "parse_application",
]

MAX_LISTED = 64  # status.appCredentials' maxItems
# The portal shows a date only, so a typed expiresAt is usually midnight of the right day: only a
# difference of a day or more is a disagreement worth a Warning.
MISMATCH_TOLERANCE = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class AppCredential:
    """One password or key credential of an application, as Graph lists it (never a value)."""

    type: Literal["Password", "Certificate"]
    key_id: str
    display_name: str | None
    hint: str | None
    end: datetime | None
    sha1: str | None = None  # lower-case hex of a certificate's SHA-1 thumbprint

    def status(self, in_use: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": self.type, "keyId": self.key_id, "inUse": in_use}
        if self.display_name:
            entry["displayName"] = self.display_name[:1024]
        if self.hint:
            entry["hint"] = self.hint[:8]
        if self.sha1:
            entry["thumbprint"] = self.sha1  # a certificate's SHA-1 (public; the portal's Thumbprint column)
        if self.end is not None:
            entry["endDateTime"] = self.end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return entry


@dataclass(frozen=True, slots=True)
class GraphApplication:
    object_id: str
    credentials: tuple[AppCredential, ...]


@dataclass(frozen=True, slots=True)
class Discovery:
    """What this pass learnt from Graph: the ExpiryDiscovered condition, the listing and the expiry."""

    status: Literal["True", "False", "Unknown"]
    reason: Reason
    message: str
    expires_at: datetime | None = None  # the credential in use's endDateTime, when identified
    credentials: tuple[dict[str, Any], ...] | None = None  # status.appCredentials (None: not read)
    retry_at: datetime | None = None  # a transient failure: when Graph may be read again
    in_use: tuple[str, ...] = field(default=())  # keyIds
    object_id: str | None = None  # the application's object ID (a proof of possession's issuer)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Graph writes seven fractional digits; Python before 3.11 reads at most six.
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(c for c in rest if c.isdigit())
        text = f"{head}.{digits[:6]}{rest[len(digits) :]}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    # Whole seconds, as status stores them: lastAlarm.expiresAt is compared with this date, and a
    # fraction would make every pass look like a new date (and repeat the alarm).
    moment = moment.replace(microsecond=0)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _sha1(custom_key_identifier: Any) -> str | None:
    """Graph's Binary is base64; a 20-byte value is a SHA-1 thumbprint. Some tools store the hex text."""
    if not isinstance(custom_key_identifier, str) or not custom_key_identifier:
        return None
    text = custom_key_identifier.strip()
    if len(text) == 40 and all(c in "0123456789abcdefABCDEF" for c in text):
        return text.lower()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) == 20:
        return raw.hex()
    decoded = raw.decode("ascii", "replace")
    if len(decoded) == 40 and all(c in "0123456789abcdefABCDEF" for c in decoded):
        return decoded.lower()
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_application(payload: Mapping[str, Any]) -> GraphApplication:
    """The application object of ``GET applications(appId='…')?$select=id,passwordCredentials,keyCredentials``.

    Raises ValueError for a payload that is not an application (a proxy's page, a changed API)."""
    passwords = payload.get("passwordCredentials")
    keys = payload.get("keyCredentials")
    if not isinstance(passwords, list) or not isinstance(keys, list):
        raise ValueError("the answer has no passwordCredentials/keyCredentials lists")  # noqa: TRY004 - a bad answer, not a bad argument
    found: list[AppCredential] = []
    for item in passwords:
        if isinstance(item, Mapping) and _text(item.get("keyId")):
            found.append(
                AppCredential(
                    "Password",
                    str(item["keyId"]),
                    _text(item.get("displayName")),
                    _text(item.get("hint")),
                    _time(item.get("endDateTime")),
                )
            )
    for item in keys:
        if isinstance(item, Mapping) and _text(item.get("keyId")):
            found.append(
                AppCredential(
                    "Certificate",
                    str(item["keyId"]),
                    _text(item.get("displayName")),
                    None,
                    _time(item.get("endDateTime")),
                    _sha1(item.get("customKeyIdentifier")),
                )
            )
    return GraphApplication(str(payload.get("id") or ""), tuple(found))


def _date(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def identify(
    app: GraphApplication,
    *,
    client_id: str,
    secret: str | None = None,
    sha1: str | None = None,
    now: datetime,
) -> Discovery:
    """Find the credential in use (``secret``: the client secret's value; ``sha1``: a certificate's
    thumbprint; neither: workload identity, nothing of the app's is in use)."""
    if secret:
        candidates = [
            c for c in app.credentials if c.type == "Password" and c.hint and secret.startswith(c.hint)
        ]
        # Entra ID would have refused an ended secret, so an ended one is not the one that works.
        live = [c for c in candidates if c.end is None or c.end > now]
        if len(candidates) > 1 and live:
            candidates = live
        noun = "client secret"
    elif sha1:
        candidates = [c for c in app.credentials if c.type == "Certificate" and c.sha1 == sha1.lower()]
        noun = "certificate"
    else:
        candidates = []
        noun = ""
    in_use = {c.key_id for c in candidates}
    listing = tuple(c.status(c.key_id in in_use) for c in app.credentials[:MAX_LISTED])
    ends = [c.end for c in candidates if c.end is not None]
    expires_at = min(ends) if ends else None
    if not noun:
        return Discovery(
            "True",
            Reason.DISCOVERED,
            f"Graph lists {len(app.credentials)} credential(s) of app {client_id}; workload identity "
            "federation uses none of them.",
            None,
            listing,
            object_id=app.object_id or None,
        )
    if not candidates:
        return Discovery(
            "False",
            Reason.CREDENTIAL_NOT_LISTED,
            f"None of the {len(app.credentials)} credential(s) Graph lists for app {client_id} is the "
            f"{noun} in use; the typed expiry (if any) is used.",
            None,
            listing,
            object_id=app.object_id or None,
        )
    if len(candidates) > 1:
        keys = ", ".join(sorted(in_use))
        return Discovery(
            "False",
            Reason.CREDENTIAL_AMBIGUOUS,
            f"{len(candidates)} client secrets of app {client_id} have the hint of the one in use "
            f"(keyIds {keys}); the earliest expiry, {_date(expires_at) if expires_at else 'none'}, is used.",
            expires_at,
            listing,
            in_use=tuple(sorted(in_use)),
            object_id=app.object_id or None,
        )
    (match,) = candidates
    name = f" {match.display_name!r}" if match.display_name else ""
    when = f"expires {_date(match.end)}" if match.end else "has no end date"
    return Discovery(
        "True",
        Reason.DISCOVERED,
        f"Graph: the {noun} in use is keyId {match.key_id}{name}; it {when}.",
        match.end,
        listing,
        in_use=(match.key_id,),
        object_id=app.object_id or None,
    )


def failed(failure: CheckFailed, now: datetime, retry_after: timedelta | None = None) -> Discovery:
    """A discovery that could not read Graph (the token request or the read failed)."""
    retry_at = now + retry_after if retry_after is not None else None
    message = failure.message.strip()
    message = message[:1].upper() + message[1:]
    if not message.endswith("."):
        message += "."
    return Discovery("False", failure.reason, message, retry_at=retry_at)


def mismatch(typed: datetime | None, discovered: datetime | None) -> dict[str, str] | None:
    """status.expiryMismatch when the typed and the discovered expiry differ by a day or more."""
    if typed is None or discovered is None or abs(typed - discovered) < MISMATCH_TOLERANCE:
        return None
    return {
        "specExpiresAt": typed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "graphExpiresAt": discovered.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def describe(credentials: Sequence[Mapping[str, Any]]) -> str:
    """One line per credential for the CLI (no values)."""
    lines = []
    for c in credentials:
        mark = "*" if c.get("inUse") else " "
        lines.append(
            f"{mark} {c.get('type', '?'):<11} {c.get('keyId', '?')} hint={c.get('hint', '-')} "
            f"ends={c.get('endDateTime', '-')} {c.get('displayName') or ''}".rstrip()
        )
    return "\n".join(lines)
