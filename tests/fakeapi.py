"""An in-memory API server behind our own ``Kube`` interface, for reconciler tests.

It stands at the service boundary (services/ call ``read``, ``patch_status`` and ``post_event``), so
the reconciler runs unchanged; the Kubernetes client itself is never mocked (e2e/ uses the real one
against a real API server). resourceVersions grow like etcd's revision; faults are injectable.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Any, Literal

from smtp_oauth_operator.domain.objects import SourceObject

Key = tuple[str, str]


class FakeApi:
    def __init__(self, *, threaded: bool = False) -> None:
        self.objects: dict[tuple[str, str, str], SourceObject] = {}
        self.configs: dict[Key, dict[str, Any]] = {}
        self.revision = 100
        self.patches: list[tuple[Key, dict[str, Any]]] = []
        self.events: list[tuple[Key, str, str, str]] = []
        # Raised by the next status patches, in order (a 5xx, a 403, a timeout ...).
        self.patch_faults: list[BaseException | None] = []
        # While cleared, reads wait here (a pass held mid-way); ``reading`` is set when one waits.
        self.gate = asyncio.Event()
        self.gate.set()
        self.reading = asyncio.Event()
        # Do the work in a thread of asyncio's default pool, as a blocking client would.
        self.threaded = threaded

    def _bump(self) -> str:
        self.revision += 1
        return str(self.revision)

    def put_secret(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        self.objects[("Secret", namespace, name)] = SourceObject(
            data=dict(data), metadata={"name": name, "namespace": namespace, "resourceVersion": self._bump()}
        )

    def put_configmap(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        self.objects[("ConfigMap", namespace, name)] = SourceObject(
            data=dict(data), metadata={"name": name, "namespace": namespace, "resourceVersion": self._bump()}
        )

    def create(self, namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": "smtpoauth.dev/v1alpha1",
            "kind": "SmtpOAuthConfig",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": f"uid-{namespace}-{name}-{self.revision}",
                "generation": 1,
                "resourceVersion": self._bump(),
            },
            "spec": copy.deepcopy(dict(spec)),
        }
        self.configs[(namespace, name)] = body
        return copy.deepcopy(body)

    def edit(
        self, namespace: str, name: str, *, annotations: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """A user's change: a new generation (or, with annotations, only new metadata)."""
        body = self.configs[(namespace, name)]
        meta = body["metadata"]
        if annotations is not None:
            meta["annotations"] = {**(meta.get("annotations") or {}), **annotations}
        else:
            meta["generation"] += 1
        meta["resourceVersion"] = self._bump()
        return copy.deepcopy(body)

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.configs[(namespace, name)])

    def delete(self, namespace: str, name: str) -> None:
        del self.configs[(namespace, name)]

    # -- the Kube interface ------------------------------------------------------------------------

    async def read(
        self, kind: Literal["Secret", "ConfigMap"], namespace: str, name: str
    ) -> SourceObject | None:
        if not self.gate.is_set():
            self.reading.set()
            await self.gate.wait()
        if self.threaded:
            return await asyncio.to_thread(self.objects.get, (kind, namespace, name))
        return self.objects.get((kind, namespace, name))

    async def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        if self.threaded:
            await asyncio.to_thread(lambda: None)
        self.patches.append(((namespace, name), copy.deepcopy(dict(status))))
        if self.patch_faults:
            fault = self.patch_faults.pop(0)
            if fault is not None:  # None: this write lands
                raise fault
        body = self.configs.get((namespace, name))
        if body is None:
            return None
        body["status"] = _merge(body.get("status") or {}, status)
        body["metadata"]["resourceVersion"] = self._bump()
        return copy.deepcopy(body)

    async def post_event(
        self, body: Mapping[str, Any], type_: str, reason: str, message: str, *, now: Any = None
    ) -> None:
        meta = body.get("metadata") or {}
        self.events.append(((str(meta.get("namespace")), str(meta.get("name"))), type_, reason, message))


def _merge(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386), as the API server applies it: objects merge key by key, None
    removes, anything else (lists too) replaces."""
    merged = copy.deepcopy(dict(target))
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
