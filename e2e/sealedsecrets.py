"""The real Sealed Secrets controller (and kubeseal) against an e2e :class:`ControlPlane`.

The controller and kubeseal are built from Go modules by ``hack/sealed-secrets.sh`` (or taken from
``$SMTPOAUTH_SEALED_SECRETS_BIN_DIR``). The SealedSecret CRD and the controller's RBAC come from the
upstream helm chart shipped inside the same module (``helm template`` of
``helm/sealed-secrets`` in the module cache): the CRD, the ServiceAccount, the ClusterRole
``secrets-unsealer``, the key-admin and service-proxier Roles and their bindings; the chart's
Deployment and Services are left out (there is no kubelet).

The controller only knows in-cluster config (``rest.InClusterConfig()``): it reads
``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` and the fixed files
``/var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt,namespace}``. So it runs as::

    unshare -m --propagation private sh -c '
        mkdir -p /var/run/secrets/kubernetes.io/serviceaccount
        mount -t tmpfs tmpfs /var/run/secrets/kubernetes.io/serviceaccount
        cp token ca.crt namespace /var/run/secrets/kubernetes.io/serviceaccount/
        exec controller --listen-addr 127.0.0.1:P1 --listen-metrics-addr 127.0.0.1:P2 ...'

in a private mount namespace: the token and CA exist only in that tmpfs, which no other process
sees (the host keeps at most the empty mount-point directories that ``mkdir -p`` made). The token is
a TokenRequest token of the chart's ServiceAccount, so the controller works with exactly the
upstream RBAC. The staging copies are deleted once the controller is up.

Usage::

    with ControlPlane() as cp, SealedSecretsController(cp) as ss:
        sealed = ss.seal("mail", "exo-app", {"client-secret": "…"},
                         labels={"velero.io/exclude-from-backup": "true"})
        cp.kubectl("apply", "-f", "-", input=json.dumps(sealed))
        secret = ss.wait_for_secret("mail", "exo-app")
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from e2e.controlplane import REPO_ROOT, ControlPlane, ControlPlaneError, free_port, stop_process_group

__all__ = [
    "BIN_DIR_ENV",
    "BUILD_SCRIPT",
    "SA_DIR",
    "SEALED_SECRET_API_VERSION",
    "SealedSecretsController",
    "SealedSecretsError",
    "chart_manifests",
    "crd_file",
    "ensure_sealed_secrets",
]

BUILD_SCRIPT = REPO_ROOT / "hack" / "sealed-secrets.sh"
BIN_DIR_ENV = "SMTPOAUTH_SEALED_SECRETS_BIN_DIR"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # fixed in client-go's InClusterConfig
SEALED_SECRET_API_VERSION = "bitnami.com/v1alpha1"
RELEASE = "sealed-secrets"  # helm release name: ServiceAccount and Role names derive from it
# What the chart renders that we apply; Deployment and Services need a kubelet/endpoints.
_KINDS = {
    "CustomResourceDefinition",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
}
STOP_GRACE_SECONDS = 10.0


class SealedSecretsError(ControlPlaneError):
    """The controller could not be built, started, or did not do its job in time."""


def _script(*args: str) -> str:
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), *args], stdout=subprocess.PIPE, text=True, check=False
    )  # stderr (progress) goes to ours
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SealedSecretsError(f"{BUILD_SCRIPT} {' '.join(args)} failed with exit code {proc.returncode}")
    return lines[-1]


def ensure_sealed_secrets() -> Path:
    """The bin dir with ``controller`` and ``kubeseal`` (``$SMTPOAUTH_SEALED_SECRETS_BIN_DIR`` or built)."""
    override = os.environ.get(BIN_DIR_ENV)
    if override:
        return Path(override).resolve()
    return Path(_script()).resolve()


def crd_file() -> Path:
    """The SealedSecret CRD yaml from the module cache (downloaded if missing)."""
    return Path(_script("--print-crd"))


def chart_manifests(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    """CRD + ServiceAccount + RBAC rendered from the upstream chart for a release in ``namespace``."""
    chart = crd_file().parent.parent  # .../helm/sealed-secrets/crds/x.yaml -> .../helm/sealed-secrets
    rendered = cp.helm("template", RELEASE, str(chart), "--namespace", namespace, "--include-crds").stdout
    docs = [d for d in yaml.safe_load_all(rendered) if isinstance(d, dict) and d.get("kind") in _KINDS]
    kinds = sorted({d["kind"] for d in docs})
    if kinds != sorted(_KINDS):
        raise SealedSecretsError(f"the chart rendered {kinds}, expected {sorted(_KINDS)}")
    for doc in docs:  # namespaced objects come without a namespace from some templates
        if doc["kind"] in {"ServiceAccount", "Role", "RoleBinding"}:
            doc.setdefault("metadata", {}).setdefault("namespace", namespace)
    return docs


def _die_with_parent() -> None:  # between fork and exec: die if the test process is killed -9
    with contextlib.suppress(Exception):
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


class SealedSecretsController:
    """The Sealed Secrets controller, running as its ServiceAccount against ``cp``.

    After :meth:`start`: ``cert_url`` (the public sealing certificate), ``listen_port``,
    ``metrics_port``, ``log_file``, ``bin_dir``, ``namespace``, ``pid``.
    """

    def __init__(
        self,
        cp: ControlPlane,
        *,
        namespace: str = "sealed-secrets",
        bin_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 90.0,
        key_size: int = 2048,  # the default 4096 takes seconds longer on 2 cores; same code path
    ) -> None:
        self.cp = cp
        self.namespace = namespace
        self._bin_dir_arg = Path(bin_dir) if bin_dir is not None else None
        self.start_timeout = start_timeout
        self.key_size = key_size
        self.bin_dir: Path | None = None
        self.workdir: Path | None = None
        self.log_file: Path | None = None
        self.listen_port: int | None = None
        self.metrics_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # ---------------------------------------------------------------- context manager
    def __enter__(self) -> SealedSecretsController:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def cert_url(self) -> str:
        assert self.listen_port is not None, "not started"
        return f"http://127.0.0.1:{self.listen_port}/v1/cert.pem"

    def _bin(self, tool: str) -> str:
        assert self.bin_dir is not None, "not started"
        path = self.bin_dir / tool
        if not os.access(path, os.X_OK):
            raise SealedSecretsError(f"{path} is missing; run {BUILD_SCRIPT}")
        return str(path)

    # ---------------------------------------------------------------- start / stop
    def install(self) -> None:
        """Create the namespace and apply the chart's CRD, ServiceAccount and RBAC (idempotent)."""
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}}
        docs = [ns, *chart_manifests(self.cp, self.namespace)]
        self.cp.kubectl(
            "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
        )
        self.cp.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/sealedsecrets.bitnami.com"
        )

    def start(self) -> SealedSecretsController:
        if self._proc is not None:
            return self
        if shutil.which("unshare") is None:
            raise SealedSecretsError(
                "unshare (util-linux) is required to give the controller its own /var/run/secrets"
            )
        assert self.cp.apiserver_port is not None, "control plane not started"
        assert self.cp.ca_file is not None, "control plane not started"
        self.bin_dir = (self._bin_dir_arg or ensure_sealed_secrets()).resolve()
        controller = self._bin("controller")
        self._bin("kubeseal")
        self.install()

        base = self.cp.workdir if self.cp.workdir is not None else Path(tempfile.gettempdir())
        self.workdir = Path(tempfile.mkdtemp(prefix="sealed-secrets-", dir=base))
        stage = self.workdir / "sa"
        stage.mkdir(mode=0o700)
        token = self.cp.token_for(self.namespace, RELEASE, duration=4 * 3600)
        (stage / "token").write_text(token)
        (stage / "namespace").write_text(self.namespace)
        shutil.copyfile(self.cp.ca_file, stage / "ca.crt")
        for f in stage.iterdir():
            f.chmod(0o600)

        self.listen_port, self.metrics_port = free_port(), free_port()
        while self.metrics_port == self.listen_port:
            self.metrics_port = free_port()
        argv = [
            controller,
            "--update-status",  # as the chart's Deployment runs it
            "--key-prefix=sealed-secrets-key",
            f"--key-size={self.key_size}",
            f"--listen-addr=127.0.0.1:{self.listen_port}",
            f"--listen-metrics-addr=127.0.0.1:{self.metrics_port}",
        ]
        script = (
            "set -e; "
            f"mkdir -p {SA_DIR}; "
            f"mount -t tmpfs -o size=1m,mode=0755 tmpfs {SA_DIR}; "
            f'cp "$SS_STAGE/token" "$SS_STAGE/ca.crt" "$SS_STAGE/namespace" {SA_DIR}/; '
            f"exec {shlex.join(argv)}"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}  # no KUBECONFIG
        env.update(
            KUBERNETES_SERVICE_HOST="127.0.0.1",
            KUBERNETES_SERVICE_PORT=str(self.cp.apiserver_port),
            POD_NAMESPACE=self.namespace,
            SS_STAGE=str(stage),
        )
        self.log_file = self.workdir / "controller.log"
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # the copies live on in the private tmpfs only
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self._fail(f"the controller exited with code {self._proc.returncode}")
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(self.cert_url, timeout=5) as resp,
            ):
                if resp.status == 200 and b"BEGIN CERTIFICATE" in resp.read():
                    return
            if time.monotonic() > deadline:
                raise self._fail(f"no certificate at {self.cert_url} after {self.start_timeout:.0f}s")
            time.sleep(0.3)

    def _fail(self, message: str) -> SealedSecretsError:
        return SealedSecretsError(f"{message}\n--- {self.log_file} ---\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            assert self.log_file is not None
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AssertionError):
            return "(no log)"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process_group(proc, STOP_GRACE_SECONDS)

    # ---------------------------------------------------------------- sealing
    def cert_pem(self) -> bytes:
        with urllib.request.urlopen(self.cert_url, timeout=10) as resp:
            return bytes(resp.read())

    def seal(
        self,
        namespace: str,
        name: str,
        string_data: Mapping[str, str],
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> dict[str, Any]:
        """A SealedSecret (as a dict) for a Secret with ``string_data``, sealed by kubeseal.

        ``labels``/``annotations`` end up in ``spec.template.metadata``, which the controller copies
        onto the Secret it creates. The plain value only travels through kubeseal's stdin.
        """
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace},
            "stringData": dict(string_data),
        }
        proc = subprocess.run(
            [self._bin("kubeseal"), "--cert", self.cert_url, "--format", "json", *extra_args],
            input=json.dumps(secret),
            capture_output=True,
            text=True,
            timeout=60,
            env=self.cp.env(),  # --cert: kubeseal never contacts the cluster
            check=False,
        )
        if proc.returncode != 0:
            raise SealedSecretsError(f"kubeseal exited with {proc.returncode}: {proc.stderr.strip()}")
        sealed: dict[str, Any] = json.loads(proc.stdout)
        meta = sealed.setdefault("spec", {}).setdefault("template", {}).setdefault("metadata", {})
        if labels:
            meta["labels"] = {**(meta.get("labels") or {}), **labels}
        if annotations:
            meta["annotations"] = {**(meta.get("annotations") or {}), **annotations}
        return sealed

    def wait_for_secret(self, namespace: str, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """The Secret the controller unsealed (owned by SealedSecret ``name``)."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.cp.kubectl("get", "secret", name, "-n", namespace, "-o", "json", check=False)
            if proc.returncode == 0:
                secret: dict[str, Any] = json.loads(proc.stdout)
                refs = secret.get("metadata", {}).get("ownerReferences") or []
                if any(r.get("kind") == "SealedSecret" for r in refs):
                    return secret
            if time.monotonic() > deadline:
                sealed = self.cp.kubectl(
                    "get", "sealedsecret", name, "-n", namespace, "-o", "yaml", check=False
                ).stdout
                raise self._fail(
                    f"no Secret {namespace}/{name} from a SealedSecret after {timeout:.0f}s\n{sealed}"
                )
            time.sleep(0.3)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m e2e.sealedsecrets`` (from the repo root): start a control plane and the controller, seal and unseal once."""
    del argv
    with ControlPlane() as cp, SealedSecretsController(cp) as ss:
        cp.kubectl("create", "namespace", "demo")
        sealed = ss.seal("demo", "demo", {"k": "v"}, labels={"velero.io/exclude-from-backup": "true"})
        cp.kubectl("apply", "-f", "-", input=json.dumps(sealed))
        secret = ss.wait_for_secret("demo", "demo")
        print(json.dumps(secret["metadata"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
