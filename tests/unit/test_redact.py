"""Quoting peer replies never leaks a secret, in any of the encodings it travels in."""

from __future__ import annotations

import base64
import urllib.parse

import pytest

from smtp_oauth_operator.domain.redact import MAX_QUOTE, quote_reply, redact

SECRET = "Zx8Q~s3cr3t.VALUE_with-odd+chars/=="


@pytest.mark.parametrize("prefix", ["", "a", "ab", "user=no-reply@contoso.com\x01auth=Bearer "])
def test_secret_inside_base64_is_found_at_any_alignment(prefix: str) -> None:
    blob = base64.b64encode(f"{prefix}{SECRET}\x01\x01".encode()).decode()
    scrubbed = redact(f"535 5.7.3 echo {blob}", [SECRET])
    assert "[REDACTED]" in scrubbed
    decoded_rest = scrubbed.replace("[REDACTED]", "")
    assert SECRET not in decoded_rest


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
