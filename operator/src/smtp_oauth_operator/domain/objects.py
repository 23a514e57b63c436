"""The referenced objects (Secrets, ConfigMaps) as the connection test sees them, wherever they come from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = ["ObjectSource", "SourceObject"]


@dataclass(frozen=True, slots=True)
class SourceObject:
    """A Secret or ConfigMap: ``data`` holds decoded text values (never logged, never in repr)."""

    data: Mapping[str, str] = field(repr=False)
    metadata: Mapping[str, Any]
    type: str | None = None  # a Secret's type (kubernetes.io/tls…), when known


class ObjectSource(Protocol):
    """The API server (clients/kube.py) or manifest files (the check CLI)."""

    async def read(
        self, kind: Literal["Secret", "ConfigMap"], namespace: str, name: str
    ) -> SourceObject | None: ...
