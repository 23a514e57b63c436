"""The e2e control plane itself: real etcd + kube-apiserver + kubectl + helm on loopback."""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from e2e.controlplane import ControlPlane, port_is_free

pytestmark = pytest.mark.e2e

K8S_MINOR = "v1.36."


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _eventually(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def test_kubectl_creates_and_gets_a_namespace(control_plane: ControlPlane) -> None:
    ns = _unique("e2e-ns")
    control_plane.kubectl("create", "namespace", ns)
    out = control_plane.kubectl("get", "namespace", ns, "-o", "json").stdout
    obj = json.loads(out)
    assert obj["metadata"]["name"] == ns
    assert obj["status"]["phase"] == "Active"
    # and the apiserver's own namespaces exist
    names = control_plane.kubectl("get", "ns", "-o", "name").stdout.split()
    assert "namespace/default" in names
    assert "namespace/kube-system" in names


def test_versions_are_stamped(control_plane: ControlPlane) -> None:
    out = control_plane.kubectl("version", "-o", "json").stdout
    versions = json.loads(out)
    assert versions["clientVersion"]["gitVersion"].startswith(K8S_MINOR), versions
    assert versions["serverVersion"]["gitVersion"].startswith(K8S_MINOR), versions
    assert versions["serverVersion"]["major"] == "1"
    assert versions["serverVersion"]["minor"] == "36"
    etcd = control_plane.run("etcd", "--version").stdout
    assert "etcd Version: 3.6." in etcd


def _raw_get(cp: ControlPlane, path: str, token: str) -> int:
    """GET with a bearer token straight over HTTPS; returns the HTTP status."""
    assert cp.ca_file is not None
    ctx = ssl.create_default_context(cafile=str(cp.ca_file))
    req = urllib.request.Request(cp.server + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def test_serviceaccount_token_is_authenticated_and_rbac_enforced(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    cp = control_plane
    ns = _unique("e2e-rbac")
    cp.kubectl("create", "namespace", ns)
    cp.kubectl("create", "serviceaccount", "robot", "-n", ns)
    cp.kubectl("create", "configmap", "cm1", "-n", ns, "--from-literal=k=v")

    token = cp.token_for(ns, "robot", duration=600)
    kubeconfig = cp.kubeconfig_for_token(token, tmp_path / "robot.kubeconfig", namespace=ns)

    who = json.loads(cp.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
    user = who["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{ns}:robot"
    assert f"system:serviceaccounts:{ns}" in user["groups"]

    # Not granted anything yet: RBAC says no, for real.
    can = cp.kubectl("auth", "can-i", "get", "configmaps", kubeconfig=kubeconfig, check=False)
    assert can.stdout.strip() == "no", can
    assert can.returncode == 1, can
    denied = cp.kubectl("get", "configmap", "cm1", kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert f"system:serviceaccount:{ns}:robot" in denied.stderr
    assert _raw_get(cp, f"/api/v1/namespaces/{ns}/configmaps/cm1", token) == 403
    assert _raw_get(cp, f"/api/v1/namespaces/{ns}/configmaps/cm1", "not-a-token") == 401

    # Grant get on configmaps in the namespace: now allowed, and still nothing else.
    cp.kubectl("create", "role", "cm-reader", "-n", ns, "--verb=get,list", "--resource=configmaps")
    cp.kubectl(
        "create", "rolebinding", "robot-cm-reader", "-n", ns,
        "--role=cm-reader", f"--serviceaccount={ns}:robot",
    )  # fmt: skip
    can = cp.kubectl("auth", "can-i", "get", "configmaps", kubeconfig=kubeconfig, check=False)
    assert can.stdout.strip() == "yes", can
    assert can.returncode == 0, can
    got = json.loads(cp.kubectl("get", "configmap", "cm1", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert got["data"] == {"k": "v"}
    assert _raw_get(cp, f"/api/v1/namespaces/{ns}/configmaps/cm1", token) == 200
    assert _raw_get(cp, f"/api/v1/namespaces/{ns}/secrets", token) == 403
    assert _raw_get(cp, "/api/v1/namespaces/default/configmaps", token) == 403


CHART_YAML = """\
apiVersion: v2
name: e2e-tiny
description: throw-away chart for the control-plane e2e test
type: application
version: 0.1.0
appVersion: "1.0"
kubeVersion: ">=1.30.0-0"
"""

CONFIGMAP_TEMPLATE = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-cm
  labels:
    app.kubernetes.io/managed-by: {{ .Release.Service }}
data:
  greeting: {{ .Values.greeting | quote }}
  kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}
"""


def test_helm_install_and_uninstall(control_plane: ControlPlane, tmp_path: Path) -> None:
    cp = control_plane
    version = cp.helm("version", "--short").stdout.strip()
    assert version.startswith("v3."), version

    chart = tmp_path / "e2e-tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(CHART_YAML)
    (chart / "values.yaml").write_text('greeting: "hello"\n')
    (chart / "templates" / "configmap.yaml").write_text(CONFIGMAP_TEMPLATE)

    ns = _unique("e2e-helm")
    cp.helm("install", "tiny", str(chart), "-n", ns, "--create-namespace", "--set", "greeting=hi")
    cm = json.loads(cp.kubectl("get", "configmap", "tiny-cm", "-n", ns, "-o", "json").stdout)
    assert cm["data"]["greeting"] == "hi"
    # helm saw the real (stamped) server version, so kubeVersion: ">=1.30" was satisfied
    assert cm["data"]["kubeVersion"].startswith(K8S_MINOR)
    releases = json.loads(cp.helm("list", "-n", ns, "-o", "json").stdout)
    assert [r["name"] for r in releases] == ["tiny"]
    assert releases[0]["status"] == "deployed"

    cp.helm("uninstall", "tiny", "-n", ns)
    gone = cp.kubectl("get", "configmap", "tiny-cm", "-n", ns, check=False)
    assert gone.returncode != 0
    assert "NotFound" in gone.stderr
    assert json.loads(cp.helm("list", "-n", ns, "-o", "json").stdout) == []


def test_restart_apiserver_keeps_data(control_plane: ControlPlane) -> None:
    cp = control_plane
    ns = _unique("e2e-restart")
    cp.kubectl("create", "namespace", ns)
    cp.kubectl("create", "configmap", "survivor", "-n", ns, "--from-literal=x=1")
    server, old_pid = cp.server, cp.pids["kube-apiserver"]

    cp.restart_apiserver()

    assert cp.server == server
    assert cp.pids["kube-apiserver"] != old_pid
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)
    got = json.loads(cp.kubectl("get", "configmap", "survivor", "-n", ns, "-o", "json").stdout)
    assert got["data"] == {"x": "1"}


def test_stop_leaves_no_process_or_port_behind(k8s_bin_dir: Path) -> None:
    with ControlPlane(k8s_bin_dir) as cp:
        assert cp.is_running()
        pids = cp.all_pids
        ports = dict(cp.ports)
        workdir = cp.workdir
        assert len(pids) == 2
        assert len(ports) == 3
        assert not any(port_is_free(p) for p in ports.values())
        cp.kubectl("get", "ns")
    # context exit stopped it
    assert not cp.is_running()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # nothing left in the component's process group either
    for name, port in ports.items():
        assert port_is_free(port), f"{name} port {port} still in use"
    assert workdir is not None
    assert not workdir.exists()


def test_controller_manager_collects_garbage_and_deletes_namespaces(k8s_bin_dir: Path) -> None:
    with ControlPlane(k8s_bin_dir, controller_manager=True) as cp:
        assert "kube-controller-manager" in cp.pids
        ns = _unique("e2e-kcm")
        cp.kubectl("create", "namespace", ns)
        # serviceaccount controller: every namespace gets a `default` ServiceAccount
        assert _eventually(
            lambda: cp.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0
        ), "no default ServiceAccount"
        # garbage collector: deleting the owner deletes the dependent
        cp.kubectl("create", "configmap", "owner", "-n", ns)
        uid = cp.kubectl("get", "cm", "owner", "-n", ns, "-o", "jsonpath={.metadata.uid}").stdout
        child = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "child",
                "namespace": ns,
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
            },
        }
        cp.kubectl("apply", "-f", "-", input=json.dumps(child))
        cp.kubectl("delete", "configmap", "owner", "-n", ns)
        assert _eventually(lambda: cp.kubectl("get", "cm", "child", "-n", ns, check=False).returncode != 0), (
            "dependent ConfigMap was not garbage-collected"
        )
        # namespace controller: a deleted namespace goes away instead of staying Terminating
        cp.kubectl("delete", "namespace", ns, "--timeout=60s")
        gone = cp.kubectl("get", "namespace", ns, check=False)
        assert gone.returncode != 0
        assert "NotFound" in gone.stderr
