"""A real Kubernetes control plane (etcd + kube-apiserver) on loopback, for e2e tests and demos.

The binaries are built from Go modules by ``hack/k8s-tools.sh`` (or taken from
``$SMTPOAUTH_K8S_BIN_DIR``). Everything listens on 127.0.0.1 only, on free ports, with a
throw-away PKI made here with ``cryptography``. The apiserver runs with envtest-like flags:
RBAC authorization, client-certificate auth for the admin (CN=admin, O=system:masters),
and ServiceAccount tokens (TokenRequest) so a process can run as a ServiceAccount with its
RBAC enforced. There is no controller-manager, scheduler or kubelet unless asked for
(``controller_manager=True`` starts kube-controller-manager for garbage collection,
namespace deletion and ServiceAccount creation, if it was built).

Usage::

    with ControlPlane() as cp:
        subprocess.run(["kubectl", "get", "ns"], env=cp.env(), check=True)

CLI::

    python e2e/controlplane.py build      # build or reuse the tools, print the bin dir
    python e2e/controlplane.py up         # start; print export lines; Ctrl-C / SIGTERM stops

Processes run in their own process groups and die with this Python process (SIGTERM, then
SIGKILL after a grace period; ``atexit`` and a SIGTERM/SIGHUP handler clean up too).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smtp_oauth_operator.testing.pki import build_ca_certificate, build_leaf_certificate

__all__ = [
    "BIN_DIR_ENV",
    "REPO_ROOT",
    "TOOLS_SCRIPT",
    "CommandFailedError",
    "ControlPlane",
    "ControlPlaneError",
    "ensure_tools",
    "free_port",
    "port_is_free",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS_SCRIPT = REPO_ROOT / "hack" / "k8s-tools.sh"
BIN_DIR_ENV = "SMTPOAUTH_K8S_BIN_DIR"
KEEP_WORKDIR_ENV = "SMTPOAUTH_E2E_KEEP_WORKDIR"

SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
STOP_GRACE_SECONDS = 10.0
LOG_TAIL_LINES = 40
PORT_ATTEMPTS = 3


class ControlPlaneError(RuntimeError):
    """The control plane could not be started (or a component died)."""


class CommandFailedError(subprocess.CalledProcessError):
    """A tool (kubectl, helm) exited non-zero; the message includes its stderr."""

    def __str__(self) -> str:
        cmd = " ".join(str(c) for c in self.cmd) if isinstance(self.cmd, list | tuple) else self.cmd
        return (
            f"command {cmd!r} exited with {self.returncode}\n"
            f"stdout: {(self.stdout or '').strip()}\nstderr: {(self.stderr or '').strip()}"
        )


# --------------------------------------------------------------------------------------
# tools


def stop_process_group(proc: subprocess.Popen[Any], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM a process started in its own group, SIGKILL after ``grace``; then the rest of the group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
    # Anything left in the group (children of children) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def ensure_tools(tools: Sequence[str] = ()) -> Path:
    """Return the bin dir with etcd, kube-apiserver, kubectl and helm.

    ``$SMTPOAUTH_K8S_BIN_DIR`` wins if set. Otherwise runs ``hack/k8s-tools.sh`` (which builds
    missing tools, 15-30 minutes cold, seconds warm) and takes the last line of its stdout.
    ``tools`` are extra arguments for the script (e.g. ``["all"]``), empty for its default set.
    """
    override = os.environ.get(BIN_DIR_ENV)
    if override:
        return Path(override).resolve()
    proc = subprocess.run(
        ["bash", str(TOOLS_SCRIPT), *tools],
        stdout=subprocess.PIPE,
        text=True,
        check=False,  # stderr (progress) goes to ours
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ControlPlaneError(f"{TOOLS_SCRIPT} failed with exit code {proc.returncode}")
    return Path(lines[-1]).resolve()


# --------------------------------------------------------------------------------------
# ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port (a bind with SO_REUSEADDR succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_port_free(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not port_is_free(port):
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"port 127.0.0.1:{port} is still in use after {timeout:.0f}s")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------
# PKI


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class _CA:
    """A throw-away certificate authority (the test kit's CA recipe, see testing/pki.py)."""

    def __init__(self, common_name: str, days: int) -> None:
        self.days = days
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = build_ca_certificate(
            self.key,
            _name(common_name),
            _now() - datetime.timedelta(hours=1),
            _now() + datetime.timedelta(days=days),
        )

    def issue(
        self,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        server: bool = False,
        client: bool = False,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        cert = build_leaf_certificate(
            issuer_key=self.key,
            issuer=self.cert,
            key=key,
            subject=_name(common_name, organizations),
            usages=usages,
            names=sans,
            not_before=_now() - datetime.timedelta(hours=1),
            not_after=_now() + datetime.timedelta(days=self.days),
        )
        return cert, key


# --------------------------------------------------------------------------------------
# process hygiene: every live plane is stopped at exit and on SIGTERM/SIGHUP

_LIVE: list[ControlPlane] = []
_LIVE_LOCK = threading.RLock()
_HANDLERS_INSTALLED = False


def _cleanup_all() -> None:
    with _LIVE_LOCK:
        planes = list(_LIVE)
    for cp in reversed(planes):
        with contextlib.suppress(Exception):
            cp.stop()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _cleanup_all()
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    # Default action: die by the same signal, as if we had not been here.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_PREVIOUS_HANDLERS: dict[int, Any] = {}


def _install_handlers() -> None:
    global _HANDLERS_INSTALLED  # noqa: PLW0603 - process-wide, installed once
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_cleanup_all)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still runs
    for sig in (signal.SIGTERM, signal.SIGHUP):
        current = signal.getsignal(sig)
        if current in (signal.SIG_DFL, None):
            _PREVIOUS_HANDLERS[sig] = signal.SIG_DFL
            signal.signal(sig, _on_signal)
        # SIG_IGN or someone else's handler: leave it alone (atexit still cleans up).
    # SIGINT raises KeyboardInterrupt, which unwinds context managers / pytest fixtures.


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # PR_SET_PDEATHSIG(SIGKILL): the child dies if this Python process is killed outright
    # (kill -9), when neither atexit nor a signal handler can run.
    try:
        import ctypes  # noqa: PLC0415 - only needed here

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


# --------------------------------------------------------------------------------------


class ControlPlane:
    """etcd + kube-apiserver (+ optional kube-controller-manager) on 127.0.0.1.

    Attributes once started: ``server`` (https URL), ``kubeconfig`` (admin kubeconfig path),
    ``ca_file`` (serving CA), ``bin_dir``, ``workdir`` (temp dir with PKI, data and logs),
    ``etcd_url``, ``apiserver_port``, ``ports``, ``pids``, ``log_files``.
    """

    def __init__(
        self,
        bin_dir: str | os.PathLike[str] | None = None,
        *,
        controller_manager: bool = False,
        start_timeout: float = 60.0,
        keep_workdir: bool | None = None,
        die_with_parent: bool = True,
        extra_apiserver_flags: Sequence[str] = (),
    ) -> None:
        self._bin_dir_arg = Path(bin_dir) if bin_dir is not None else None
        self.controller_manager = controller_manager
        self.start_timeout = start_timeout
        if keep_workdir is None:
            keep_workdir = os.environ.get(KEEP_WORKDIR_ENV, "") not in ("", "0", "false")
        self.keep_workdir = keep_workdir
        self.die_with_parent = die_with_parent
        self.extra_apiserver_flags = list(extra_apiserver_flags)

        self.bin_dir: Path | None = None
        self.workdir: Path | None = None
        self.kubeconfig: Path | None = None
        self.ca_file: Path | None = None
        self.server: str | None = None
        self.etcd_url: str | None = None
        self.apiserver_port: int | None = None
        self.etcd_peer_port: int | None = None
        self.etcd_client_port: int | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._all_pids: dict[str, list[int]] = {}
        self._failed = False
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- context manager
    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self._failed = True
        self.stop()

    # ---------------------------------------------------------------- paths and helpers
    def _path(self, name: str) -> Path:
        assert self.workdir is not None, "control plane not started"
        return self.workdir / name

    def _bin(self, tool: str) -> str:
        assert self.bin_dir is not None, "control plane not started"
        path = self.bin_dir / tool
        if not os.access(path, os.X_OK):
            raise ControlPlaneError(f"{path} is missing; run hack/k8s-tools.sh")
        return str(path)

    @property
    def ports(self) -> dict[str, int]:
        """The loopback ports this plane uses (while started)."""
        ports = {
            "etcd-client": self.etcd_client_port,
            "etcd-peer": self.etcd_peer_port,
            "kube-apiserver": self.apiserver_port,
        }
        return {k: v for k, v in ports.items() if v is not None}

    @property
    def pids(self) -> dict[str, int]:
        """Current pid (= process group id) of each running component."""
        return {name: p.pid for name, p in self._procs.items()}

    @property
    def all_pids(self) -> list[int]:
        """Every pid ever started by this plane (including ones replaced by restarts)."""
        return [pid for pids in self._all_pids.values() for pid in pids]

    @property
    def log_files(self) -> dict[str, Path]:
        assert self.workdir is not None
        return {p.stem: p for p in sorted(self.workdir.glob("*.log"))}

    def env(self, kubeconfig: str | os.PathLike[str] | None = None) -> dict[str, str]:
        """os.environ plus KUBECONFIG (admin, or the given one) and PATH with the bin dir first.

        Helm's and kubectl's caches go into the work dir so tests don't touch ~/.cache.
        """
        assert self.bin_dir is not None, "not started"
        assert self.kubeconfig is not None, "not started"
        env = dict(os.environ)
        env["KUBECONFIG"] = str(kubeconfig if kubeconfig is not None else self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        home = self._path("home")
        env.setdefault("HELM_CACHE_HOME", str(home / "helm-cache"))
        env.setdefault("HELM_CONFIG_HOME", str(home / "helm-config"))
        env.setdefault("HELM_DATA_HOME", str(home / "helm-data"))
        env.setdefault("KUBECACHEDIR", str(home / "kube-cache"))
        return env

    def run(
        self,
        tool: str,
        *args: str,
        kubeconfig: str | os.PathLike[str] | None = None,
        check: bool = True,
        input: str | None = None,  # noqa: A002 - mirrors subprocess.run
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run a tool from the bin dir (``kubectl``, ``helm``) against this plane."""
        cmd = [self._bin(tool), *args]
        proc = subprocess.run(
            cmd,
            env=self.env(kubeconfig),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise CommandFailedError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, **kwargs)

    def helm(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, **kwargs)

    # ---------------------------------------------------------------- start / stop
    def start(self) -> ControlPlane:
        with self._lock:
            if self._procs:
                return self
            self.bin_dir = (
                self._bin_dir_arg.resolve()
                if self._bin_dir_arg is not None
                else ensure_tools(["all"] if self.controller_manager else [])
            )
            for tool in ("etcd", "kube-apiserver"):
                self._bin(tool)
            _install_handlers()
            with _LIVE_LOCK:
                _LIVE.append(self)
            self.workdir = Path(tempfile.mkdtemp(prefix="smtpoauth-k8s-"))
            try:
                self._write_pki()
                for attempt in range(1, PORT_ATTEMPTS + 1):
                    self._pick_ports()
                    try:
                        self._start_etcd()
                        self._start_apiserver()
                        self._wait_apiserver_ready()
                        break
                    except ControlPlaneError as exc:
                        # Another process (a parallel test run, say) took a port between
                        # picking it and binding it: try again with fresh ports.
                        if "address already in use" not in str(exc) or attempt == PORT_ATTEMPTS:
                            raise
                        print(
                            f"port clash (address already in use) on {self.ports}; retrying", file=sys.stderr
                        )
                        self._stop_proc("kube-apiserver")
                        self._stop_proc("etcd")
                        shutil.rmtree(self._path("etcd-data"), ignore_errors=True)
                        self._failed = False
                if self.controller_manager:
                    self._start_controller_manager()
            except BaseException:
                self._failed = True
                self.stop()
                raise
            return self

    def stop(self) -> None:
        """Stop every component (SIGTERM, SIGKILL after a grace period) and free the ports.

        The work dir (PKI, etcd data, logs) is removed unless the plane failed or
        ``keep_workdir`` / ``$SMTPOAUTH_E2E_KEEP_WORKDIR`` is set; then its path is printed.
        """
        with self._lock:
            # apiserver/controller-manager first, etcd last
            for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
                self._stop_proc(name)
            for name in list(self._procs):
                self._stop_proc(name)
            for port in self.ports.values():
                with contextlib.suppress(ControlPlaneError):
                    _wait_port_free(port, 10.0)
            with _LIVE_LOCK:
                if self in _LIVE:
                    _LIVE.remove(self)
            if self.workdir is not None and self.workdir.exists():
                if self._failed or self.keep_workdir:
                    print(f"control plane work dir (logs) kept: {self.workdir}", file=sys.stderr)
                else:
                    shutil.rmtree(self.workdir, ignore_errors=True)

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver and start it again on the same port with the same etcd."""
        with self._lock:
            self.stop_apiserver()
            self.start_apiserver()

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver (etcd keeps running): every client's watch breaks."""
        with self._lock:
            if "kube-apiserver" not in self._procs:
                raise ControlPlaneError("kube-apiserver is not running")
            self._stop_proc("kube-apiserver")
            assert self.apiserver_port is not None
            _wait_port_free(self.apiserver_port, 15.0)

    def start_apiserver(self) -> None:
        """Start kube-apiserver again on the same port with the same etcd, and wait until ready."""
        with self._lock:
            self._start_apiserver()
            self._wait_apiserver_ready()

    def is_running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs.values())

    # ---------------------------------------------------------------- ServiceAccount tokens
    def token_for(self, namespace: str, service_account: str, duration: int = 3600) -> str:
        """A TokenRequest token for an existing ServiceAccount (via ``kubectl create token``)."""
        proc = self.kubectl(
            "create", "token", service_account, "-n", namespace, f"--duration={int(duration)}s"
        )
        token = proc.stdout.strip()
        if not token:
            raise ControlPlaneError(f"kubectl create token returned nothing: {proc.stderr}")
        return token

    def kubeconfig_for_token(
        self, token: str, path: str | os.PathLike[str], namespace: str | None = None
    ) -> Path:
        """Write a kubeconfig that authenticates with a bearer token; returns its path."""
        path = Path(path)
        self._write_kubeconfig(path, user={"token": token}, namespace=namespace)
        return path

    # ---------------------------------------------------------------- internals
    def _write_pki(self) -> None:
        days = 30
        serving_ca = _CA("smtpoauth-e2e-serving-ca", days)
        client_ca = _CA("smtpoauth-e2e-client-ca", days)
        serving_cert, serving_key = serving_ca.issue(
            "kube-apiserver",
            server=True,
            dns_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ip_addresses=["127.0.0.1", SERVICE_IP],
        )
        admin_cert, admin_key = client_ca.issue("admin", organizations=["system:masters"], client=True)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

        files = {
            "ca.crt": _pem_cert(serving_ca.cert),
            "ca.key": _pem_key(serving_ca.key),
            "apiserver.crt": _pem_cert(serving_cert),
            "apiserver.key": _pem_key(serving_key),
            "client-ca.crt": _pem_cert(client_ca.cert),
            "client-ca.key": _pem_key(client_ca.key),
            "admin.crt": _pem_cert(admin_cert),
            "admin.key": _pem_key(admin_key),
            "sa.key": _pem_key(sa_key),
            "sa.pub": sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        }
        pki = self._path("pki")
        pki.mkdir(mode=0o700)
        for name, data in files.items():
            (pki / name).write_bytes(data)
            (pki / name).chmod(0o600)
        self.ca_file = pki / "ca.crt"
        self._path("home").mkdir()

    def _pick_ports(self) -> None:
        ports = _free_ports(3)
        self.etcd_client_port, self.etcd_peer_port, self.apiserver_port = ports
        self.etcd_url = f"http://127.0.0.1:{self.etcd_client_port}"
        self.server = f"https://127.0.0.1:{self.apiserver_port}"
        self.kubeconfig = self._path("admin.kubeconfig")
        pki = self._path("pki")
        self._write_kubeconfig(
            self.kubeconfig,
            user={
                "client-certificate-data": _b64((pki / "admin.crt").read_bytes()),
                "client-key-data": _b64((pki / "admin.key").read_bytes()),
            },
        )

    def _write_kubeconfig(self, path: Path, *, user: Mapping[str, str], namespace: str | None = None) -> None:
        assert self.ca_file is not None
        assert self.server is not None
        context: dict[str, str] = {"cluster": "e2e", "user": "e2e-user"}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "e2e",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": _b64(self.ca_file.read_bytes()),
                    },
                }
            ],
            "users": [{"name": "e2e-user", "user": dict(user)}],
            "contexts": [{"name": "e2e", "context": context}],
            "current-context": "e2e",
            "preferences": {},
        }
        # JSON is YAML: kubectl, helm and the kubernetes Python client all read it.
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)

    def _spawn(self, name: str, cmd: Sequence[str]) -> subprocess.Popen[bytes]:
        log_path = self._path(f"{name}.log")
        with log_path.open("ab") as log:
            log.write(f"\n=== {_now().isoformat()} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # own process group: killpg reaches all of it
                preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
            )
        self._procs[name] = proc
        self._all_pids.setdefault(name, []).append(proc.pid)
        return proc

    def _stop_proc(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None:
            stop_process_group(proc)

    def _tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self._path(f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _fail(self, name: str, message: str) -> ControlPlaneError:
        self._failed = True
        log = self._path(f"{name}.log")
        return ControlPlaneError(
            f"{message}\n--- last {LOG_TAIL_LINES} lines of {log} ---\n{self._tail(name)}"
        )

    def _start_etcd(self) -> None:
        assert self.etcd_url is not None
        data_dir = self._path("etcd-data")
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self._spawn(
            "etcd",
            [
                self._bin("etcd"),
                "--name=e2e",
                f"--data-dir={data_dir}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=e2e={peer}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        self._wait(
            "etcd",
            lambda: _http_ok(f"{self.etcd_url}/health", expect=b'"health":"true"'),
            timeout=30.0,
            what="etcd /health",
        )

    def _apiserver_cmd(self) -> list[str]:
        pki = self._path("pki")
        return [
            self._bin("kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            f"--secure-port={self.apiserver_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--cert-dir={self._path('apiserver-certs')}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'client-ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer=https://127.0.0.1:{self.apiserver_port}/",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            "--profiling=false",
            *self.extra_apiserver_flags,
        ]

    def _start_apiserver(self) -> None:
        self._spawn("kube-apiserver", self._apiserver_cmd())

    def _ssl_context(self) -> ssl.SSLContext:
        assert self.ca_file is not None
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        pki = self._path("pki")
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return ctx

    def _wait_apiserver_ready(self) -> None:
        ctx = self._ssl_context()
        self._wait(
            "kube-apiserver",
            lambda: _http_ok(f"{self.server}/readyz", ctx=ctx),
            timeout=self.start_timeout,
            what="kube-apiserver /readyz",
        )
        # The apiserver's bootstrap controller creates the default namespace; wait for it
        # so the first `kubectl apply` of a test does not race it.
        self._wait(
            "kube-apiserver",
            lambda: _http_ok(f"{self.server}/api/v1/namespaces/default", ctx=ctx),
            timeout=self.start_timeout,
            what="namespace 'default'",
        )

    def _wait(self, name: str, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self._procs.get(name)
            if proc is None or proc.poll() is not None:
                rc = None if proc is None else proc.returncode
                raise self._fail(name, f"{name} exited (code {rc}) while waiting for {what}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise self._fail(name, f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.2)

    def _start_controller_manager(self) -> None:
        pki = self._path("pki")
        self._spawn(
            "kube-controller-manager",
            [
                self._bin("kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--leader-elect=false",
                "--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={self.ca_file}",
                "--use-service-account-credentials=false",
            ],
        )
        time.sleep(1.0)
        proc = self._procs["kube-controller-manager"]
        if proc.poll() is not None:
            raise self._fail("kube-controller-manager", "kube-controller-manager exited")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _http_ok(url: str, *, ctx: ssl.SSLContext | None = None, expect: bytes | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
            body = resp.read()
            return resp.status == 200 and (expect is None or expect in body.replace(b" ", b""))
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


# --------------------------------------------------------------------------------------
# CLI


def _cmd_build(args: argparse.Namespace) -> int:
    print(ensure_tools(["all"] if args.controller_manager else []))
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)
    signal.signal(signal.SIGINT, handler)
    cp = ControlPlane(args.bin_dir, controller_manager=args.controller_manager, keep_workdir=args.keep)
    with cp:
        assert cp.kubeconfig is not None
        kubeconfig = cp.kubeconfig
        if args.kubeconfig:
            kubeconfig = Path(args.kubeconfig).resolve()
            tmp = kubeconfig.with_name(kubeconfig.name + ".tmp")
            shutil.copyfile(cp.kubeconfig, tmp)
            tmp.chmod(0o600)
            tmp.replace(kubeconfig)  # atomic: a script polling for the file never reads half of it
        print(f"export KUBECONFIG={kubeconfig}")
        print(f"export PATH={cp.bin_dir}:$PATH")
        print(f"# server {cp.server}; logs in {cp.workdir}; Ctrl-C or SIGTERM to stop")
        sys.stdout.flush()
        while not stop.wait(1.0):
            if not cp.is_running():
                names = [n for n, p in cp._procs.items() if p.poll() is not None]
                print(f"control plane component(s) died: {names}", file=sys.stderr)
                cp._failed = True
                return 1
        print("stopping control plane ...", file=sys.stderr)
    if args.kubeconfig:
        with contextlib.suppress(OSError):
            Path(args.kubeconfig).unlink()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build or reuse the tools; print the bin dir")
    p_up = sub.add_parser("up", help="start the control plane and stay in the foreground")
    for p in (p_build, p_up):
        p.add_argument(
            "--controller-manager",
            action="store_true",
            help="also build (and for 'up' run) kube-controller-manager",
        )
    p_up.add_argument("--bin-dir", default=None, help=f"tools dir (default: ${BIN_DIR_ENV} or build)")
    p_up.add_argument("--kubeconfig", default=None, help="also copy the admin kubeconfig here")
    p_up.add_argument("--keep", action="store_true", default=None, help="keep the work dir")
    args = parser.parse_args(argv)
    if args.command == "build":
        return _cmd_build(args)
    return _cmd_up(args)


if __name__ == "__main__":
    sys.exit(main())
