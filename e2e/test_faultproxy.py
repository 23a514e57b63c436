"""The fault proxy itself, against the real kube-apiserver: it forwards faithfully and injects what it says."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
import urllib3
from e2e.controlplane import ControlPlane
from e2e.faultproxy import FaultProxy, request_info
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.e2e

NS = "faultproxy"


@pytest.fixture(scope="module")
def token(control_plane: ControlPlane) -> str:
    control_plane.kubectl("create", "namespace", NS)
    control_plane.kubectl("create", "serviceaccount", "client", "-n", NS)
    control_plane.kubectl(
        "create",
        "clusterrolebinding",
        "faultproxy-client",
        "--clusterrole=cluster-admin",
        f"--serviceaccount={NS}:client",
    )
    return control_plane.token_for(NS, "client")


@pytest.fixture
def proxy(control_plane: ControlPlane, token: str, tmp_path: Path) -> Iterator[FaultProxy]:
    assert control_plane.server is not None
    assert control_plane.ca_file is not None
    with FaultProxy(control_plane.server, control_plane.ca_file, tmp_path) as proxy:
        proxy.write_kubeconfig(tmp_path / "kubeconfig", token)
        yield proxy


def _core(proxy: FaultProxy) -> kubernetes.client.CoreV1Api:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(proxy.kubeconfig), client_configuration=configuration)
    configuration.retries = False
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))


def test_request_info_follows_the_api_servers_parser() -> None:
    info = request_info("PATCH", "/apis/smtpoauth.dev/v1alpha1/namespaces/a/smtpoauthconfigs/x/status", {})
    assert (info.verb, info.resource, info.subresource, info.namespace, info.name) == (
        "PATCH",
        "smtpoauthconfigs",
        "status",
        "a",
        "x",
    )
    assert request_info("GET", "/api/v1/secrets", {"watch": ["true"]}).verb == "WATCH"
    assert request_info("GET", "/api/v1/watch/namespaces/a/secrets", {}).verb == "WATCH"
    assert request_info("GET", "/api/v1/namespaces/a/secrets", {}).verb == "LIST"
    namespace_status = request_info("PUT", "/api/v1/namespaces/a/status", {})
    assert (namespace_status.resource, namespace_status.subresource, namespace_status.name) == (
        "namespaces",
        "status",
        "a",
    )


def test_forwards_kubectl_and_the_python_client_with_the_bearer_token(
    proxy: FaultProxy, control_plane: ControlPlane
) -> None:
    out = control_plane.kubectl("get", "namespace", NS, "-o", "json", kubeconfig=proxy.kubeconfig)
    assert json.loads(out.stdout)["metadata"]["name"] == NS
    who = control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=proxy.kubeconfig)
    assert json.loads(who.stdout)["status"]["userInfo"]["username"] == f"system:serviceaccount:{NS}:client"
    core = _core(proxy)
    core.create_namespaced_config_map(NS, {"metadata": {"name": "fwd"}, "data": {"a": "b"}})
    assert core.read_namespaced_config_map("fwd", NS).data == {"a": "b"}
    assert proxy.seen("CREATE", "configmaps") == 1
    assert proxy.seen("GET", "configmaps") == 1
    assert proxy.seen("GET", "namespaces") == 1


def test_injects_http_errors_per_verb_resource_and_name_for_a_number_of_times(proxy: FaultProxy) -> None:
    core = _core(proxy)
    core.create_namespaced_config_map(NS, {"metadata": {"name": "errs"}})
    rule = proxy.inject("PATCH", "configmaps", name="errs", action="status", code=503, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as failed:
            core.patch_namespaced_config_map("errs", NS, {"data": {"x": "1"}})
        assert failed.value.status == 503
        assert json.loads(failed.value.body)["reason"] == "ServiceUnavailable"
    core.patch_namespaced_config_map("errs", NS, {"data": {"x": "1"}})  # used up
    assert core.read_namespaced_config_map("errs", NS).data == {"x": "1"}  # GET is not PATCH
    assert rule.injected == 2
    with proxy.inject("PATCH", "configmaps", action="status", code=409) as conflict:
        with pytest.raises(ApiException) as failed:
            core.patch_namespaced_config_map("errs", NS, {"data": {"x": "2"}})
        assert failed.value.status == 409
    assert conflict.injected == 1
    core.patch_namespaced_config_map("errs", NS, {"data": {"x": "2"}})  # removed


def test_gone_is_an_http_410_on_a_stale_list_and_an_error_event_on_a_watch(proxy: FaultProxy) -> None:
    core = _core(proxy)
    listed = core.list_namespaced_config_map(NS)
    rv = listed.metadata.resource_version
    proxy.inject("LIST|WATCH", "configmaps", action="gone")
    core.list_namespaced_config_map(NS)  # no resourceVersion: nothing is stale
    with pytest.raises(ApiException) as failed:
        core.list_namespaced_config_map(NS, resource_version=rv, resource_version_match="NotOlderThan")
    assert failed.value.status == 410
    with pytest.raises(ApiException) as failed:
        for _ in kubernetes.watch.Watch().stream(
            core.list_namespaced_config_map, NS, resource_version=rv, timeout_seconds=10
        ):
            pass
    assert failed.value.status == 410  # the client's reading of the ERROR event


def test_ends_open_watches_with_410_and_drops_events(proxy: FaultProxy) -> None:
    core = _core(proxy)
    rv = core.list_namespaced_config_map(NS).metadata.resource_version
    seen: list[str] = []
    errors: list[int] = []

    def watch() -> None:
        try:
            for event in kubernetes.watch.Watch().stream(
                core.list_namespaced_config_map, NS, resource_version=rv, timeout_seconds=60
            ):
                seen.append(f"{event['type']} {event['object'].metadata.name}")
        except ApiException as exc:
            errors.append(exc.status)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    proxy.wait_for(lambda: proxy.open_watches("configmaps") == 1)
    core.create_namespaced_config_map(NS, {"metadata": {"name": "w1"}})
    proxy.wait_for(lambda: "ADDED w1" in seen)
    drop = proxy.inject("WATCH", "configmaps", action="drop-events")
    core.create_namespaced_config_map(NS, {"metadata": {"name": "w2"}})
    proxy.wait_for(lambda: drop.injected >= 1)
    drop.remove()
    assert proxy.end_watches("configmaps", how="gone") == 1
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert errors == [410]
    assert "ADDED w2" not in seen


def test_stalls_until_removed_and_resets(proxy: FaultProxy) -> None:
    core = _core(proxy)
    stall = proxy.inject("GET", "namespaces", action="stall")
    started = time.monotonic()
    with pytest.raises((urllib3.exceptions.HTTPError, OSError)):
        core.read_namespace(NS, _request_timeout=1.5)
    assert time.monotonic() - started >= 1.4
    assert stall.injected == 1
    stall.remove()
    assert core.read_namespace(NS).metadata.name == NS
    with (
        proxy.inject("GET", "namespaces", action="reset") as reset,
        pytest.raises((urllib3.exceptions.HTTPError, OSError)),
    ):
        core.read_namespace(NS, _request_timeout=5)
    assert reset.injected >= 1
    assert core.read_namespace(NS).metadata.name == NS
