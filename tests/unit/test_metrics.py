"""Metrics: names and labels as documented; a deleted resource's series disappear."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from smtp_oauth_operator.clients.metrics import Metrics
from smtp_oauth_operator.config import Settings


def page(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_series_and_forget() -> None:
    m = Metrics()
    m.expiration.labels("mail", "a").set(1_800_000_000)
    m.ready.labels("mail", "a").set(1)
    m.ready.labels("mail", "b").set(0)
    m.tests.labels("mail", "a", "ConnectionTested").inc()
    m.tests.labels("mail", "a", "InvalidClientSecret").inc()
    m.tests.labels("mail", "b", "ConnectionTested").inc()
    m.token_request("Success")
    m.duration.observe(0.2)
    text = page(m)
    assert 'smtpoauth_client_secret_expiration_timestamp_seconds{name="a",namespace="mail"} 1.8e+09' in text
    assert (
        'smtpoauth_connection_tests_total{name="a",namespace="mail",result="InvalidClientSecret"} 1.0' in text
    )
    assert 'smtpoauth_token_requests_total{result="Success"} 1.0' in text
    assert "smtpoauth_connection_test_duration_seconds_count 1.0" in text

    m.forget("mail", "a")
    text = page(m)
    assert 'name="a"' not in text
    assert 'smtpoauth_ready{name="b",namespace="mail"} 0.0' in text
    assert 'smtpoauth_connection_tests_total{name="b",namespace="mail",result="ConnectionTested"} 1.0' in text
    m.forget("mail", "never-seen")  # no error for an unknown resource


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTPOAUTH_METRICS_PORT", "9464")
    monkeypatch.setenv("SMTPOAUTH_WORKERS", "0")
    settings = Settings.from_env()
    assert settings.metrics_port == 9464
    assert settings.workers == 1  # at least one worker, whatever the environment says
