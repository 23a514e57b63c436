"""Operator settings from the environment (the ``run`` command and the chart set them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Settings"]


@dataclass(frozen=True, slots=True)
class Settings:
    metrics_port: int = 0
    metrics_address: str = "0.0.0.0"  # noqa: S104 - a Pod's metrics port
    workers: int = 8
    namespaces: tuple[str, ...] = ()  # empty: all namespaces

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            metrics_port=int(os.environ.get("SMTPOAUTH_METRICS_PORT", "0")),
            metrics_address=os.environ.get("SMTPOAUTH_METRICS_ADDRESS", "0.0.0.0"),  # noqa: S104
            workers=max(1, int(os.environ.get("SMTPOAUTH_WORKERS", "8"))),
            namespaces=tuple(n for n in os.environ.get("SMTPOAUTH_NAMESPACES", "").split(",") if n),
        )
