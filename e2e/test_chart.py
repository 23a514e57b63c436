"""The Helm chart on a real API server: lint, schema, server-side validation, install/upgrade/uninstall,
and the proof that its RBAC is what the operator needs: no more (an audit log of the API server lists
every call the operator made as the chart's ServiceAccount) and no less (it reaches Ready with a
TokenRequest token of that ServiceAccount), and that a missing rule is a log line and a condition.

This module runs its own control plane (etcd + kube-apiserver, as ``control_plane``) for two reasons:
the API server writes an audit log here, and the session's plane hosts the shared operator of
e2e/fixtures.py, which runs as cluster admin and would make SmtpOAuthConfigs Ready whatever the
chart's RBAC says, and which applies the CRD with kubectl (Helm refuses to adopt a CRD it does not own).

There is no kubelet: Pods are never started, so `helm install` runs without --wait, the operator runs
here as a process with the chart ServiceAccount's token, and the `helm test` hook is rendered and
validated while the request it makes (GET /healthz) is made against the operator process instead.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.controlplane import REPO_ROOT, ControlPlane, free_port
from e2e.fixtures import OPERATOR_CMD, operator_env

from smtp_oauth_operator.testing.devservers import DevServers
from smtp_oauth_operator.testing.graph import GRAPH_RESOURCE

pytestmark = pytest.mark.e2e

CHART = REPO_ROOT / "charts" / "smtp-oauth-operator"
TESTDATA = Path(__file__).resolve().parent / "testdata"
CRD_NAME = "smtpoauthconfigs.smtpoauth.dev"
CLIENT_SECRET = "chart-e2e~CANARY.client-secret_0123456789"

# Every optional feature on (and a namespaced hot standby).
EVERYTHING_ON: dict[str, Any] = {
    "replicas": 2,
    "watch": {"namespaces": ["team-a", "team-b"]},
    "operator": {"logLevel": "debug", "logFormat": "json", "extraEnv": [{"name": "EXTRA", "value": "1"}]},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
    },
    "networkPolicy": {
        "enabled": True,
        "apiServerCIDRs": ["10.0.0.1/32"],
        "ingressFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
        "extraEgress": [{"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}], "ports": [{"port": 3128}]}],
    },
    "podDisruptionBudget": {"enabled": True},
    "grafanaDashboard": {"enabled": True, "labels": {"release": "prometheus"}},
    "proxy": {"httpsProxy": "http://proxy.corp.example:3128", "noProxy": ".svc,.cluster.local"},
    "extraCaBundle": {"enabled": True, "configMapName": "corp-ca"},
    "commonLabels": {"team": "mail"},
    "podAnnotations": {"example.com/owner": "mail-team"},
    "serviceAccount": {"annotations": {"example.com/purpose": "smtp-oauth-operator"}},
    "image": {"digest": "sha256:" + "0" * 64},
}

NAMESPACED_RULES = {
    ("smtpoauth.dev", "smtpoauthconfigs", "list"),
    ("smtpoauth.dev", "smtpoauthconfigs", "watch"),
    ("smtpoauth.dev", "smtpoauthconfigs/status", "patch"),
    ("", "secrets", "get"),
    ("", "secrets", "list"),
    ("", "secrets", "watch"),
    ("", "configmaps", "get"),
    ("", "configmaps", "list"),
    ("", "configmaps", "watch"),
    ("", "events", "create"),
}
# Granted for workload identity federation (rbac.serviceAccountTokens, on by default); used only by
# resources with spec.identity.workloadIdentity.serviceAccountName.
TOKEN_REQUEST_RULE = ("", "serviceaccounts/token", "create")
# Granted only with rbac.renewSecrets (off by default): client-secret renewal writes the Secret it owns.
RENEW_SECRET_RULES = {("", "secrets", "create"), ("", "secrets", "patch")}
CLUSTER_ONLY_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}

AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
"""


# --------------------------------------------------------------------------------------------
# fixtures


@dataclass
class Plane:
    cp: ControlPlane
    audit_log: Path
    tmp: Path

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cp.helm(*args, check=check)

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.cp.kubectl(*args, **kwargs)

    def values_file(self, name: str, values: Mapping[str, Any]) -> str:
        path = self.tmp / f"{name}.values.yaml"
        path.write_text(yaml.safe_dump(dict(values)))
        return str(path)

    def template(self, release: str, namespace: str, *args: str) -> list[dict[str, Any]]:
        out = self.helm("template", release, str(CHART), "-n", namespace, *args).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    def dry_run_server(self, manifests: str) -> str:
        return self.kubectl("apply", "--dry-run=server", "-f", "-", input=manifests).stdout

    def ensure_namespace(self, name: str) -> None:
        if self.kubectl("get", "namespace", name, check=False).returncode != 0:
            self.kubectl("create", "namespace", name)

    def get_json(self, *args: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.kubectl("get", *args, "-o", "json").stdout)
        return result

    def audit(self, user: str) -> list[dict[str, Any]]:
        """Audit events (Metadata level) of one user, in order."""
        events = []
        for line in self.audit_log.read_text().splitlines():
            event = json.loads(line)
            if event.get("user", {}).get("username") == user:
                events.append(event)
        return events


@pytest.fixture(scope="module")
def plane(k8s_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    tmp = tmp_path_factory.mktemp("chart")
    policy = tmp / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    audit_log = tmp / "audit.log"
    cp = ControlPlane(
        k8s_bin_dir,
        extra_apiserver_flags=[
            f"--audit-policy-file={policy}",
            f"--audit-log-path={audit_log}",
            "--audit-log-mode=blocking",  # written before the response: the log is complete when read
            # On by default in OpenShift: changing an object's ownerReferences needs `delete` on it (create
            # excepted). The renewal's owned Secret carries one; the chart's rules must be enough with it on.
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
        ],
    )
    cp.start()
    try:
        yield Plane(cp, audit_log, tmp)
    finally:
        cp.stop()


@pytest.fixture(scope="module")
def dev_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServers]:
    with DevServers(tmp_path_factory.mktemp("dev"), client_secret=CLIENT_SECRET) as servers:
        yield servers


@pytest.fixture
def crd_installed(plane: Plane) -> None:
    """The CRD, for installs with crds.enabled=false (as when CRDs are managed apart from the chart)."""
    if plane.kubectl("get", "crd", CRD_NAME, check=False).returncode != 0:
        plane.kubectl("create", "-f", str(REPO_ROOT / "crds"))
    plane.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")


class Operator:
    """The operator as a process, authenticated with a kubeconfig holding a ServiceAccount token."""

    def __init__(
        self,
        plane: Plane,
        kubeconfig: Path,
        args: list[str],
        name: str,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.health_port = free_port()
        self.log_path = plane.tmp / f"{name}.log"
        self._log = self.log_path.open("wb")
        env = operator_env({k: v for k, v in os.environ.items() if k not in {"HTTPS_PROXY", "https_proxy"}})
        env["KUBECONFIG"] = str(kubeconfig)
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [
                *OPERATOR_CMD,
                "run",
                *args,
                "--log-level=debug",
                "--log-format=full",
                f"--liveness=http://127.0.0.1:{self.health_port}/healthz",
            ],
            env=env,
            cwd=plane.tmp,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started = time.monotonic()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def healthz(self) -> int:
        """What the chart's `helm test` hook does: GET kopf's liveness endpoint."""
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.alive(), f"operator exited ({self.proc.returncode}):\n{self.log[-4000:]}"
            try:
                if self.healthz() == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /healthz within {timeout:.0f}s:\n{self.log[-4000:]}"
            time.sleep(0.3)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def run_operator(plane: Plane) -> Iterator[Any]:
    started: list[Operator] = []

    def start(
        namespace: str, service_account: str, args: list[str], name: str, env: Mapping[str, str] | None = None
    ) -> Operator:
        token = plane.cp.token_for(namespace, service_account, duration=3600)
        kubeconfig = plane.cp.kubeconfig_for_token(token, plane.tmp / f"{name}.kubeconfig")
        operator = Operator(plane, kubeconfig, args, name, env)
        started.append(operator)
        operator.wait_healthy()
        return operator

    yield start
    for operator in started:
        operator.stop()


def _sample_items(dev: DevServers, namespace: str, name: str = "mail") -> list[dict[str, Any]]:
    """A ConfigMap with the dev CA, the client secret, and a SmtpOAuthConfig using both."""
    e = dev.endpoints
    ca_ref = {"configMapKeyRef": {"name": "dev-ca", "key": "ca.pem"}}
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "dev-ca", "namespace": namespace},
            "data": {"ca.pem": Path(e.ca_file).read_text()},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "exo-app", "namespace": namespace},
            "stringData": {"client-secret": CLIENT_SECRET},
        },
        {
            "apiVersion": "smtpoauth.dev/v1alpha1",
            "kind": "SmtpOAuthConfig",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "username": e.mailbox,
                "smtp": {
                    "host": e.smtp_host,
                    "port": e.smtp_port,
                    "connectionTimeoutSeconds": 5,
                    "caBundle": dict(ca_ref),
                },
                "identity": {
                    "tenantId": e.tenant_id,
                    "clientId": e.client_id,
                    "authorityHost": e.authority_host,
                    "timeoutSeconds": 5,
                    "caBundle": dict(ca_ref),
                    "clientSecret": {"secretKeyRef": {"name": "exo-app", "key": "client-secret"}},
                },
            },
        },
    ]


def _apply_sample(plane: Plane, dev: DevServers, namespace: str, name: str = "mail") -> None:
    items = _sample_items(dev, namespace, name)
    plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def _ready(plane: Plane, namespace: str, name: str) -> dict[str, Any] | None:
    obj = plane.get_json("smtpoauthconfig", name, "-n", namespace)
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == "Ready":
            return dict(cond)
    return None


def _wait_for_event(plane: Plane, namespace: str, name: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The Events about ``name`` once there is one (the operator posts them after writing status)."""
    deadline = time.monotonic() + timeout
    while True:
        items: list[dict[str, Any]] = plane.get_json(
            "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"
        )["items"]
        if items:
            return items
        assert time.monotonic() < deadline, f"no Event about {namespace}/{name} within {timeout:.0f}s"
        time.sleep(0.3)


def _calls(events: list[dict[str, Any]]) -> list[tuple[str, str, str, str, int]]:
    """(group, resource[/subresource], verb, namespace, code) of each resource request."""
    calls = []
    for event in events:
        ref = event.get("objectRef")
        if not ref:
            continue  # discovery (/api, /apis/...): allowed to every authenticated user
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        calls.append(
            (
                ref.get("apiGroup", ""),
                resource,
                event["verb"],
                ref.get("namespace", ""),
                int(event["responseStatus"]["code"]),
            )
        )
    return calls


def _rules(role: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    granted = set()
    for rule in role.get("rules", []):
        if rule.get("resourceNames"):
            continue
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    granted.add((group, resource, verb))
    return granted


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


# --------------------------------------------------------------------------------------------
# lint, schema, documentation


def test_lint_strict_with_defaults_and_with_everything_on(plane: Plane) -> None:
    plane.helm("lint", "--strict", str(CHART))
    everything = plane.values_file("everything", EVERYTHING_ON)
    out = plane.helm("lint", "--strict", str(CHART), "-f", everything).stdout
    assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicas": "two"}, "at '/replicas': got string, want integer"),
        ({"replicass": 2}, "additional properties 'replicass' not allowed"),
        ({"metrics": {"serviceMonitor": {"enable": True}}}, "additional properties 'enable' not allowed"),
        ({"operator": {"logLevel": "verbose"}}, "value must be one of 'warning', 'info', 'debug'"),
        ({"watch": {"namespaces": "team-a"}}, "at '/watch/namespaces': got string, want array"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
    ],
)
def test_schema_rejects_bad_values_with_a_clear_message(
    plane: Plane, values: dict[str, Any], message: str
) -> None:
    path = plane.values_file("bad", values)
    for command in (["template", "bad"], ["install", "bad", "--dry-run=client"]):
        result = plane.helm(*command, str(CHART), "-f", path, check=False)
        assert result.returncode != 0, result.stdout
        assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
        assert message in result.stderr, result.stderr


def _values_keys(text: str) -> tuple[list[str], list[str]]:
    """(documented, undocumented) key paths of values.yaml, helm-docs style.

    A key is documented by a comment block above it that contains a `# --` line. A section (a key whose
    first child is documented) needs none, nor do keys inside a documented default (resources.limits).
    """
    lines = text.splitlines()
    stack: list[tuple[int, str]] = []
    documented: list[str] = []
    undocumented: list[str] = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parents = [k for _, k in stack]
        path = ".".join([*parents, key])
        stack.append((indent, key))
        block = []
        for previous in reversed(lines[:number]):
            if not previous.lstrip().startswith("#"):
                break
            block.append(previous.strip())
        following = lines[number + 1].strip() if number + 1 < len(lines) else ""
        if rest == "" and following.startswith("# --"):
            continue
        if any(b.startswith("# --") for b in block):
            documented.append(path)
        elif not any(".".join(parents[:i]) in documented for i in range(1, len(parents) + 1)):
            undocumented.append(path)
    return documented, undocumented


def test_values_are_documented_for_helm_show_values_and_the_readme(plane: Plane) -> None:
    text = (CHART / "values.yaml").read_text()
    assert plane.helm("show", "values", str(CHART)).stdout.strip() == text.strip()
    documented, undocumented = _values_keys(text)
    assert not undocumented, f"values.yaml: no `# --` comment above {undocumented}"
    assert len(documented) > 50
    readme = (CHART / "README.md").read_text()
    missing = [path for path in documented if f"| `{path}` |" not in readme]
    assert not missing, f"README.md has no row for {missing}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path in documented:
        node = schema
        for part in path.split("."):
            assert part in node.get("properties", {}), f"values.schema.json does not describe {path}"
            node = node["properties"][part]


# --------------------------------------------------------------------------------------------
# rendering, validated by the API server


def test_defaults_render_a_safe_standalone_operator_accepted_by_the_api_server(plane: Plane) -> None:
    plane.ensure_namespace("chart-render")
    docs = plane.template("smtp", "chart-render")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "Deployment",
            "Pod",  # the helm test hook
            "Service",
            "ServiceAccount",
        ]
    )
    out = plane.dry_run_server(plane.helm("template", "smtp", str(CHART), "-n", "chart-render").stdout)
    assert "deployment.apps/smtp-smtp-oauth-operator created (server dry run)" in out, out

    (deployment,) = _by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert container["args"] == [
        "--all-namespaces",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--metrics-port=9090",
        "--workers=8",
        "--log-level=info",
        "--log-format=json",
    ]
    assert container["image"] == "ghcr.io/smtp-oauth-operator/smtp-oauth-operator:0.1.0"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["automountServiceAccountToken"] is True
    (service_account,) = _by_kind(docs, "ServiceAccount")
    assert service_account["automountServiceAccountToken"] is False
    (hook,) = _by_kind(docs, "Pod")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert hook["spec"]["automountServiceAccountToken"] is False
    assert (
        "http://smtp-smtp-oauth-operator.chart-render.svc:8080/healthz"
        in hook["spec"]["containers"][0]["command"][2]
    )

    (crd,) = _by_kind(docs, "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    canonical = yaml.safe_load((REPO_ROOT / "crds" / f"{CRD_NAME}.yaml").read_text())
    assert crd["spec"] == canonical["spec"], "the rendered CRD is not crds/ (templates/crds.yaml)"

    roles = {r["metadata"]["name"]: r for r in _by_kind(docs, "ClusterRole")}
    operator_role = roles["smtp-smtp-oauth-operator"]
    assert _rules(operator_role) == NAMESPACED_RULES | CLUSTER_ONLY_RULES | {TOKEN_REQUEST_RULE}
    assert not [r for r in operator_role["rules"] if r.get("resourceNames")]
    view = roles["smtp-smtp-oauth-operator-view"]
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    edit = roles["smtp-smtp-oauth-operator-edit"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"

    no_crd = plane.template("smtp", "chart-render", "--set", "crds.enabled=false")
    assert not _by_kind(no_crd, "CustomResourceDefinition")
    not_kept = plane.template("smtp", "chart-render", "--set", "crds.keep=false")
    assert "annotations" not in _by_kind(not_kept, "CustomResourceDefinition")[0]["metadata"]


def test_everything_on_renders_objects_accepted_by_the_api_server(plane: Plane) -> None:
    """ServiceMonitor and PrometheusRule are validated against the minimal CRDs in e2e/testdata/; the
    peering CRDs are the chart's own crds/ (installed first, as Helm does)."""
    plane.kubectl("apply", "-f", str(TESTDATA / "monitoring-crds.yaml"))
    plane.kubectl("apply", "-f", str(CHART / "crds"))
    for crd in (
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    ):
        plane.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    for namespace in ("chart-all", "team-a", "team-b"):
        plane.ensure_namespace(namespace)
    everything = plane.values_file("everything", EVERYTHING_ON)
    manifests = plane.helm("template", "smtp", str(CHART), "-n", "chart-all", "-f", everything).stdout
    out = plane.dry_run_server(manifests)
    for created in (
        "servicemonitor.monitoring.coreos.com/smtp-smtp-oauth-operator created",
        "prometheusrule.monitoring.coreos.com/smtp-smtp-oauth-operator created",
        "networkpolicy.networking.k8s.io/smtp-smtp-oauth-operator created",
        "poddisruptionbudget.policy/smtp-smtp-oauth-operator created",
        "kopfpeering.kopf.dev/smtp-smtp-oauth-operator created",
        "role.rbac.authorization.k8s.io/smtp-smtp-oauth-operator created",
        "configmap/smtp-smtp-oauth-operator-dashboard created",
    ):
        assert created in out, out

    docs = [d for d in yaml.safe_load_all(manifests) if d]
    (deployment,) = _by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"].endswith("@sha256:" + "0" * 64)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    args = container["args"]
    assert args[:2] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--all-namespaces" not in args
    assert "--peering=smtp-smtp-oauth-operator" in args
    assert "--log-level=debug" in args
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HTTPS_PROXY"] == "http://proxy.corp.example:3128"
    assert env["NO_PROXY"] == ".svc,.cluster.local"
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == "/etc/smtp-oauth-operator/ca/ca-bundle.crt"
    assert env["EXTRA"] == "1"
    (init,) = pod["initContainers"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert {v["name"] for v in pod["volumes"]} == {"tmp", "extra-ca", "ca-bundle"}

    # Namespaced: no cluster-wide grant to the operator; a Role with the same rules in each namespace,
    # plus the peering object's.
    cluster_roles = [r["metadata"]["name"] for r in _by_kind(docs, "ClusterRole")]
    assert sorted(cluster_roles) == ["smtp-smtp-oauth-operator-edit", "smtp-smtp-oauth-operator-view"]
    assert not _by_kind(docs, "ClusterRoleBinding")
    roles = _by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert _rules(role) == NAMESPACED_RULES | {
            TOKEN_REQUEST_RULE,
            ("kopf.dev", "kopfpeerings", "list"),
            ("kopf.dev", "kopfpeerings", "watch"),
        }
        (named,) = [r for r in role["rules"] if r.get("resourceNames")]
        assert named == {
            "apiGroups": ["kopf.dev"],
            "resources": ["kopfpeerings"],
            "resourceNames": ["smtp-smtp-oauth-operator"],
            "verbs": ["patch"],
        }
    peerings = _by_kind(docs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]

    # Workload identity federation's TokenRequest can be turned off.
    without = plane.template("smtp", "chart-all", "--set", "rbac.serviceAccountTokens=false")
    assert [r for r in _by_kind(without, "ClusterRole") if TOKEN_REQUEST_RULE in _rules(r)] == []
    # Writing Secrets (client-secret renewal) is off unless asked for.
    assert not [r for r in _by_kind(docs, "ClusterRole") if ("", "secrets", "create") in _rules(r)]
    renewing = plane.template("smtp", "chart-all", "--set", "rbac.renewSecrets=true")
    (granted,) = [r for r in _by_kind(renewing, "ClusterRole") if ("", "secrets", "create") in _rules(r)]
    assert ("", "secrets", "patch") in _rules(granted)
    assert ("", "secrets", "delete") not in _rules(granted)

    (rule,) = _by_kind(docs, "PrometheusRule")
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert alerts["SmtpOAuthClientSecretExpiringSoon"]["expr"] == (
        "smtpoauth_client_secret_expiration_timestamp_seconds - time() < 14 * 24 * 3600"
    )
    assert alerts["SmtpOAuthNotReady"]["expr"] == "smtpoauth_ready == 0"
    assert alerts["SmtpOAuthNotReady"]["for"] == "15m"
    assert "{{ $labels.namespace }}" in alerts["SmtpOAuthNotReady"]["annotations"]["summary"]

    (policy,) = _by_kind(docs, "NetworkPolicy")
    egress_ports = [sorted(p["port"] for p in rule.get("ports", [])) for rule in policy["spec"]["egress"]]
    assert egress_ports == [[53, 53], [443, 6443], [443, 465, 587], [3128]]

    # Cluster-wide with a hot standby: a ClusterKopfPeering and patch on that one object only.
    cluster_docs = plane.template("smtp", "chart-all", "--set", "replicas=3")
    (peering,) = _by_kind(cluster_docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "smtp-smtp-oauth-operator"
    operator_role = next(
        r
        for r in _by_kind(cluster_docs, "ClusterRole")
        if r["metadata"]["name"] == "smtp-smtp-oauth-operator"
    )
    assert _rules(operator_role) >= {("kopf.dev", "clusterkopfpeerings", "watch")}
    assert ("kopf.dev", "clusterkopfpeerings", "patch") not in _rules(operator_role)


def test_a_service_monitor_without_the_metrics_service_is_refused(plane: Plane) -> None:
    result = plane.helm(
        "template", "smtp", str(CHART), "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "service.enabled=false", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "metrics.serviceMonitor.enabled needs metrics.enabled and service.enabled" in result.stderr


# --------------------------------------------------------------------------------------------
# install, upgrade, uninstall


def test_install_upgrade_uninstall_keeps_the_crd(plane: Plane) -> None:
    release, namespace = "lifecycle", "chart-lifecycle"
    existing = plane.kubectl("get", "crd", CRD_NAME, "-o", "json", check=False)
    if existing.returncode == 0:
        owner = (
            json.loads(existing.stdout)["metadata"].get("annotations", {}).get("meta.helm.sh/release-name")
        )
        if owner != release:  # created by another test with kubectl: Helm would refuse to adopt it
            plane.kubectl("delete", "crd", CRD_NAME, "--wait=true", "--timeout=60s")

    plane.helm("install", release, str(CHART), "-n", namespace, "--create-namespace")
    plane.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    crd = plane.get_json("crd", CRD_NAME)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == release
    deployment = plane.get_json("deployment", "lifecycle-smtp-oauth-operator", "-n", namespace)
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--log-level=info" in args
    assert "--all-namespaces" in args
    plane.get_json("clusterrole", "lifecycle-smtp-oauth-operator")
    plane.get_json("clusterrolebinding", "lifecycle-smtp-oauth-operator")
    sa = plane.get_json("serviceaccount", "lifecycle-smtp-oauth-operator", "-n", namespace)
    assert sa["automountServiceAccountToken"] is False

    # Upgrade: debug logs, and watching one namespace (Roles instead of the ClusterRole).
    plane.ensure_namespace("chart-lifecycle-watched")
    plane.helm(
        "upgrade", release, str(CHART), "-n", namespace, "--reuse-values",
        "--set", "operator.logLevel=debug", "--set", "watch.namespaces={chart-lifecycle-watched}",
    )  # fmt: skip
    deployment = plane.get_json("deployment", "lifecycle-smtp-oauth-operator", "-n", namespace)
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--log-level=debug" in args
    assert "--namespace=chart-lifecycle-watched" in args
    assert "--all-namespaces" not in args
    gone = plane.kubectl("get", "clusterrole", "lifecycle-smtp-oauth-operator", check=False)
    assert "NotFound" in gone.stderr
    plane.get_json("role", "lifecycle-smtp-oauth-operator", "-n", "chart-lifecycle-watched")
    plane.get_json("rolebinding", "lifecycle-smtp-oauth-operator", "-n", "chart-lifecycle-watched")
    history = json.loads(plane.helm("history", release, "-n", namespace, "-o", "json").stdout)
    assert [h["revision"] for h in history] == [1, 2]
    assert history[-1]["status"] == "deployed"

    # Uninstall: everything goes but the CRD (and so every SmtpOAuthConfig stays).
    out = plane.helm("uninstall", release, "-n", namespace).stdout
    assert "kept due to the resource policy" in out or CRD_NAME in out, out
    assert "NotFound" in plane.kubectl("get", "deployment", "-n", namespace, "lifecycle-smtp-oauth-operator",
                                       check=False).stderr  # fmt: skip
    assert "NotFound" in plane.kubectl("get", "role", "-n", "chart-lifecycle-watched",
                                       "lifecycle-smtp-oauth-operator", check=False).stderr  # fmt: skip
    plane.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=10s")

    # The same release installs again over the kept CRD.
    plane.helm("install", release, str(CHART), "-n", namespace)
    plane.helm("uninstall", release, "-n", namespace)
    plane.get_json("crd", CRD_NAME)


# --------------------------------------------------------------------------------------------
# RBAC: the chart's ServiceAccount is enough, and exactly enough


def test_cluster_wide_rbac_is_sufficient_and_is_exactly_what_the_operator_uses(
    plane: Plane, dev_servers: DevServers, crd_installed: None, run_operator: Any
) -> None:
    release, namespace, watched = "rbac", "chart-rbac", "chart-rbac-mail"
    plane.ensure_namespace(watched)
    plane.helm("install", release, str(CHART), "-n", namespace, "--create-namespace",
               "--set", "crds.enabled=false")  # fmt: skip
    sa = "rbac-smtp-oauth-operator"
    operator = run_operator(namespace, sa, ["--all-namespaces"], "rbac")

    _apply_sample(plane, dev_servers, watched)
    wait = plane.kubectl(
        "wait", "--for=condition=Ready", "smtpoauthconfig/mail", "-n", watched, "--timeout=90s", check=False
    )
    assert wait.returncode == 0, f"{wait.stderr}\n{_ready(plane, watched, 'mail')}\n{operator.log[-4000:]}"
    assert operator.healthz() == 200  # what `helm test` checks
    events = _wait_for_event(plane, watched, "mail")
    assert {e["reason"] for e in events} >= {"ConnectionTestSucceeded"}
    assert operator.alive()

    calls = _calls(plane.audit(f"system:serviceaccount:{namespace}:{sa}"))
    assert calls, "no audited calls from the operator"
    denied = [c for c in calls if c[4] == 403]
    assert not denied, f"the chart's RBAC denied: {denied}"
    used = {(g, r, v) for g, r, v, _, _ in calls}
    role = plane.get_json("clusterrole", "rbac-smtp-oauth-operator")
    granted = _rules(role)
    assert used <= granted
    # TokenRequest is granted for workload identity federation, which this sample does not use
    # (e2e/test_credentials.py exercises it and its denial).
    assert granted - used - {TOKEN_REQUEST_RULE} == set(), f"granted but never used: {granted - used}"
    assert "Forbidden" not in operator.log
    assert CLIENT_SECRET not in operator.log


def test_namespaced_rbac_is_sufficient_without_any_cluster_wide_permission(
    plane: Plane, dev_servers: DevServers, crd_installed: None, run_operator: Any
) -> None:
    release, namespace, watched = "rbacns", "chart-rbacns", "chart-rbacns-mail"
    plane.ensure_namespace(watched)
    plane.helm("install", release, str(CHART), "-n", namespace, "--create-namespace",
               "--set", "crds.enabled=false", "--set", f"watch.namespaces={{{watched}}}")  # fmt: skip
    sa = "rbacns-smtp-oauth-operator"
    assert "NotFound" in plane.kubectl("get", "clusterrolebinding", sa, check=False).stderr
    deployment = plane.get_json("deployment", sa, "-n", namespace)
    args = [
        a
        for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        if a.startswith("--namespace")
    ]
    assert args == [f"--namespace={watched}"]

    operator = run_operator(namespace, sa, args, "rbacns")
    _apply_sample(plane, dev_servers, watched)
    wait = plane.kubectl(
        "wait", "--for=condition=Ready", "smtpoauthconfig/mail", "-n", watched, "--timeout=90s", check=False
    )
    assert wait.returncode == 0, f"{wait.stderr}\n{_ready(plane, watched, 'mail')}\n{operator.log[-4000:]}"

    _wait_for_event(plane, watched, "mail")
    calls = _calls(plane.audit(f"system:serviceaccount:{namespace}:{sa}"))
    assert not [c for c in calls if c[4] == 403], calls
    assert {c[3] for c in calls} == {watched}, "a call outside the watched namespace"
    assert {(g, r, v) for g, r, v, _, _ in calls} == NAMESPACED_RULES
    assert "Forbidden" not in operator.log


def test_a_missing_permission_is_a_log_line_and_a_condition_not_a_crash_loop(
    plane: Plane, dev_servers: DevServers, crd_installed: None, run_operator: Any
) -> None:
    release, namespace, watched = "deny", "chart-deny", "chart-deny-mail"
    plane.ensure_namespace(watched)
    plane.helm("install", release, str(CHART), "-n", namespace, "--create-namespace",
               "--set", "crds.enabled=false")  # fmt: skip
    sa = "deny-smtp-oauth-operator"
    # An operator whose ClusterRole lost the ConfigMaps rule (an old chart, a hand-edited role, a policy engine).
    role = plane.get_json("clusterrole", sa)
    index = next(i for i, r in enumerate(role["rules"]) if r["resources"] == ["configmaps"])
    plane.kubectl("patch", "clusterrole", sa, "--type=json",
                  "-p", json.dumps([{"op": "remove", "path": f"/rules/{index}"}]))  # fmt: skip
    can = plane.kubectl("auth", "can-i", "list", "configmaps", f"--as=system:serviceaccount:{namespace}:{sa}",
                        "-A", check=False)  # fmt: skip
    assert can.stdout.strip() == "no"

    operator = run_operator(namespace, sa, ["--all-namespaces"], "deny")
    _apply_sample(plane, dev_servers, watched)
    deadline = time.monotonic() + 60
    while (ready := _ready(plane, watched, "mail")) is None or ready["reason"] != "AccessDenied":
        assert time.monotonic() < deadline, f"{ready}\n{operator.log[-4000:]}"
        time.sleep(0.5)
    assert ready["status"] == "False"
    assert ready["message"].startswith("The operator's ServiceAccount may not get ConfigMap"), ready
    assert "403" in ready["message"]

    # kopf gives up on a request after ~54 s of retries and then stops the operator: outlive that.
    while time.monotonic() - operator.started < 70:
        assert operator.alive(), f"the operator exited ({operator.proc.returncode}):\n{operator.log[-4000:]}"
        time.sleep(1)
    assert operator.alive()
    assert operator.healthz() == 200
    assert re.search(r'configmaps is forbidden: User "system:serviceaccount:chart-deny:deny-smtp-oauth-operator" '
                     r'cannot list resource "configmaps"', operator.log)  # fmt: skip
    assert re.search(r"ConfigMap list/watch failed \(GET /api/v1/configmaps: HTTP 403 Forbidden: .*\); "
                     r"listing again in \d+ s", operator.log)  # fmt: skip
    assert "escalating" not in operator.log

    # Granting the rule back heals it without a restart: the watch resumes, the resource gets Ready.
    plane.helm("upgrade", release, str(CHART), "-n", namespace, "--reuse-values")
    plane.kubectl(
        "annotate", "smtpoauthconfig", "mail", "-n", watched, "smtpoauth.dev/recheck=after-rbac-fix"
    )
    wait = plane.kubectl(
        "wait", "--for=condition=Ready", "smtpoauthconfig/mail", "-n", watched, "--timeout=90s", check=False
    )
    assert wait.returncode == 0, f"{wait.stderr}\n{_ready(plane, watched, 'mail')}\n{operator.log[-4000:]}"


def test_replicas_two_are_one_active_operator_and_a_hot_standby(
    plane: Plane, dev_servers: DevServers, crd_installed: None, run_operator: Any
) -> None:
    release, namespace, watched = "peer", "chart-peer", "chart-peer-mail"
    plane.ensure_namespace(watched)
    plane.helm("install", release, str(CHART), "-n", namespace, "--create-namespace",
               "--set", "crds.enabled=false", "--set", "replicas=2")  # fmt: skip
    sa = peering = "peer-smtp-oauth-operator"
    plane.get_json("clusterkopfpeering", peering)
    deployment = plane.get_json("deployment", sa, "-n", namespace)
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--peering={peering}" in args

    first = run_operator(namespace, sa, ["--all-namespaces", f"--peering={peering}"], "peer-1")
    second = run_operator(namespace, sa, ["--all-namespaces", f"--peering={peering}"], "peer-2")
    priority = {}
    for op in (first, second):
        found = re.search(r"Peering '[^']+' with priority (\d+)", op.log)
        assert found, op.log[-3000:]
        priority[op] = int(found.group(1))
    active, standby = sorted((first, second), key=priority.__getitem__, reverse=True)

    def paused(op: Operator) -> bool:
        resumed = op.log.rfind("Resuming operations after the pause")
        return resumed == -1 or op.log.rfind("Pausing operations in favour of") > resumed

    # Before the second keepalive lands, the first Pod is alone and works: wait for the settled state.
    deadline = time.monotonic() + 30
    while not (paused(standby) and not paused(active)):
        assert time.monotonic() < deadline, f"{active.log[-3000:]}\n{standby.log[-3000:]}"
        time.sleep(0.3)
    status = plane.get_json("clusterkopfpeering", peering).get("status", {})
    assert sorted(p["priority"] for p in status.values()) == sorted(priority.values())

    _apply_sample(plane, dev_servers, watched)
    wait = plane.kubectl(
        "wait", "--for=condition=Ready", "smtpoauthconfig/mail", "-n", watched, "--timeout=90s", check=False
    )
    assert wait.returncode == 0, f"{wait.stderr}\n{active.log[-3000:]}\n{standby.log[-3000:]}"
    assert f"Tested {watched}/mail" in active.log
    assert f"Tested {watched}/mail" not in standby.log, "the standby tested too"

    # The active one goes (a rolling update, a drained node): the standby takes over.
    active.stop()
    plane.kubectl("annotate", "smtpoauthconfig", "mail", "-n", watched, "smtpoauth.dev/recheck=failover")
    deadline = time.monotonic() + 90
    while f"Tested {watched}/mail" not in standby.log:
        assert time.monotonic() < deadline, standby.log[-4000:]
        time.sleep(0.5)
    assert standby.alive()

    calls = _calls(plane.audit(f"system:serviceaccount:{namespace}:{sa}"))
    assert not [c for c in calls if c[4] == 403], calls
    assert ("kopf.dev", "clusterkopfpeerings", "patch", "", 200) in calls


def test_extra_ca_bundle_is_trusted_through_ssl_cert_file(plane: Plane, dev_servers: DevServers) -> None:
    """The chart's extraCaBundle: the image's CA bundle with the extra CA appended, in SSL_CERT_FILE, is
    trusted for both the identity provider and the SMTP server (no caBundle in the spec)."""
    e = dev_servers.endpoints
    manifests = plane.tmp / "no-ca-bundle.yaml"
    _, secret, config = _sample_items(dev_servers, "default")
    for endpoint in ("smtp", "identity"):
        del config["spec"][endpoint]["caBundle"]
    manifests.write_text(yaml.safe_dump_all([secret, config]))
    combined = plane.tmp / "ca-bundle.crt"
    system = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")
    combined.write_text(system.read_text() + Path(e.ca_file).read_text())  # what the init container does

    def check(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*OPERATOR_CMD, "check", "-f", str(manifests), "-o", "json"],
            env=operator_env({**os.environ, **env}), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    untrusted = check({})
    assert untrusted.returncode == 1, untrusted.stderr
    assert json.loads(untrusted.stdout)[0]["reason"] == "TLSVerificationFailed"
    trusted = check({"SSL_CERT_FILE": str(combined), "REQUESTS_CA_BUNDLE": str(combined)})
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert json.loads(trusted.stdout)[0]["ready"] is True


# --------------------------------------------------------------------------------------------
# the relay: its own read-only RBAC is sufficient and exactly what it uses; the generated certificate


def test_relay_rbac_is_read_only_sufficient_and_exactly_what_the_relay_uses(
    plane: Plane, dev_servers: DevServers, crd_installed: None, run_operator: Any
) -> None:
    import base64  # noqa: PLC0415
    import smtplib  # noqa: PLC0415

    release, namespace, watched = "relay", "chart-relay", "chart-relay-mail"
    plane.ensure_namespace(watched)
    plane.helm("install", release, str(CHART), "-n", namespace, "--create-namespace",
               "--set", "crds.enabled=false", "--set", "relay.enabled=true")  # fmt: skip
    # The operator runs with the environment the chart gives its Deployment (the relay's endpoint).
    (deployment,) = [
        d
        for d in plane.get_json("deployment", "-n", namespace)["items"]
        if d["metadata"]["name"] == "relay-smtp-oauth-operator"
    ]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    chart_env = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("SMTPOAUTH_")}
    endpoint = f"relay-smtp-oauth-operator-relay.{namespace}.svc:587"
    assert chart_env == {"SMTPOAUTH_RELAY_ENDPOINT": endpoint}
    run_operator(namespace, "relay-smtp-oauth-operator", ["--all-namespaces"], "relay-operator", chart_env)

    relay_sa = "relay-smtp-oauth-operator-relay"
    # The generated certificate: a kubernetes.io/tls Secret whose ca.crt is what clients trust.
    tls = plane.get_json("secret", f"{relay_sa}-tls", "-n", namespace)
    assert tls["type"] == "kubernetes.io/tls"
    files = {k: base64.b64decode(v).decode() for k, v in tls["data"].items()}
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (plane.tmp / f"relay-{key}").write_text(files[key])
    # A second upgrade keeps it (lookup), so clients' trust does not break.
    plane.helm("upgrade", release, str(CHART), "-n", namespace,
               "--set", "crds.enabled=false", "--set", "relay.enabled=true")  # fmt: skip
    assert plane.get_json("secret", f"{relay_sa}-tls", "-n", namespace)["data"] == tls["data"]

    password = "chart-e2e~RELAY.password_0123456789"
    items = _sample_items(dev_servers, watched)
    items[-1]["spec"]["relay"] = {"enabled": True, "credentialsSecretRef": {"name": "mail-relay"}}
    items.insert(
        0,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/basic-auth",
            "metadata": {"name": "mail-relay", "namespace": watched},
            "stringData": {"username": "grafana", "password": password},
        },
    )
    plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    wait = plane.kubectl(
        "wait", "--for=condition=Ready", "smtpoauthconfig/mail", "-n", watched, "--timeout=90s", check=False
    )
    assert wait.returncode == 0, wait.stderr
    # kubectl get -o wide shows where the applications send (the Relay column, status.relay.endpoint).
    wide = plane.kubectl("get", "smtpoauth", "mail", "-n", watched, "-o", "wide").stdout
    header, row = wide.splitlines()[:2]
    assert row[header.index(" RELAY ") + 1 :].split()[0] == endpoint, wide  # columns are aligned

    token = plane.cp.token_for(namespace, relay_sa, duration=3600)
    kubeconfig = plane.cp.kubeconfig_for_token(token, plane.tmp / "relay.kubeconfig")
    port = free_port()
    log_path = plane.tmp / "relay.log"
    env = operator_env({k: v for k, v in os.environ.items() if k not in {"HTTPS_PROXY", "https_proxy"}})
    env["KUBECONFIG"] = str(kubeconfig)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*OPERATOR_CMD, "relay", "--listen", "127.0.0.1", f"--port={port}",
             f"--tls-cert={plane.tmp / 'relay-tls.crt'}", f"--tls-key={plane.tmp / 'relay-tls.key'}",
             "--log-level=debug"],
            env=env, cwd=plane.tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        context = ssl.create_default_context(cafile=str(plane.tmp / "relay-ca.crt"))
        context.check_hostname = False  # the certificate names the Service; the chain is what is checked
        deadline = time.monotonic() + 60
        code = 0
        while code != 235:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"the relay never served mail/mail:\n{log_path.read_text()}"
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    smtp.starttls(context=context)
                    code = smtp.login("grafana", password)[0]
                    smtp.sendmail(dev_servers.endpoints.mailbox, ["ops@contoso.com"],
                                  f"From: {dev_servers.endpoints.mailbox}\r\nSubject: chart relay\r\n\r\nhi\r\n")  # fmt: skip
            except (OSError, smtplib.SMTPException):
                time.sleep(0.5)
        assert any(m.message["Subject"] == "chart relay" for m in dev_servers.exchange.messages)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=40)
    assert proc.returncode == 0
    out = log_path.read_text()
    assert password not in out
    assert CLIENT_SECRET not in out

    calls = _calls(plane.audit(f"system:serviceaccount:{namespace}:{relay_sa}"))
    assert calls, "no audited calls from the relay"
    denied = [c for c in calls if c[4] == 403]
    assert not denied, f"the relay's RBAC denied: {denied}"
    used = {(g, r, v) for g, r, v, _, _ in calls}
    granted = _rules(plane.get_json("clusterrole", relay_sa))
    assert used <= granted
    assert granted - used == set(), f"granted but never used: {granted - used}"
    assert not {v for _, _, v in granted} - {"get", "list", "watch"}  # read-only


# --------------------------------------------------------------------------------------------
# client-secret renewal: rbac.renewSecrets is off by default, named when missing, and exactly what it uses


def _renewal_state(plane: Plane, namespace: str, name: str) -> dict[str, Any]:
    status = plane.get_json("smtpoauthconfig", name, "-n", namespace).get("status") or {}
    return dict(status.get("renewal") or {})


def _wait_renewal(
    plane: Plane, operator: Operator, namespace: str, done: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """status.renewal of ``namespace``/mail once ``done`` holds."""
    timeout, name = 90.0, "mail"
    deadline = time.monotonic() + timeout
    while not done(state := _renewal_state(plane, namespace, name)):
        assert operator.alive(), f"the operator exited ({operator.proc.returncode}):\n{operator.log[-4000:]}"
        assert time.monotonic() < deadline, (
            f"no {what} within {timeout:.0f}s: {state}\n{operator.log[-4000:]}"
        )
        time.sleep(0.5)
    return state


def _secret_verbs(role: Mapping[str, Any]) -> set[str]:
    return {verb for group, resource, verb in _rules(role) if (group, resource) == ("", "secrets")}


def test_renewal_rbac_is_off_by_default_named_when_missing_and_exactly_what_renewal_uses(
    plane: Plane, dev_servers: DevServers, crd_installed: None, run_operator: Any
) -> None:
    release, namespace, watched = "renew", "chart-renew", "chart-renew-mail"
    plane.ensure_namespace(watched)
    plane.helm("install", release, str(CHART), "-n", namespace, "--create-namespace",
               "--set", "crds.enabled=false")  # fmt: skip
    sa = "renew-smtp-oauth-operator"
    user = f"system:serviceaccount:{namespace}:{sa}"

    def may(verb: str) -> bool:
        can = plane.kubectl("auth", "can-i", verb, "secrets", "-n", watched, f"--as={user}", check=False)
        return can.stdout.strip() == "yes"

    assert not [verb for verb in ("create", "patch", "update", "delete") if may(verb)], "granted by default"
    # Rendered, cluster-wide and namespaced: no role writes Secrets unless renewSecrets asks, and then only
    # the operator's own (Cluster)Role, with exactly create and patch.
    for mode in ([], ["--set", "watch.namespaces={team-a,team-b}"]):
        for renew in ("false", "true"):
            docs = plane.template(release, namespace, *mode, "--set", f"rbac.renewSecrets={renew}")
            verbs = {
                f"{r['kind']} {r['metadata'].get('namespace', '')}/{r['metadata']['name']}": _secret_verbs(r)
                for r in _by_kind(docs, "ClusterRole") + _by_kind(docs, "Role")
            }
            writing = {name: v for name, v in verbs.items() if v - {"get", "list", "watch"}}
            expected = (
                {}
                if renew == "false"
                else {
                    name: {"get", "list", "watch", "create", "patch"}
                    for name in (
                        ["ClusterRole /" + sa] if not mode else [f"Role team-a/{sa}", f"Role team-b/{sa}"]
                    )
                }
            )
            assert writing == expected, (mode, renew, verbs)

    # An app of its own (the module's app keeps its secret for the other tests), 3 days from its end,
    # allowed to renew itself: Application.ReadWrite.OwnedBy and owner of itself.
    e, idp = dev_servers.endpoints, dev_servers.idp
    client_id, old_secret = str(uuid.uuid4()), f"chart-e2e~RENEW.{secrets.token_urlsafe(30)}"
    idp.register_app(e.tenant_id, client_id, old_secret)
    dev_servers.exchange.grant(e.mailbox, client_id)
    idp.grant_api_roles(e.tenant_id, client_id, GRAPH_RESOURCE,
                        "Application.Read.All", "Application.ReadWrite.OwnedBy")  # fmt: skip
    idp.add_owner(e.tenant_id, client_id, client_id)
    end = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    idp.set_secret_end(e.tenant_id, client_id, old_secret, end)

    def passwords() -> dict[str, str]:
        """keyId → displayName of the app's valid passwords."""
        with idp.lock:
            record = idp.app_record(e.tenant_id, client_id)
            return {
                m.key_id: m.display_name or "" for v, m in record.password_meta.items() if v in record.secrets
            }

    (old_key,) = passwords()
    items = _sample_items(dev_servers, watched)
    items[1]["stringData"] = {"client-secret": old_secret}
    identity = items[2]["spec"]["identity"]
    identity["clientId"] = client_id
    identity["discovery"] = {"graph": True, "graphHost": e.graph_host}
    identity["clientSecret"]["renewal"] = {"renewBefore": "30d", "validity": "180d", "gracePeriod": "3s"}

    operator = run_operator(namespace, sa, ["--all-namespaces"], "renew")
    plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    # Without rbac.renewSecrets: the renewal fails at its first write, named, before Graph holds anything of
    # ours; the resource stays Ready on the secret it has.
    state = _wait_renewal(plane, operator, watched, lambda s: "lastFailure" in s, "a renewal failure")
    failure = state["lastFailure"]
    assert (state["phase"], failure["step"], failure["reason"]) == ("Adding", "addPassword", "AccessDenied")
    assert f"may not patch Secret {watched}/mail-renewed" in failure["message"], failure
    assert "rbac.renewSecrets" in failure["message"], failure
    assert list(passwords()) == [old_key]
    ready = _ready(plane, watched, "mail")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("True", "ConnectionTested"), ready
    denied_calls = _calls(plane.audit(user))
    assert ("", "secrets", "patch", watched, 403) in denied_calls
    assert not [c for c in denied_calls if c[4] == 403 and c[:3] != ("", "secrets", "patch")], denied_calls

    # Granted (helm upgrade): the next pass (a manual recheck, rather than the 30 s retry) renews to the end.
    plane.helm("upgrade", release, str(CHART), "-n", namespace, "--reuse-values",
               "--set", "rbac.renewSecrets=true")  # fmt: skip
    # The API server's authorizer sees the new rule shortly after the write: the audited window starts then.
    deadline = time.monotonic() + 30
    while not (may("create") and may("patch")):
        assert time.monotonic() < deadline, "rbac.renewSecrets=true granted nothing"
        time.sleep(0.2)
    before = len(plane.audit(user))
    plane.kubectl("annotate", "smtpoauthconfig", "mail", "-n", watched, "smtpoauth.dev/recheck=renew-granted")
    state = _wait_renewal(plane, operator, watched, lambda s: s.get("phase") == "Done", "renewal Done")
    assert "lastFailure" not in state, state
    after = passwords()
    assert old_key not in after  # the old credential removed after the grace period...
    assert list(after) == [state["newKeyId"]]  # ...and exactly one added, the one recorded
    assert after[state["newKeyId"]].startswith("smtp-oauth-operator renewal ")
    owned = plane.get_json("secret", state["secretName"], "-n", watched)
    assert state["secretName"] == "mail-renewed"
    assert owned["metadata"]["labels"]["velero.io/exclude-from-backup"] == "true"
    assert owned["metadata"]["ownerReferences"][0]["kind"] == "SmtpOAuthConfig"
    new_secret = base64.b64decode(owned["data"]["client-secret"]).decode()
    assert new_secret in dev_servers.graph.returned_secrets
    wait = plane.kubectl(
        "wait", "--for=condition=Ready", "smtpoauthconfig/mail", "-n", watched, "--timeout=60s", check=False
    )
    assert wait.returncode == 0, f"{wait.stderr}\n{_ready(plane, watched, 'mail')}\n{operator.log[-4000:]}"
    status = plane.get_json("smtpoauthconfig", "mail", "-n", watched)["status"]
    ends = datetime.strptime(status["clientSecretExpiresAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert ends > datetime.now(UTC) + timedelta(days=170)  # tested and switched to the renewed secret
    events = plane.get_json("events", "-n", watched, "--field-selector", "involvedObject.name=mail")["items"]
    reasons = [ev["reason"] for ev in events]
    assert reasons.count("RenewalFailed") == 1, reasons  # once, not on every retry
    for reason in ("RenewalCredentialAdded", "RenewalSwitched", "RenewalOldCredentialRemoved"):
        assert reason in reasons, reasons

    # The audit log: with the grant, no 403; Secret writes are create and patch of its own Secret only;
    # everything used is granted, and everything granted is used.
    renewing = plane.audit(user)[before:]
    calls = _calls(renewing)
    assert not [c for c in calls if c[4] == 403], calls
    writes = {(ev["verb"], ev["objectRef"]["namespace"], ev["objectRef"].get("name"))
              for ev in renewing if (ev.get("objectRef") or {}).get("resource") == "secrets"
              and ev["verb"] not in {"get", "list", "watch"}}  # fmt: skip
    assert writes == {("create", watched, "mail-renewed"), ("patch", watched, "mail-renewed")}, writes
    # ...and that is not because ownerReferences go unchecked here: setting one on a Secret it did not create
    # is refused (the admission plugin of the plane fixture is on).
    owner = json.dumps({"metadata": {"ownerReferences": owned["metadata"]["ownerReferences"]}})
    adopt = plane.kubectl(
        "patch", "secret", "exo-app", "-n", watched, f"--as={user}", "-p", owner, check=False
    )
    assert "cannot set an ownerRef on a resource you can't delete" in adopt.stderr, adopt
    used = {(g, r, v) for g, r, v, _, code in _calls(plane.audit(user)) if code != 403}
    granted = _rules(plane.get_json("clusterrole", sa))
    assert granted == NAMESPACED_RULES | CLUSTER_ONLY_RULES | {TOKEN_REQUEST_RULE} | RENEW_SECRET_RULES
    assert {v for g, r, v in used if (g, r) == ("", "secrets")} == {"get", "list", "watch", "create", "patch"}
    assert used <= granted
    assert granted - used - {TOKEN_REQUEST_RULE} == set(), f"granted but never used: {granted - used}"

    text = "\n".join([operator.log, json.dumps(status), json.dumps(events)])
    for value in (old_secret, new_secret):
        assert value not in text
