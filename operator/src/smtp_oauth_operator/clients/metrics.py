"""Prometheus metrics (prometheus-client), in a registry of our own.

Expiry is exported as a timestamp, as cert-manager does, so alert thresholds live in Prometheus rules
(docs/alarms.md), not in the operator. Series of a deleted resource are removed with it. Labels carry
names only: never a secret, a token or a server reply.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics", "RelayMetrics"]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.expiration = Gauge(
            "smtpoauth_client_secret_expiration_timestamp_seconds",
            "When the client secret expires (Unix time), as declared in the spec or the Secret.",
            ["namespace", "name"],
            registry=r,
        )
        self.ready = Gauge(
            "smtpoauth_ready",
            "1 when the SmtpOAuthConfig is Ready, else 0.",
            ["namespace", "name"],
            registry=r,
        )
        self.tests = Counter(
            "smtpoauth_connection_tests_total",
            "Connection tests run, by result (the Ready reason).",
            ["namespace", "name", "result"],
            registry=r,
        )
        self.duration = Histogram(
            "smtpoauth_connection_test_duration_seconds",
            "Duration of connection tests (token + SMTP session).",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.token_requests = Counter(
            "smtpoauth_token_requests_total",
            "Requests sent to the identity provider's token endpoint (cache hits excluded), by result.",
            ["result"],
            registry=r,
        )

    def serve(self, port: int, address: str = "0.0.0.0") -> None:  # noqa: S104 - a Pod's metrics port
        if port:
            start_http_server(port, addr=address, registry=self.registry)

    def token_request(self, result: str) -> None:
        self.token_requests.labels(result=str(result)).inc()

    def forget(self, namespace: str, name: str) -> None:
        for gauge in (self.expiration, self.ready):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)
        # Counters per resource go too: a deleted resource's history is not a live series.
        for labels in list(self._resource_series(namespace, name)):
            with contextlib.suppress(KeyError):
                self.tests.remove(*labels)

    def _resource_series(self, namespace: str, name: str) -> list[tuple[str, str, str]]:
        series: list[tuple[str, str, str]] = []
        for metric in self.tests.collect():
            for sample in metric.samples:
                labels = sample.labels
                if labels.get("namespace") == namespace and labels.get("name") == name and "result" in labels:
                    key = (namespace, name, labels["result"])
                    if key not in series:
                        series.append(key)
        return series


class RelayMetrics:
    """The relay's series (a separate process from the operator, so a registry of its own by default).

    ``result`` is one of: sent, deferred (Exchange answered 4xx), rejected (5xx), rate_limited,
    sender_refused, token_failed, error. Labels carry names only, never an address or a reply.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "smtpoauth_relay_messages_total",
            "Messages the relay handled, by configuration and result.",
            ["namespace", "name", "result"],
            registry=r,
        )
        self.duration = Histogram(
            "smtpoauth_relay_duration_seconds",
            "Time from the client's end of DATA to the relay's answer (token + Exchange submission).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.auth_failures = Counter(
            "smtpoauth_relay_auth_failures_total",
            "Failed relay logins, by reason (invalid: wrong or unknown login; not_ready).",
            ["reason"],
            registry=r,
        )

    def serve(self, port: int, address: str = "0.0.0.0") -> None:  # noqa: S104 - a Pod's metrics port
        if port:
            start_http_server(port, addr=address, registry=self.registry)

    def message(self, namespace: str, name: str, result: str) -> None:
        self.messages.labels(namespace=namespace, name=name, result=result).inc()

    def auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason=reason).inc()
