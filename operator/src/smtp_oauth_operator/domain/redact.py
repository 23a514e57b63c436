"""Scrubbing secret values out of text that came from a peer.

The operator quotes server replies in conditions and Events because they are the fastest path to a
diagnosis. A misbehaving or hostile peer could echo what we sent it (an SMTP server echoing the AUTH
line, a proxy echoing the token request), so every quoted reply passes through :func:`redact` with the
secret values in play, in the forms they travel in (raw, base64, URL-encoded).
"""

from __future__ import annotations

import base64
import re
import urllib.parse
from collections.abc import Iterable

__all__ = ["MAX_QUOTE", "quote_reply", "redact"]

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


def quote_reply(text: str, secrets: Iterable[str] = ()) -> str:
    """A peer's reply made safe and short enough for a one-line message."""
    flat = re.sub(r"\s+", " ", redact(text, secrets)).strip()
    flat = "".join(ch if ch.isprintable() else "?" for ch in flat)
    if len(flat) > MAX_QUOTE:
        flat = flat[: MAX_QUOTE - 1] + "…"
    return flat
