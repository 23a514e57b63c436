"""Process-wide objects: created at startup into kopf's ``memo``, closed at cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import kopf

from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.clients.kube import Kube
from smtp_oauth_operator.clients.metrics import Metrics
from smtp_oauth_operator.clients.watching import ApiConnection
from smtp_oauth_operator.config import Settings
from smtp_oauth_operator.domain.spec import GROUP
from smtp_oauth_operator.handlers import peering
from smtp_oauth_operator.services.feed import Feed
from smtp_oauth_operator.services.reconciler import Reconciler

__all__ = ["on_cleanup", "on_startup"]

MAX_API_BACKOFF = 60.0


class _RetryForever:
    """Backoffs 1, 2, 4 … 60 s, then 60 s for ever; a fresh sequence for every request.

    kopf counts retries with ``len()`` when it can; an unsized iterable means no limit.
    """

    def __iter__(self) -> Iterator[float]:
        delay = 1.0
        while True:
            yield delay
            delay = min(delay * 2, MAX_API_BACKOFF)


@kopf.on.startup()
async def on_startup(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    # kopf's bookkeeping, if any handler ever needs it, goes under our group, never into status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # kopf would turn our log lines into Events; we post our own, on transitions only.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    if not settings.peering.clusterwide:
        # Watching given namespaces (-n) needs only Roles in them. kopf would otherwise list and watch
        # namespaces and CRDs cluster-wide, retrying each 403 for about a minute before it starts.
        settings.scanning.disabled = True
    # kopf gives up on an API error after 8 retries (about a minute) and then stops the whole operator:
    # one missing RBAC rule (a 403 on a watch) would become a crash loop. Retry forever instead, every
    # minute at most: the log names the forbidden call, the resources show AccessDenied, and the watch
    # resumes by itself once the Role is fixed.
    settings.networking.error_backoffs = _RetryForever()
    if not settings.peering.standalone and settings.peering.priority == 0:
        # Replicas of one Deployment share their arguments, and kopf pauses *every* operator that sees a
        # peer of its own priority. A random one makes the highest replica active, the others a standby.
        settings.peering.priority = 1 + secrets.randbelow(2**31 - 2)
        logger.info("Peering %r with priority %d", settings.peering.name, settings.peering.priority)

    # kopf logs every successful watch-event handler at INFO: one line per resource per event. Keep
    # that for --log-level debug only; warnings and errors still show.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    config = Settings.from_env()
    if not settings.peering.clusterwide and not config.namespaces:
        raise kopf.PermanentError(
            "namespaced mode needs SMTPOAUTH_NAMESPACES (set by `smtp-oauth-operator run -n`)"
        )
    paused = None
    if not settings.peering.standalone:
        try:
            paused = peering.find_operator_paused()
        except peering.PeeringUnavailable as exc:
            # Better no operator than a standby that tests next to the active one.
            raise kopf.PermanentError(str(exc)) from None
    metrics = Metrics()
    metrics.serve(config.metrics_port, config.metrics_address)
    kube = Kube.from_environment()
    tokens = TokenProvider(on_request=metrics.token_request)
    reconciler = Reconciler(
        kube, tokens, metrics, workers=config.workers, relay_endpoint=config.relay_endpoint
    )
    reconciler.start()
    api = ApiConnection(kube.api_client.configuration)
    feed = Feed(api, reconciler, tokens, None if settings.peering.clusterwide else config.namespaces)
    memo.kube = kube
    memo.tokens = tokens
    memo.api = api
    memo.metrics = metrics
    memo.reconciler = reconciler
    memo.feed = feed
    if paused is None:
        feed.start()
    else:
        memo.peering = asyncio.create_task(peering.follow(paused, feed.pause, feed.resume), name="peering")
    logger.info(
        "smtp-oauth-operator started: %d workers, metrics port %s",
        config.workers,
        config.metrics_port or "off",
    )


@kopf.on.cleanup()
async def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    follower: asyncio.Task[None] | None = getattr(memo, "peering", None)
    if follower is not None:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    feed: Feed | None = getattr(memo, "feed", None)
    if feed is not None:
        await feed.stop()
    reconciler: Reconciler | None = getattr(memo, "reconciler", None)
    if reconciler is not None:
        await reconciler.stop()
    api: ApiConnection | None = getattr(memo, "api", None)
    if api is not None:
        await api.close()
    kube: Kube | None = getattr(memo, "kube", None)
    if kube is not None:
        kube.close()
    tokens: TokenProvider | None = getattr(memo, "tokens", None)
    if tokens is not None:
        tokens.close()  # the MSAL threads: a request stuck on a black-holed provider must not hold the exit


@kopf.on.probe(id="reconciler")
async def reconciler_alive(memo: kopf.Memo, **_: Any) -> str:
    # kopf serves whatever a probe handler returns (False included) as HTTP 200; only an exception
    # makes /healthz answer 500, which is what makes the kubelet restart the Pod.
    reconciler: Reconciler | None = getattr(memo, "reconciler", None)
    if reconciler is None:
        raise kopf.PermanentError("the reconciler has not started")
    problem = reconciler.health()
    follower: asyncio.Task[None] | None = getattr(memo, "peering", None)
    if problem is None and follower is not None and follower.done():
        # Without it this replica can no longer tell whether it may work: let the kubelet restart it.
        problem = "the task following kopf's peering (pause/resume) stopped"
    if problem is not None:
        raise kopf.PermanentError(problem)
    return "ok"
