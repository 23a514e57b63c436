"""Watches: SmtpOAuthConfigs feed the reconciler; referenced Secrets and ConfigMaps poke it.

Secrets and ConfigMaps are watched cluster-wide (or in the operator's namespaces) but nothing of them is
kept: an event for an object no SmtpOAuthConfig references is dropped by the ``when`` filter, and one
that is referenced only queues its users, which then read the object fresh.

The handlers are ``async def`` so that kopf calls them on the event loop: the reconciler's state is
loop-only (kopf would run a plain function in a worker thread).
"""

from __future__ import annotations

from typing import Any

import kopf

from smtp_oauth_operator.domain.spec import GROUP, PLURAL, VERSION
from smtp_oauth_operator.services.reconciler import Reconciler

__all__ = ["on_config_event", "on_configmap_event", "on_secret_event"]


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_config_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    reconciler: Reconciler = memo.reconciler
    if event.get("type") == "DELETED":
        reconciler.forget(body.metadata.namespace or "", body.metadata.name or "")
    else:
        reconciler.observe(dict(body))


def _referenced(kind: str) -> Any:
    def when(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> bool:
        reconciler: Reconciler | None = getattr(memo, "reconciler", None)
        return reconciler is not None and reconciler.is_referenced(kind, namespace, name)

    return when


@kopf.on.event("", "v1", "secrets", when=_referenced("Secret"))
async def on_secret_event(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.poke("Secret", namespace, name)


@kopf.on.event("", "v1", "configmaps", when=_referenced("ConfigMap"))
async def on_configmap_event(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.poke("ConfigMap", namespace, name)
