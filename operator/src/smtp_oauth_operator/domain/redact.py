"""Scrubbing secret values out of text that came from a peer, and credentials out of proxy URLs.

The operator quotes server replies in conditions and Events because they are the fastest path to a
diagnosis. A misbehaving or hostile peer could echo what we sent it (an SMTP server echoing the AUTH
line, a proxy echoing the token request), so every quoted reply passes through :func:`redact` with the
secret values in play, in the forms they travel in (raw, base64, URL-encoded).

A proxy URL may carry credentials (``http://user:password@proxy:3128``). Wherever a proxy is named
(status, Events, logs, exception text) it is named by :func:`proxy_address` (host and port only), and
:func:`proxy_secrets` lists the credential forms that quoted replies must not contain (the password, the
user-info, and the ``Proxy-Authorization: Basic`` value). :func:`quote_reply` also drops any user-info
from URLs in the text it quotes.
"""

from __future__ import annotations

import base64
import re
import urllib.parse
from collections.abc import Iterable

__all__ = ["MAX_QUOTE", "proxy_address", "proxy_secrets", "quote_reply", "redact", "strip_userinfo"]

MAX_QUOTE = 300
_MASK = "[REDACTED]"


def _forms(value: str) -> set[str]:
    raw = value.encode()
    forms = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
    # A secret inside a base64 blob (the XOAUTH2 initial response) is found at any of the three
    # alignments; the middle part of each encoding is stable whatever surrounds it.
    for shift in range(3):
        encoded = base64.b64encode(b"\x00" * shift + raw).decode()
        start = (shift * 4 + 2) // 3 + 1
        stable = encoded[start : len(encoded) - 4]
        if len(stable) >= 8:
            forms.add(stable)
    return {f for f in forms if len(f) >= 6}


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of every secret (and its common encodings) with a mask."""
    for secret in secrets:
        if not secret:
            continue
        for form in sorted(_forms(secret), key=len, reverse=True):
            text = text.replace(form, _MASK)
    return text


# scheme://user-info@ in any text; user-info cannot contain "/", "?", "#" or whitespace.
_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/?#\s@]*@")


def strip_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it removed."""
    return _USERINFO.sub(r"\1", text)


def proxy_address(url: str | None) -> str:
    """How a proxy is named in messages and logs: ``host:port``, never its credentials."""
    if not url:
        return ""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return strip_userinfo(url)
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port else host


def proxy_secrets(url: str | None) -> tuple[str, ...]:
    """The credentials in a proxy URL in every form a peer could echo them back in."""
    if not url:
        return ()
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return ()
    if parts.password is None:
        return ()
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password)
    pair = f"{user}:{password}"
    basic = base64.b64encode(pair.encode("latin-1", "replace")).decode()
    raw_userinfo = parts.netloc.rpartition("@")[0]
    return tuple(v for v in dict.fromkeys((password, parts.password, pair, raw_userinfo, basic)) if v)


def quote_reply(text: str, secrets: Iterable[str] = ()) -> str:
    """A peer's reply made safe and short enough for a one-line message."""
    flat = re.sub(r"\s+", " ", strip_userinfo(redact(text, secrets))).strip()
    flat = "".join(ch if ch.isprintable() else "?" for ch in flat)
    if len(flat) > MAX_QUOTE:
        flat = flat[: MAX_QUOTE - 1] + "…"
    return flat
