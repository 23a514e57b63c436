"""Fixtures for the operator e2e tests: the CRD, the local Entra ID + Exchange, the operator process.

Everything is real: the operator runs as ``smtp-oauth-operator run -A`` (a subprocess, kopf inside)
against the session's etcd + kube-apiserver, and talks HTTPS to the fake Entra ID and STARTTLS +
XOAUTH2 to the fake Exchange on loopback. Nothing is mocked.

Session-scoped (one control plane, one operator process, one pair of dev servers per session):

- ``crds``: ``kubectl apply -f crds/`` and wait for ``Established``.
- ``dev``: :class:`Dev`, a :class:`DevServers` plus helpers. Each test registers its own app
  (``dev.new_app()``: a fresh client ID and secret, FullAccess on the mailbox), so counters on the
  servers (token requests, AUTH attempts, messages) can be read per test while the operator is shared.
  Every client secret ever handed out is remembered for the leak canary.
- ``operator_process``: :class:`OperatorProcess`; ``operator`` is the same object, checked alive
  before and after each test.

Function-scoped:

- ``ns``: :class:`Namespace`, a fresh namespace with the dev CA in ConfigMap ``dev-ca`` (key
  ``ca.pem``), and helpers to apply YAML, read objects, wait for conditions and list Events.
  Without a controller-manager namespaces never finish deleting, so names are unique and nothing is
  deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import smtplib
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.controlplane import REPO_ROOT, ControlPlane, free_port

from smtp_oauth_operator.testing.devservers import DEFAULT_MAILBOX, DevServers
from smtp_oauth_operator.testing.pki import CertificateAuthority, ServerCert

__all__ = [
    "CRD_NAME",
    "MAILBOX",
    "OPERATOR_CMD",
    "App",
    "Dev",
    "Namespace",
    "OperatorProcess",
    "operator_env",
    "wait_until",
]

CRD_NAME = "smtpoauthconfigs.smtpoauth.dev"
MAILBOX = DEFAULT_MAILBOX
# The operator runs from the interpreter running the tests (any venv, tox, CI image), not from a fixed
# .venv: the package's ``__main__`` is the console script without depending on where it was installed.
OPERATOR_CMD: tuple[str, ...] = (sys.executable, "-m", "smtp_oauth_operator")


def operator_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with this checkout's sources importable, also when the package is not installed."""
    src = str(REPO_ROOT / "operator" / "src")
    paths = [src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != src]]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


STARTED_LINE = "smtp-oauth-operator started"


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.25, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# CRD


@pytest.fixture(scope="session")
def crds(control_plane: ControlPlane) -> str:
    return install_crds(control_plane)


def install_crds(control_plane: ControlPlane, *extra: Path) -> str:
    """The CRDs of crds/ (and ``extra`` manifests), established, in discovery and in OpenAPI."""
    control_plane.kubectl("apply", "-f", str(REPO_ROOT / "crds"), *(a for e in extra for a in ("-f", str(e))))
    control_plane.kubectl(
        "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", timeout=90
    )
    # Discovery can lag Established by a moment; `kubectl get` by plural must work before tests run.
    wait_until(
        lambda: control_plane.kubectl("get", "smtpoauthconfigs", "-A", check=False).returncode == 0,
        timeout=30,
        what="the SmtpOAuthConfig resource in discovery",
    )
    # The CRD's OpenAPI (what `kubectl explain` reads) is published a little after Established.
    wait_until(
        lambda: control_plane.kubectl("explain", "smtpoauthconfig", check=False).returncode == 0,
        timeout=60,
        interval=0.5,
        what="the SmtpOAuthConfig OpenAPI schema (kubectl explain)",
    )
    return CRD_NAME


# --------------------------------------------------------------------------------------------
# the local Entra ID + Exchange


@dataclass(frozen=True)
class App:
    """An app registration of the fake Entra ID, granted FullAccess on :data:`MAILBOX`."""

    tenant_id: str
    client_id: str
    secret: str = field(repr=False)


class Dev:
    """The dev servers, plus per-test app registrations and a record of every secret handed out."""

    def __init__(self, servers: DevServers, default_secret: str) -> None:
        self.servers = servers
        self.idp = servers.idp
        self.exchange = servers.exchange
        self.graph = servers.graph
        self.endpoints = servers.endpoints
        self.ca_pem = servers.ca_file.read_text()
        self.tenant_id = servers.tenant_id
        self.secrets: list[str] = [default_secret]

    def new_secret(self) -> str:
        """A fresh, unguessable client-secret value shaped like Entra's (remembered for the canary)."""
        value = f"e2e~{secrets.token_urlsafe(30)}"
        self.secrets.append(value)
        return value

    def new_app(self, *, tenant_id: str | None = None, expired: bool = False, grant: bool = True) -> App:
        tenant = tenant_id or self.tenant_id
        app = App(tenant, str(uuid.uuid4()), self.new_secret())
        self.idp.register_app(tenant, app.client_id, app.secret, expired=expired)
        if grant:
            self.exchange.grant(MAILBOX, app.client_id)
        return app

    def new_tenant(self) -> str:
        tenant = str(uuid.uuid4())
        self.idp.register_tenant(tenant)
        return tenant

    def auth_attempts(self, app: App) -> list[Any]:
        return [a for a in self.exchange.auth_attempts if (a.client_id or "").lower() == app.client_id]

    def messages(self, app: App) -> list[Any]:
        return [m for m in self.exchange.messages if m.client_id.lower() == app.client_id]

    def spec(self, app: App, *, secret_name: str = "exo-app", **extra: Any) -> dict[str, Any]:
        """A spec that works against the dev servers (the CA from ConfigMap ``dev-ca``)."""
        ca = {"configMapKeyRef": {"name": "dev-ca", "key": "ca.pem"}}
        spec: dict[str, Any] = {
            "username": MAILBOX,
            "smtp": {
                "host": self.endpoints.smtp_host,
                "port": self.endpoints.smtp_port,
                "connectionTimeoutSeconds": 10,
                "caBundle": ca,
            },
            "identity": {
                "tenantId": app.tenant_id,
                "clientId": app.client_id,
                "authorityHost": self.endpoints.authority_host,
                "timeoutSeconds": 10,
                "caBundle": ca,
                "clientSecret": {"secretKeyRef": {"name": secret_name, "key": "client-secret"}},
            },
        }
        spec.update(extra)
        return spec


@pytest.fixture(scope="session")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    default_secret = f"e2e~{secrets.token_urlsafe(30)}"
    with DevServers(tmp_path_factory.mktemp("devservers"), client_secret=default_secret) as servers:
        yield Dev(servers, default_secret)


# --------------------------------------------------------------------------------------------
# the operator process


class OperatorProcess:
    """``smtp-oauth-operator run -A --log-level debug --log-format json`` as a subprocess."""

    def __init__(
        self,
        control_plane: ControlPlane,
        log_file: Path,
        args: Sequence[str] = ("-A",),
        *,
        kubeconfig: Path | None = None,
    ) -> None:
        self.control_plane = control_plane
        self.log_file = log_file
        self.args = list(args)  # scope (-A / -n NS), peering
        self.kubeconfig = kubeconfig
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log_offset = 0  # where the current process's log starts

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        env = operator_env(self.control_plane.env(self.kubeconfig))
        env["PYTHONUNBUFFERED"] = "1"
        # The fake servers' CA is given per resource (caBundle); nothing from the environment applies.
        for var in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy"):
            env.pop(var, None)
        cmd = [
            *OPERATOR_CMD,
            "run",
            *self.args,
            "--log-level",
            "debug",
            "--log-format",
            "json",
            "--metrics-port",
            str(self.metrics_port),
        ]
        with self.log_file.open("ab") as log:
            log.write(f"\n=== start #{self.starts + 1}: {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(REPO_ROOT),
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while STARTED_LINE not in self.current_log() or not self._metrics_up():
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"the operator did not start in {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.2)

    def _metrics_up(self) -> bool:
        try:
            self.metrics()
        except OSError:
            return False
        return True

    def check_alive(self) -> None:
        """Fail loudly (with the log) if the process has exited."""
        if self.proc is None:
            raise AssertionError("the operator was never started")
        rc = self.proc.poll()
        if rc is not None:
            raise AssertionError(f"the operator exited with code {rc}:\n{self.tail(80)}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (kopf shuts down gracefully), SIGKILL after ``timeout``; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
                raise AssertionError(
                    f"the operator ignored SIGTERM for {timeout:.0f}s:\n{self.tail()}"
                ) from None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a lost node would: no cleanup, no peering goodbye."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self) -> None:
        self.check_alive()
        rc = self.stop()
        assert rc == 0, f"the operator exited with {rc} on SIGTERM:\n{self.tail()}"
        self.start()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def current_log(self) -> str:
        """The log of the running process only (since the last start)."""
        with self.log_file.open("rb") as fh:
            fh.seek(self._log_offset)
            return fh.read().decode(errors="replace")

    def log_records(self, *, current: bool = True) -> list[dict[str, Any]]:
        records = []
        for line in (self.current_log() if current else self.log()).splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
        return records

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return str(resp.read().decode())

    def seen_since_start(self, namespace: str, name: str) -> bool:
        """Whether the current process has logged anything about ``namespace/name`` (at debug level the
        operator logs every SmtpOAuthConfig it lists or sees an event of)."""
        for record in self.log_records():
            obj = record.get("object") or {}
            if obj.get("namespace") == namespace and obj.get("name") == name:
                return True
            if str(record.get("message", "")).startswith(f"SmtpOAuthConfig {namespace}/{name} "):
                return True
        return False


@pytest.fixture(scope="session")
def operator_process(
    control_plane: ControlPlane, crds: str, dev: Dev, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(control_plane, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    crashed: str | None = None
    try:
        yield op
    finally:
        assert op.proc is not None
        if op.proc.poll() is not None:
            crashed = f"the operator had exited with code {op.proc.returncode} before teardown"
        rc = op.stop()
        print(f"operator log: {op.log_file}")
    if crashed:
        pytest.fail(f"{crashed}:\n{op.tail(80)}")
    assert rc == 0, f"the operator exited with {rc} on SIGTERM:\n{op.tail()}"
    unexpected = [line for line in op.log().splitlines() if "Unexpected error while reconciling" in line]
    assert not unexpected, "the reconciler hit unexpected errors:\n" + "\n".join(unexpected[:5])


@pytest.fixture
def operator(operator_process: OperatorProcess) -> Iterator[OperatorProcess]:
    operator_process.check_alive()
    yield operator_process
    operator_process.check_alive()


# --------------------------------------------------------------------------------------------
# a namespace per test


_SAFE = re.compile(r"[^a-z0-9-]+")


class Namespace:
    """A fresh namespace and the kubectl helpers the tests use in it."""

    def __init__(self, control_plane: ControlPlane, name: str, dev: Dev) -> None:
        self.cp = control_plane
        self.name = name
        self.dev = dev

    # ---- kubectl
    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,  # noqa: A002 - mirrors subprocess.run
    ) -> subprocess.CompletedProcess[str]:
        return self.cp.kubectl(*args, "-n", self.name, check=check, input=input)

    def apply(
        self, docs: str | Mapping[str, Any] | Sequence[Mapping[str, Any]], *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl apply -f -`` with YAML text, one object, or a list of objects."""
        if isinstance(docs, str):
            text = docs
        elif isinstance(docs, Mapping):
            text = yaml.safe_dump(dict(docs))
        else:
            text = yaml.safe_dump_all([dict(d) for d in docs])
        return self.kubectl("apply", "-f", "-", check=check, input=text)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.kubectl("get", kind, name, "-o", "json").stdout)
        return out

    def config(self, name: str) -> dict[str, Any]:
        return self.get("smtpoauthconfig", name)

    # ---- objects
    def secret(
        self,
        value: str,
        *,
        name: str = "exo-app",
        extra: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        owner_references: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        meta: dict[str, Any] = {"name": name}
        if labels:
            meta["labels"] = dict(labels)
        if owner_references:
            meta["ownerReferences"] = [dict(r) for r in owner_references]
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": meta,
                "type": "Opaque",
                "stringData": {"client-secret": value, **(extra or {})},
            }
        )

    def smtp_oauth_config(self, name: str, spec: Mapping[str, Any]) -> None:
        self.apply(
            {
                "apiVersion": "smtpoauth.dev/v1alpha1",
                "kind": "SmtpOAuthConfig",
                "metadata": {"name": name},
                "spec": dict(spec),
            }
        )

    # ---- conditions
    @staticmethod
    def condition(obj: Mapping[str, Any], ctype: str) -> dict[str, Any] | None:
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond.get("type") == ctype:
                return dict(cond)
        return None

    def wait_for_condition(
        self,
        name: str,
        ctype: str,
        status: str,
        reason: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Poll ``kubectl get -o json`` until condition ``ctype`` has ``status`` (and ``reason``);
        returns the whole object."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        seen: Any = None
        while True:
            proc = self.kubectl("get", "smtpoauthconfig", name, "-o", "json", check=False)
            seen = proc.stderr
            if proc.returncode == 0:
                obj = json.loads(proc.stdout)
                seen = (obj.get("status") or {}).get("conditions")
                cond = self.condition(obj, ctype)
                last = cond
                if (
                    cond is not None
                    and cond.get("status") == status
                    and (reason is None or cond.get("reason") == reason)
                ):
                    return dict(obj)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}/{name}: {ctype} did not become {status}"
                    f"{'/' + reason if reason else ''} within {timeout:.0f}s; last {ctype}: {last}\n"
                    f"all conditions: {json.dumps(seen, indent=1)}"
                )
            time.sleep(0.3)

    # ---- Events
    def events_for(self, name: str) -> list[dict[str, Any]]:
        """The Events ``kubectl events --for smtpoauthconfig/NAME`` lists (as JSON)."""
        out = self.kubectl("events", "--for", f"smtpoauthconfig/{name}", "-o", "json").stdout
        items: list[dict[str, Any]] = json.loads(out).get("items") or []
        return items

    def event_reasons(self, name: str) -> list[str]:
        return [str(e.get("reason")) for e in self.events_for(name)]

    def count_events(self, name: str, reason: str) -> int:
        return self.event_reasons(name).count(reason)


def ns_name(request: pytest.FixtureRequest) -> str:
    base = _SAFE.sub("-", request.node.name.lower().removeprefix("test_"))[:40].strip("-")
    return f"e2e-{base}-{uuid.uuid4().hex[:5]}"


@contextlib.contextmanager
def own_control_plane(k8s_bin_dir: Path, *extra_crds: Path) -> Iterator[ControlPlane]:
    """A control plane of a module's own, CRDs installed: for tests that run operators of their own,
    which the session's ``-A`` operator on the shared plane would otherwise compete with (two testers,
    two alarm e-mails)."""
    with ControlPlane(k8s_bin_dir) as cp:
        install_crds(cp, *extra_crds)
        yield cp


@pytest.fixture
def ns(control_plane: ControlPlane, crds: str, dev: Dev, request: pytest.FixtureRequest) -> Namespace:
    return new_namespace(control_plane, dev, ns_name(request))


def new_namespace(control_plane: ControlPlane, dev: Dev, name: str) -> Namespace:
    """A fresh namespace holding the dev CA in ConfigMap ``dev-ca`` (key ``ca.pem``)."""
    control_plane.kubectl("create", "namespace", name)
    namespace = Namespace(control_plane, name, dev)
    namespace.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "dev-ca"},
            "data": {"ca.pem": dev.ca_pem},
        }
    )
    return namespace


# --------------------------------------------------------------------------------------------
# the relay (``smtp-oauth-operator relay`` in cluster mode, watching one namespace)

RELAY_USER = "alertmanager"


@pytest.fixture(scope="module")
def relay_cert(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    ca = CertificateAuthority.create("relay e2e CA")
    return ca.issue("127.0.0.1", "localhost", directory=tmp_path_factory.mktemp("relay-tls"))


class Relay:
    def __init__(self, cp: ControlPlane, cert: ServerCert, log: Path, namespace: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.cert = cert
        self.log = log
        env = operator_env(cp.env())
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [
            *OPERATOR_CMD,
            "relay",
            "-n",
            namespace,
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--tls-cert",
            str(cert.cert_file),
            "--tls-key",
            str(cert.key_file),
            "--metrics-port",
            str(self.metrics_port),
            "--log-level",
            "debug",
        ]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT), start_new_session=True
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def login(self, password: str) -> tuple[int, bytes]:
        """The relay's answer to AUTH PLAIN; ``(0, b"")`` while it does not listen yet."""
        try:
            smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
        except OSError:
            return 0, b""
        with smtp:
            smtp.starttls(context=ssl.create_default_context(cafile=str(self.cert.ca_file)))
            try:
                return smtp.login(RELAY_USER, password)
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code, exc.smtp_error

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def relay(
    control_plane: ControlPlane, ns: Namespace, relay_cert: ServerCert, tmp_path: Path
) -> Iterator[Relay]:
    proc = Relay(control_plane, relay_cert, tmp_path / "relay.log", ns.name)
    yield proc
    rc = proc.stop()
    out = proc.output()
    assert "Traceback" not in out, out[-3000:]
    assert rc == 0, out[-3000:]
