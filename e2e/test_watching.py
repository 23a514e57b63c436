"""What the operator learns from the API server, and when it must stop: issue 10, defects 2, 3 and 9.

A control plane of this module's own (the session's shared operator watches every namespace of the
session plane and would test these resources too), the session's local Entra ID and Exchange, and
operators started here as processes:

- a paused replica stops testing: A alone, then B of higher priority joins; from A's "Pausing
  operations" on, only B tests (counted at the Exchange stand-in and in both logs);
- no ghosts: a resource deleted while the API server is down (removed in etcd, whose history is then
  compacted, so that the watch ends with 410 Gone and the operator must re-list) is dropped after the
  re-list, metric series included;
- Secrets nobody references are not downloaded: 200 Secrets of 256 KB, an operator behind a byte
  counter, across a start and a restart's re-list (the full 2,000-Secret RSS measurement is
  ``python -m e2e.bench memory``, docs/performance.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from e2e.controlplane import REPO_ROOT, ControlPlane
from e2e.fixtures import CRD_NAME, Dev, Namespace, OperatorProcess, wait_until

PEERING_CRDS = REPO_ROOT / "charts" / "smtp-oauth-operator" / "crds" / "kopf-peerings.yaml"
RECHECK = 60.0  # the CRD's minimum recheckInterval, 1m
BULK_SECRETS = 200
BULK_SIZE = 256 * 1024


@pytest.fixture(scope="module")
def plane(k8s_bin_dir: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(k8s_bin_dir)
    cp.start()
    try:
        cp.kubectl("apply", "-f", str(REPO_ROOT / "crds"), "-f", str(PEERING_CRDS))
        cp.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", timeout=90)
        wait_until(
            lambda: (
                cp.kubectl("get", "smtpoauthconfigs,clusterkopfpeerings", "-A", check=False).returncode == 0
            ),
            timeout=30,
            what="the resources in discovery",
        )
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def operators(plane: ControlPlane, tmp_path: Path) -> Iterator[Any]:
    started: list[OperatorProcess] = []

    def start(name: str, *args: str, kubeconfig: Path | None = None) -> OperatorProcess:
        op = OperatorProcess(plane, tmp_path / f"{name}.log", args or ("-A",), kubeconfig=kubeconfig)
        started.append(op)
        op.start()
        return op

    yield start
    for op in started:
        rc = op.stop()
        print(f"operator log: {op.log_file}")
        assert rc in (0, None), f"{op.log_file.name} exited with {rc} on SIGTERM:\n{op.tail()}"
        unexpected = [line for line in op.log().splitlines() if "Unexpected error" in line]
        assert not unexpected, "\n".join(unexpected[:5])


def _namespace(plane: ControlPlane, dev: Dev, base: str) -> Namespace:
    name = f"e2e-{base}-{uuid.uuid4().hex[:5]}"
    plane.kubectl("create", "namespace", name)
    ns = Namespace(plane, name, dev)
    ns.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "dev-ca"},
            "data": {"ca.pem": dev.ca_pem},
        }
    )
    return ns


def _tested(op: OperatorProcess, ns: Namespace, name: str, *, after: str | None = None) -> int:
    """How many times the current process logged a test of ``ns/name`` (after the line holding ``after``)."""
    log = op.current_log()
    if after is not None:
        at = log.rfind(after)
        log = log[at:] if at >= 0 else ""
    return log.count(f"Tested {ns.name}/{name}:")


def _ready_series(op: OperatorProcess, ns: Namespace) -> set[str]:
    names = set()
    for line in op.metrics().splitlines():
        if line.startswith("smtpoauth_ready{") and f'namespace="{ns.name}"' in line:
            names.add(line.split('name="', 1)[1].split('"', 1)[0])
    return names


# --------------------------------------------------------------------------------------------
# defect 2: a paused replica keeps working


def test_a_replica_paused_by_a_peer_of_higher_priority_stops_testing(
    plane: ControlPlane, dev: Dev, operators: Any
) -> None:
    peering = f"e2e-{uuid.uuid4().hex[:6]}"
    plane.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                              "metadata": {"name": peering}})
    )  # fmt: skip
    ns = _namespace(plane, dev, "pause")
    a = operators("a", "-A", f"--peering={peering}", "--priority=10")
    wait_until(lambda: "Resuming operations" in a.current_log(), timeout=30, what="A active")
    app = dev.new_app()
    ns.secret(app.secret)
    ns.smtp_oauth_config("mail", dev.spec(app, recheckInterval="1m"))
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested", timeout=60)
    assert _tested(a, ns, "mail") == 1

    b = operators("b", "-A", f"--peering={peering}", "--priority=20")
    wait_until(lambda: "Pausing operations" in a.current_log(), timeout=60, what="A paused in favour of B")
    logins = len(dev.auth_attempts(app))
    window = 2 * RECHECK + 15  # long enough for A's pre-fix timer to fire twice
    time.sleep(window)

    tests_by_a = _tested(a, ns, "mail", after="Pausing operations")
    tests_by_b = _tested(b, ns, "mail")
    logins = len(dev.auth_attempts(app)) - logins
    print(f"in {window:.0f} s after A paused: {logins} SMTP logins, A tested {tests_by_a}x, B {tests_by_b}x")
    assert tests_by_a == 0, f"the paused replica kept testing:\n{a.tail(30)}"
    assert 1 <= tests_by_b <= 3, b.tail(30)
    assert logins == tests_by_b, "every login at Exchange is the active replica's"
    assert "smtpoauth_ready" not in "".join(
        line for line in a.metrics().splitlines() if not line.startswith("#")
    ), "the paused replica still exports resource series"

    # B goes (a rolling update): A resumes, re-lists and works again without a restart.
    b.stop()
    wait_until(lambda: "Resuming operations" in a.current_log().rsplit("Pausing operations", 1)[-1],
               timeout=60, what="A resumed")  # fmt: skip
    ns.kubectl("annotate", "smtpoauthconfig", "mail", "smtpoauth.dev/recheck=after-failover")
    wait_until(
        lambda: _tested(a, ns, "mail", after="Pausing operations") == 1, timeout=60, what="A tests again"
    )


# --------------------------------------------------------------------------------------------
# defect 3: ghosts after a re-list


def _etcd(plane: ControlPlane, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    assert plane.etcd_url is not None
    request = urllib.request.Request(
        plane.etcd_url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def test_a_resource_deleted_while_the_watch_is_down_is_dropped_after_the_relist(
    plane: ControlPlane, dev: Dev, operators: Any
) -> None:
    ns = _namespace(plane, dev, "ghost")
    op = operators("ghost", "-A")
    app = dev.new_app()
    ns.secret(app.secret)
    for name in ("gone", "kept"):
        # No pass is due for an hour: only the re-list can drop the ghost (not a status patch's 404).
        ns.smtp_oauth_config(name, dev.spec(app, recheckInterval="1h"))
    for name in ("gone", "kept"):
        ns.wait_for_condition(name, "Ready", "True", "ConnectionTested", timeout=60)
    wait_until(lambda: _ready_series(op, ns) == {"gone", "kept"}, timeout=30, what="both series")

    # While the API server is down the resource goes, and etcd forgets its history: no DELETED event
    # can ever reach a watch; only a re-list shows that it is gone.
    plane.stop_apiserver()
    try:
        key = f"/registry/smtpoauth.dev/smtpoauthconfigs/{ns.name}/gone"
        deleted = _etcd(plane, "/v3/kv/deleterange", {"key": base64.b64encode(key.encode()).decode()})
        assert deleted.get("deleted") == "1", deleted
        _etcd(plane, "/v3/kv/compaction", {"revision": deleted["header"]["revision"], "physical": True})
    finally:
        plane.start_apiserver()
    assert ns.kubectl("get", "smtpoauthconfig", "gone", check=False).returncode != 0

    wait_until(lambda: _ready_series(op, ns) == {"kept"}, timeout=60, what="the ghost's series gone")
    restarted = op.current_log().count("listing again")
    assert restarted, "the watch did not re-list"
    # The survivor is still served by a live watch.
    ns.kubectl("annotate", "smtpoauthconfig", "kept", "smtpoauth.dev/recheck=after-relist")
    wait_until(lambda: _tested(op, ns, "kept") == 2, timeout=60, what="kept re-tested")
    assert _tested(op, ns, "gone") == 1


# --------------------------------------------------------------------------------------------
# defect 9: memory grows with Secrets nobody references


class ByteCounter:
    """A TCP relay on 127.0.0.1 that counts the bytes the API server sends through it (TLS stays end to end)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.received = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = int(self._server.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
                with self._lock:
                    self._sockets += [client, upstream]
                threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
                threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, count: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if count:
                    with self._lock:
                        self.received += len(data)
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def settle(self, quiet: float = 10.0, timeout: float = 180.0) -> int:
        """The count once nothing has arrived for ``quiet`` seconds (lists done, watches idle)."""
        deadline = time.monotonic() + timeout
        last, since = self.received, time.monotonic()
        while time.monotonic() - since < quiet:
            assert time.monotonic() < deadline, "the API server kept sending"
            time.sleep(0.25)
            if self.received != last:
                last, since = self.received, time.monotonic()
        return last

    def close(self) -> None:
        self._server.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()


def _bulk_secrets(plane: ControlPlane, namespace: str, count: int, size: int) -> None:
    """``count`` Secrets of ``size`` random bytes (the API server gzips its answers: repeated bytes
    would cost nothing on the wire), created as Helm does (no last-applied annotation)."""
    plane.kubectl("create", "namespace", namespace)
    for start in range(0, count, 25):
        items = [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": f"bulk-{i:04d}"},
                "data": {"blob": base64.b64encode(os.urandom(size)).decode()},
            }
            for i in range(start, min(start + 25, count))
        ]
        plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                             "items": items}), timeout=120)  # fmt: skip


def test_unreferenced_secrets_are_never_downloaded(
    plane: ControlPlane, dev: Dev, operators: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    _bulk_secrets(plane, f"e2e-bulk-{uuid.uuid4().hex[:5]}", BULK_SECRETS, BULK_SIZE)
    assert plane.apiserver_port is not None
    assert plane.kubeconfig is not None
    counter = ByteCounter(plane.apiserver_port)
    request.addfinalizer(counter.close)
    config = json.loads(plane.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{counter.port}"
    kubeconfig = tmp_path / "counted.kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    ns = _namespace(plane, dev, "bulk-user")
    app = dev.new_app()
    ns.secret(app.secret)
    ns.smtp_oauth_config("mail", dev.spec(app))
    data = BULK_SECRETS * BULK_SIZE
    op = operators("bulk", "-A", kubeconfig=kubeconfig)
    try:
        ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested", timeout=60)
        first = counter.settle()
        listed = _listed_secrets(op)
        op.restart()  # a restart's re-list
        second = counter.settle() - first
        relisted = _listed_secrets(op)
    finally:
        op.stop()
        counter.close()  # and again at teardown, should the operator's start have failed
    print(f"{data / 2**20:.0f} MiB of unreferenced Secret data; the operator received "
          f"{first / 2**20:.2f} MiB (start) and {second / 2**20:.2f} MiB (restart)")  # fmt: skip
    assert first < data / 20, "the operator downloaded the unreferenced Secrets' data"
    assert second < data / 20, "the restart's re-list downloaded the unreferenced Secrets' data"
    assert listed > BULK_SECRETS, "the operator did not list (the metadata of) every Secret"
    assert relisted > BULK_SECRETS


def _listed_secrets(op: OperatorProcess) -> int:
    listed = [r for r in op.log_records() if str(r.get("message", "")).startswith("Secret: listed")]
    return int(str(listed[0]["message"]).split()[2]) if listed else 0


# --------------------------------------------------------------------------------------------
# the informer itself, in-process


def test_the_informer_pages_keeps_only_names_and_versions_and_follows_changes(plane: ControlPlane) -> None:
    namespace = f"e2e-informer-{uuid.uuid4().hex[:5]}"
    plane.kubectl("create", "namespace", namespace)
    items = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"s-{i:02d}", "labels": {"big": "x" * 60},
                                                            "annotations": {"note": "y" * 1000}},
         "stringData": {"value": f"secret-{i}"}}
        for i in range(23)
    ]  # fmt: skip
    plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                         "items": items}))  # fmt: skip
    # Imported here so that the other tests of this module also run against an operator without it.
    from smtp_oauth_operator.clients.watching import SECRETS, ApiConnection, Informer  # noqa: PLC0415

    assert plane.kubeconfig is not None
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(plane.kubeconfig), client_configuration=configuration)
    resyncs: list[list[dict[str, Any]]] = []
    events: list[tuple[str, dict[str, Any]]] = []

    async def scenario() -> None:
        api = ApiConnection(configuration)
        informer = Informer(api, SECRETS, namespace, on_resync=resyncs.append,
                            on_event=lambda t, o: events.append((t, o)), page_size=5)  # fmt: skip
        task = asyncio.create_task(informer.run())
        try:
            async with asyncio.timeout(30):
                while not resyncs:
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(plane.kubectl, "delete", "secret", "s-03", "-n", namespace)
                while not events:
                    await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await api.close()

    asyncio.run(scenario())
    (listed,) = resyncs
    assert sorted(o["metadata"]["name"] for o in listed) == [f"s-{i:02d}" for i in range(23)]  # 5 pages
    for obj in listed + [o for _, o in events]:
        assert set(obj) == {"metadata"}
        assert set(obj["metadata"]) <= {"namespace", "name", "uid", "resourceVersion"}
    assert [(t, o["metadata"]["name"]) for t, o in events] == [("DELETED", "s-03")]


# --------------------------------------------------------------------------------------------
# -n a -n b: a namespace the operator may not read stops only its own watches


def test_a_forbidden_namespace_does_not_stop_the_others(
    plane: ControlPlane, dev: Dev, operators: Any, tmp_path: Path
) -> None:
    ns = _namespace(plane, dev, "allowed")
    forbidden = f"e2e-forbidden-{uuid.uuid4().hex[:5]}"
    plane.kubectl("create", "namespace", forbidden)
    rules = [
        {"apiGroups": ["smtpoauth.dev"], "resources": ["smtpoauthconfigs"], "verbs": ["list", "watch"]},
        {"apiGroups": ["smtpoauth.dev"], "resources": ["smtpoauthconfigs/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    ]
    ns.apply([
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "operator"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "operator"}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "operator"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "operator"},
         "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns.name}]},
    ])  # fmt: skip
    token = plane.token_for(ns.name, "operator")
    kubeconfig = plane.kubeconfig_for_token(token, tmp_path / "sa.kubeconfig")
    app = dev.new_app()
    ns.secret(app.secret)
    ns.smtp_oauth_config("mail", dev.spec(app))

    op = operators("two-namespaces", "-n", forbidden, "-n", ns.name, kubeconfig=kubeconfig)
    ns.wait_for_condition("mail", "Ready", "True", "ConnectionTested", timeout=60)
    wait_until(lambda: f"namespaces/{forbidden}/smtpoauthconfigs: HTTP 403" in op.current_log(),
               timeout=30, what="the forbidden namespace's failure logged")  # fmt: skip
