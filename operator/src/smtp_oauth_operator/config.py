"""Operator settings from the environment (the ``run`` command and the chart set them)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = ["RELAY_ENDPOINT_ENV", "Settings", "relay_endpoint"]

# The chart sets it on the operator when it installs the relay: "<relay Service>.<namespace>.svc:587".
RELAY_ENDPOINT_ENV = "SMTPOAUTH_RELAY_ENDPOINT"
# host:port, as the CRD's status.relay.endpoint accepts it (a bad value would fail every status write).
_ENDPOINT = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?:[0-9]{1,5}$")


def relay_endpoint() -> str | None:
    """The relay's endpoint from the environment; None when unset or not a ``host:port``."""
    value = os.environ.get(RELAY_ENDPOINT_ENV, "").strip()
    return value if _ENDPOINT.match(value) and 0 < int(value.rsplit(":", 1)[1]) < 65536 else None


@dataclass(frozen=True, slots=True)
class Settings:
    metrics_port: int = 0
    metrics_address: str = "0.0.0.0"  # noqa: S104 - a Pod's metrics port
    workers: int = 8
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    relay_endpoint: str | None = None  # status.relay.endpoint of resources with spec.relay.enabled

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            metrics_port=int(os.environ.get("SMTPOAUTH_METRICS_PORT", "0")),
            metrics_address=os.environ.get("SMTPOAUTH_METRICS_ADDRESS", "0.0.0.0"),  # noqa: S104
            workers=max(1, int(os.environ.get("SMTPOAUTH_WORKERS", "8"))),
            namespaces=tuple(n for n in os.environ.get("SMTPOAUTH_NAMESPACES", "").split(",") if n),
            relay_endpoint=relay_endpoint(),
        )
