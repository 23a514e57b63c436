"""The Kubernetes API, as this operator uses it: read Secrets/ConfigMaps, write status, post Events.

Wraps the official ``kubernetes`` client (synchronous, so every call runs in a thread of our own pool,
not asyncio's default one that MSAL's requests could fill) and turns
its ``ApiException`` into our own errors: a missing object is ``None``, a 403 is a classified
:class:`CheckFailed` (AccessDenied) that the user sees in a condition, anything else is
:class:`KubeUnavailable`, which the reconciler retries with backoff without touching status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from smtp_oauth_operator.domain.objects import SourceObject
from smtp_oauth_operator.domain.reasons import CheckFailed, Reason
from smtp_oauth_operator.domain.spec import GROUP, KIND, PLURAL, VERSION

__all__ = ["Kube", "KubeUnavailable"]

logger = logging.getLogger(__name__)
COMPONENT = "smtp-oauth-operator"
MAX_EVENT_MESSAGE = 1024
API_THREADS = 8  # concurrent API calls; each holds one thread and one pooled connection
MAX_NAME = 253  # a DNS subdomain, what metadata.name of an Event (and of our resource) may be


class KubeUnavailable(ConnectionError):
    """The API server failed or could not be reached; retry later."""


def event_name(resource_name: str) -> str:
    """``<resource>.<16 hex>`` as client-go names Events, within the 253 characters a name may have.

    A resource name may itself have 253 characters; the API server refuses a longer Event name (422)
    and the Event would be lost. The random suffix keeps names unique, so the resource part is cut,
    without the dot or dash a cut may leave at its end (a name must end alphanumeric).
    """
    suffix = uuid.uuid4().hex[:16]
    prefix = resource_name[: MAX_NAME - len(suffix) - 1].rstrip(".-")
    return f"{prefix}.{suffix}" if prefix else suffix


def _timestamp(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Kube:
    def __init__(self, api_client: kubernetes.client.ApiClient, *, threads: int = API_THREADS) -> None:
        self.api_client = api_client
        # Bounded and ours alone: a slow identity provider or proxy holding other threads can not
        # delay a Secret read or a status write.
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube-api")
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.instance = os.environ.get("POD_NAME") or socket.gethostname()

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster configuration when running in a Pod, else the kubeconfig (KUBECONFIG)."""
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=configuration)
        # The client retries 3 times by default, hiding an outage for minutes; the reconciler has its
        # own backoff.
        configuration.retries = urllib3.Retry(total=1, backoff_factor=0.2)
        configuration.connection_pool_maxsize = API_THREADS
        return cls(kubernetes.client.ApiClient(configuration))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.api_client.close()

    async def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            call = functools.partial(fn, *args, _request_timeout=30, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self._pool, call)
        except ApiException as exc:
            if exc.status == 404:
                return None
            if exc.status == 403:
                raise CheckFailed(
                    Reason.ACCESS_DENIED,
                    f"the operator's ServiceAccount may not {what} (HTTP 403 Forbidden)",
                ) from None
            raise KubeUnavailable(f"{what}: HTTP {exc.status} {exc.reason}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeUnavailable(f"{what}: {type(exc).__name__}") from None

    async def read(
        self, kind: Literal["Secret", "ConfigMap"], namespace: str, name: str
    ) -> SourceObject | None:
        if kind == "Secret":
            obj = await self._call(
                f"get Secret {namespace}/{name}", self.core.read_namespaced_secret, name, namespace
            )
        else:
            obj = await self._call(
                f"get ConfigMap {namespace}/{name}", self.core.read_namespaced_config_map, name, namespace
            )
        if obj is None:
            return None
        metadata = self.api_client.sanitize_for_serialization(obj.metadata) or {}
        data: dict[str, str] = {}
        if kind == "Secret":
            for key, value in (obj.data or {}).items():
                try:
                    data[key] = base64.b64decode(value).decode()
                except (binascii.Error, UnicodeDecodeError):
                    continue  # binary keys cannot be a client secret or a PEM bundle
        else:
            data.update(obj.data or {})
        return SourceObject(
            data=data, metadata=metadata, type=getattr(obj, "type", None) if kind == "Secret" else None
        )

    async def request_token(
        self, namespace: str, service_account: str, audience: str, *, seconds: int = 3600
    ) -> str:
        """A TokenRequest for the ServiceAccount: bound to ``audience``, valid ``seconds`` (the API
        server may shorten it, never lengthen it beyond its own maximum)."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": seconds},
        }
        what = f"create serviceaccounts/token for {namespace}/{service_account}"
        try:
            result = await self._call(
                what, self.core.create_namespaced_service_account_token, service_account, namespace, body
            )
        except CheckFailed as exc:
            if exc.reason is not Reason.ACCESS_DENIED:
                raise
            raise CheckFailed(
                Reason.TOKEN_REQUEST_DENIED,
                f"the operator's ServiceAccount may not {what} (HTTP 403 Forbidden)",
            ) from None
        if result is None:
            raise CheckFailed(
                Reason.SERVICE_ACCOUNT_NOT_FOUND,
                f"ServiceAccount {namespace}/{service_account} does not exist",
            )
        token: str = result.status.token
        return token

    def assertion_source(self, namespace: str, service_account: str, audience: str) -> Callable[[], str]:
        """``request_token`` as a blocking function for MSAL's worker thread, run on this loop."""
        loop = asyncio.get_running_loop()

        def fetch() -> str:
            future = asyncio.run_coroutine_threadsafe(
                self.request_token(namespace, service_account, audience), loop
            )
            try:
                return future.result(timeout=60)
            except TimeoutError:
                future.cancel()
                raise KubeUnavailable(f"TokenRequest for {namespace}/{service_account}: no answer") from None

        return fetch

    async def write_secret(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        *,
        labels: Mapping[str, str],
        annotations: Mapping[str, str],
        owner: Mapping[str, Any],
        secret_type: str = "Opaque",  # noqa: S107 - a Secret type, not a password
    ) -> None:
        """Create or update a Secret the operator owns (renewal). The values never leave this call but
        in the API request body."""
        meta = {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels),
            "annotations": dict(annotations),
            "ownerReferences": [dict(owner)],
        }
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        patched = await self._call(
            f"patch Secret {namespace}/{name}",
            self.core.patch_namespaced_secret,
            name,
            namespace,
            {"metadata": meta, "data": encoded},
        )
        if patched is None:
            await self._call(
                f"create Secret {namespace}/{name}",
                self.core.create_namespaced_secret,
                namespace,
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": secret_type,
                    "metadata": meta,
                    "data": encoded,
                },
            )

    async def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """JSON-merge-patch ``status`` (absent keys must be given as None to be removed)."""
        result: dict[str, Any] | None = await self._call(
            f"patch {PLURAL}/status {namespace}/{name}",
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": dict(status)},
        )
        return result

    async def post_event(
        self, body: Mapping[str, Any], type_: str, reason: str, message: str, *, now: datetime | None = None
    ) -> None:
        """Post a core/v1 Event about the resource (what kubectl describe and kubectl events show)."""
        meta = body.get("metadata") or {}
        stamp = _timestamp(now)
        if len(message) > MAX_EVENT_MESSAGE:
            message = message[: MAX_EVENT_MESSAGE - 1] + "…"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": event_name(str(meta.get("name") or "")),
                "namespace": meta.get("namespace"),
            },
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": COMPONENT},
            "reportingComponent": f"{GROUP}/{COMPONENT}",
            "reportingInstance": self.instance[:128],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "eventTime": None,
            "count": 1,
            "action": "ConnectionTest",
        }
        try:
            await self._call(
                f"create events in {meta.get('namespace')}",
                self.core.create_namespaced_event,
                meta.get("namespace"),
                event,
            )
        except (CheckFailed, KubeUnavailable) as exc:
            # An Event is a notification, not state: losing one must not fail the pass.
            logger.warning(
                "Could not post Event %s for %s/%s: %s", reason, meta.get("namespace"), meta.get("name"), exc
            )
