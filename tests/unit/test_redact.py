"""Quoting peer replies never leaks a secret, in any of the encodings it travels in."""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse

import pytest

from smtp_oauth_operator.domain.redact import (
    MAX_QUOTE,
    proxy_address,
    proxy_secrets,
    quote_reply,
    redact,
    strip_userinfo,
)

SECRET = "Zx8Q~s3cr3t.VALUE_with-odd+chars/=="


def _recoverable(text: str, secret: str, window: int = 6) -> list[bytes]:
    """Pieces of ``secret`` (``window`` bytes or more) that decoding the base64 left in ``text`` yields.

    Every run of base64 characters is decoded at each of the four character offsets, the way an
    attacker holding the quoted reply would; the secret itself is never in base64 text verbatim.
    """
    raw = secret.encode()
    pieces = {raw[i : i + window] for i in range(len(raw) - window + 1)}
    found = []
    for run in re.findall(r"[A-Za-z0-9+/]+=*", text):
        for offset in range(4):
            chunk = run[offset:].rstrip("=")
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            try:
                decoded = base64.b64decode(chunk, validate=True)
            except binascii.Error:
                continue
            found += [p for p in pieces if p in decoded]
    return found


@pytest.mark.parametrize("prefix", ["", "a", "ab", "user=no-reply@contoso.com\x01auth=Bearer "])
def test_secret_inside_base64_is_found_at_any_alignment(prefix: str) -> None:
    blob = base64.b64encode(f"{prefix}{SECRET}\x01\x01".encode()).decode()
    assert _recoverable(blob, SECRET)  # the check itself finds the secret before scrubbing
    scrubbed = redact(f"535 5.7.3 echo {blob}", [SECRET])
    assert "[REDACTED]" in scrubbed
    assert _recoverable(scrubbed, SECRET) == []


def test_raw_and_url_encoded_forms() -> None:
    text = f"raw {SECRET} url {urllib.parse.quote(SECRET, safe='')} form {urllib.parse.quote_plus(SECRET)}"
    assert redact(text, [SECRET]).count("[REDACTED]") == 3


def test_quote_is_one_short_printable_line() -> None:
    quoted = quote_reply("550\r\n 5.7.1\x00 " + "x" * 1000, [SECRET])
    assert "\n" not in quoted
    assert "\x00" not in quoted
    assert len(quoted) == MAX_QUOTE


def test_empty_secrets_change_nothing() -> None:
    assert redact("hello", ["", "hello"[:0]]) == "hello"


def test_proxy_is_named_by_host_and_port_only() -> None:
    assert proxy_address("http://user:p%40ss@proxy.corp:3128") == "proxy.corp:3128"
    assert proxy_address("http://proxy.corp") == "proxy.corp"
    assert proxy_address("http://u:p@[::1]:8080") == "[::1]:8080"
    assert proxy_address(None) == ""


def test_proxy_secrets_cover_every_form_of_the_credentials() -> None:
    url = "http://proxy%20user:p%40ss~word@proxy.corp:3128"
    forms = proxy_secrets(url)
    basic = base64.b64encode(b"proxy user:p@ss~word").decode()
    for form in ("p@ss~word", "p%40ss~word", "proxy user:p@ss~word", "proxy%20user:p%40ss~word", basic):
        assert form in forms
    echoed = f"407 for {url}, Proxy-Authorization: Basic {basic}, pass p@ss~word"
    quoted = quote_reply(echoed, forms)
    for form in forms:
        assert form not in quoted, quoted
    assert "proxy.corp:3128" in quoted
    assert proxy_secrets("http://proxy.corp:3128") == ()


def test_userinfo_is_stripped_from_any_url_in_text() -> None:
    text = "ProxyError(http://u:secret@proxy:1/ and HTTPS://a@b/c, not user@example.com)"
    assert strip_userinfo(text) == "ProxyError(http://proxy:1/ and HTTPS://b/c, not user@example.com)"
