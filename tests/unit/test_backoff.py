"""Retry delays: doubling from 30 s, capped, never past the recheck interval, never before Retry-After."""

from __future__ import annotations

from datetime import timedelta

import pytest

from smtp_oauth_operator.services.evaluation import backoff

HOUR = timedelta(hours=1)


@pytest.mark.parametrize(
    ("failures", "nominal"), [(1, 30), (2, 60), (3, 120), (6, 960), (7, 1800), (20, 1800)]
)
def test_doubles_then_caps(failures: int, nominal: int) -> None:
    for _ in range(50):
        delay = backoff(failures, timedelta(days=1), None).total_seconds()
        assert nominal * 0.9 <= delay <= nominal * 1.1


def test_never_beyond_the_recheck_interval_by_more_than_jitter() -> None:
    for _ in range(50):
        assert backoff(10, timedelta(minutes=5), None) <= timedelta(minutes=5) * 1.1


def test_retry_after_is_a_floor() -> None:
    for _ in range(200):
        delay = backoff(1, HOUR, 300).total_seconds()
        assert 300 <= delay <= 330


def test_retry_after_is_bounded_to_an_hour() -> None:
    assert backoff(1, HOUR, 10**9) <= timedelta(hours=1.1)
