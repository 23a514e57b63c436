"""The benchmark's world: a control plane with an audit log, the fake peers, and the operator process.

Everything here is plumbing the measurements in :mod:`e2e.bench.run` share: starting things, creating
SmtpOAuthConfigs fast, watching for ``Ready=True``, reading /proc and the audit log.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import kubernetes
from e2e.controlplane import REPO_ROOT, ControlPlane, free_port
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, PLURAL, KIND = "smtpoauth.dev", "v1alpha1", "smtpoauthconfigs", "SmtpOAuthConfig"
CRD_FILE = REPO_ROOT / "crds" / "smtpoauthconfigs.smtpoauth.dev.yaml"
OPERATOR_NAMESPACE = "bench-system"
OPERATOR_SA = "smtp-oauth-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}"
ADMIN_USER = "admin"
TRUST = "bench-trust"
SECRET_KEY = "client-secret"  # the key in the Secrets
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})

AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    users: ["{OPERATOR_USER}"]
  - level: Metadata
    users: ["{ADMIN_USER}"]
    verbs: ["create"]
    resources:
      - group: "{GROUP}"
        resources: ["{PLURAL}"]
  - level: None
"""


# ------------------------------------------------------------------------------------------ control plane


def start_control_plane(bin_dir: Path, out: Path) -> tuple[ControlPlane, Path]:
    """A control plane whose audit log records every request of the operator's ServiceAccount."""
    policy = out / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    audit_log = out / "audit.log"
    cp = ControlPlane(
        bin_dir,
        extra_apiserver_flags=[
            f"--audit-policy-file={policy}",
            f"--audit-log-path={audit_log}",
            "--audit-log-mode=blocking",
            "--audit-log-maxsize=0",
        ],
    )
    cp.start()
    return cp, audit_log


def operator_kubeconfig(cp: ControlPlane, out: Path) -> Path:
    """A ServiceAccount with cluster-admin, so the operator's requests carry their own user name."""
    cp.kubectl("create", "namespace", OPERATOR_NAMESPACE)
    cp.kubectl("create", "serviceaccount", OPERATOR_SA, "-n", OPERATOR_NAMESPACE)
    cp.kubectl(
        "create",
        "clusterrolebinding",
        "bench-operator",
        "--clusterrole=cluster-admin",
        f"--serviceaccount={OPERATOR_NAMESPACE}:{OPERATOR_SA}",
    )
    token = cp.token_for(OPERATOR_NAMESPACE, OPERATOR_SA, duration=48 * 3600)
    return cp.kubeconfig_for_token(token, out / "operator.kubeconfig")


def install_crd(cp: ControlPlane) -> None:
    cp.kubectl("apply", "-f", str(CRD_FILE))
    cp.kubectl("wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}", "--timeout=60s")


def admin_client(cp: ControlPlane, pool: int = 32) -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(cp.kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = pool
    return kubernetes.client.ApiClient(configuration)


# ------------------------------------------------------------------------------------------ peers


class Peers:
    """The fake Entra ID + Exchange in a child process (e2e/bench/peers.py), driven over stdin/stdout."""

    def __init__(self, state_dir: Path, rtt_ms: float = 0.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "e2e.bench.peers", str(state_dir), "--rtt-ms", str(rtt_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(state_dir / "peers.log").open("ab"),
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": _pythonpath()},
        )
        self._lock = threading.Lock()
        line = self._readline()
        self.endpoints: dict[str, Any] = json.loads(line)
        self.ca_pem = Path(self.endpoints["ca_file"]).read_text()
        self.pid = self.proc.pid

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fake peers exited (code {self.proc.poll()}); see peers.log")
        return line

    def _ask(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            answer: dict[str, Any] = json.loads(self._readline())
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def register(self, client_id: str, secret: str) -> None:
        self._ask({"cmd": "register", "client_id": client_id, "secret": secret})

    def counters(self) -> dict[str, Any]:
        return self._ask({"cmd": "counters"})

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, OSError, ValueError):
                self._ask({"cmd": "quit"})
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _pythonpath() -> str:
    parts = [str(REPO_ROOT), str(REPO_ROOT / "operator" / "src")]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)


@dataclass
class App:
    client_id: str
    secret: str
    secret_name: str = ""


def new_app(peers: Peers, secret_name: str = "") -> App:
    app = App(str(uuid.uuid4()), f"bench~{uuid.uuid4().hex}", secret_name)
    peers.register(app.client_id, app.secret)
    return app


# ------------------------------------------------------------------------------------------ objects


def namespace_with_trust(api: kubernetes.client.ApiClient, namespace: str, peers: Peers) -> None:
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": TRUST}, "data": {"ca.pem": peers.ca_pem}}
    )


def create_secret(api: kubernetes.client.ApiClient, namespace: str, name: str, value: str) -> None:
    """A Secret kept the recommended way (from a SealedSecret, excluded from backups), so that the
    operator has no SecretNotProtected warning to post and the Event count is the plain one."""
    kubernetes.client.CoreV1Api(api).create_namespaced_secret(
        namespace,
        {
            "metadata": {
                "name": name,
                "labels": {"velero.io/exclude-from-backup": "true"},
                "ownerReferences": [
                    {
                        "apiVersion": "bitnami.com/v1alpha1",
                        "kind": "SealedSecret",
                        "name": name,
                        "uid": str(uuid.uuid4()),
                        "controller": True,
                    }
                ],
            },
            "data": {SECRET_KEY: base64.b64encode(value.encode()).decode()},
        },
    )


def config(peers: Peers, namespace: str, name: str, app: App, recheck: str) -> dict[str, Any]:
    e = peers.endpoints
    trust = {"configMapKeyRef": {"name": TRUST, "key": "ca.pem"}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "username": e["mailbox"],
            "smtp": {
                "host": e["smtp_host"],
                "port": e["smtp_port"],
                "connectionTimeoutSeconds": 30,
                "caBundle": trust,
            },
            "identity": {
                "tenantId": e["tenant_id"],
                "clientId": app.client_id,
                "authorityHost": e["authority_host"],
                "timeoutSeconds": 30,
                "caBundle": trust,
                "clientSecret": {"secretKeyRef": {"name": app.secret_name, "key": SECRET_KEY}},
            },
            "recheckInterval": recheck,
        },
    }


def create_configs(
    api: kubernetes.client.ApiClient, bodies: Iterable[Mapping[str, Any]], threads: int = 16
) -> None:
    """Create many SmtpOAuthConfigs at once, from a pool of threads."""
    custom = kubernetes.client.CustomObjectsApi(api)

    def create(body: Mapping[str, Any]) -> None:
        for attempt in range(5):
            try:
                custom.create_namespaced_custom_object(
                    GROUP, VERSION, body["metadata"]["namespace"], PLURAL, body
                )
                return
            except ApiException as exc:
                if exc.status == 409:
                    return
                if exc.status in (429, 500, 503, 504) and attempt < 4:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise

    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="create") as pool:
        for future in [pool.submit(create, b) for b in bodies]:
            future.result()


def delete_configs(api: kubernetes.client.ApiClient, namespace: str) -> None:
    kubernetes.client.CustomObjectsApi(api).delete_collection_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL
    )


# ------------------------------------------------------------------------------------------ Ready watch


def _is_ready(obj: Mapping[str, Any]) -> bool:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return False


class ReadyWatch:
    """Watches all SmtpOAuthConfigs in a thread; remembers when each was first seen Ready=True."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.ready_at: dict[tuple[str, str], float] = {}
        self.not_ready: dict[tuple[str, str], str] = {}  # latest Ready reason of those not Ready
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._watch: kubernetes.watch.Watch | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ready-watch", daemon=True)
        self._started = threading.Event()
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the Ready watch did not start")

    def _see(self, obj: Mapping[str, Any], now: float) -> None:
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if key in self.ready_at:
            return
        if _is_ready(obj):
            with self._cond:
                self.ready_at[key] = now
                self.not_ready.pop(key, None)
                self._cond.notify_all()
        else:
            for c in (obj.get("status") or {}).get("conditions") or []:
                if c.get("type") == "Ready":
                    self.not_ready[key] = f"{c.get('status')}/{c.get('reason')}"

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                listing = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
                now = time.time()
                for obj in listing.get("items") or []:
                    self._see(obj, now)
                version = listing["metadata"]["resourceVersion"]
                self._started.set()
                self._watch = kubernetes.watch.Watch()
                try:
                    for event in self._watch.stream(
                        self.custom.list_cluster_custom_object,
                        GROUP,
                        VERSION,
                        PLURAL,
                        resource_version=version,
                        timeout_seconds=600,
                    ):
                        now = time.time()
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self._see(event["object"], now)
                        if self._stop.is_set():
                            break
                except ApiException as exc:
                    if exc.status != 410:
                        raise
        except BaseException as exc:  # surfaced by wait()
            if not self._stop.is_set():
                self.error = exc
                self._started.set()
                with self._cond:
                    self._cond.notify_all()

    def wait(
        self,
        keys: Iterable[tuple[str, str]],
        timeout: float,
        alive: Any = None,
    ) -> float:
        """Block until every key is Ready; returns the time the last one became Ready."""
        wanted = set(keys)
        if not wanted:
            return time.time()
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self.error is not None:
                    raise RuntimeError(f"the Ready watch failed: {self.error!r}")
                missing = wanted - self.ready_at.keys()
                if not missing:
                    return max(self.ready_at[k] for k in wanted)
                if alive is not None:
                    alive()
                if time.monotonic() > deadline:
                    sample = sorted(missing)[:5]
                    reasons = {f"{k[0]}/{k[1]}": self.not_ready.get(k, "no Ready condition") for k in sample}
                    raise TimeoutError(
                        f"{len(missing)} of {len(wanted)} SmtpOAuthConfigs not Ready after {timeout:.0f} s, "
                        f"e.g. {reasons}"
                    )
                self._cond.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()


# ------------------------------------------------------------------------------------------ the operator


class Operator:
    """``smtp-oauth-operator run -A`` as a child process, logged to a file."""

    def __init__(self, kubeconfig: Path, log: Path, workers: int) -> None:
        self.metrics_port = free_port()
        self.log = log
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "PYTHONPATH": _pythonpath(),
            "POD_NAME": "bench-operator",
        }
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smtp_oauth_operator.cli",
                "run",
                "-A",
                f"--workers={workers}",
                f"--metrics-port={self.metrics_port}",
                "--log-format=plain",
                "--log-level=info",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.started = time.time()
        deadline = time.monotonic() + 60
        while not self._metrics_up():
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the operator did not serve metrics within 60 s; see {log}")
            time.sleep(0.2)

    def _metrics_up(self) -> bool:
        try:
            self.metrics()
            return True
        except OSError:
            return False

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())

    def metric_sum(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"the operator exited with code {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# ------------------------------------------------------------------------------------------ /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


# ------------------------------------------------------------------------------------------ audit log


@dataclass(frozen=True)
class Request:
    user: str
    verb: str
    resource: str
    subresource: str
    namespace: str
    name: str
    received: float
    completed: float
    code: int


@dataclass
class AuditLog:
    """Reads the API server's JSON audit log; one :class:`Request` per audit ID."""

    path: Path
    _offset: int = 0
    _seen: set[str] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)

    def refresh(self) -> list[Request]:
        if not self.path.exists():
            return self.requests
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            event = json.loads(line)
            audit_id = event.get("auditID", "")
            stage = event.get("stage")
            # Watches log ResponseStarted (when they begin) and ResponseComplete (when they end):
            # count each request once, at the first stage logged.
            if audit_id in self._seen or stage not in ("ResponseStarted", "ResponseComplete", "Panic"):
                continue
            self._seen.add(audit_id)
            ref = event.get("objectRef") or {}
            self.requests.append(
                Request(
                    user=(event.get("user") or {}).get("username", ""),
                    verb=event.get("verb", ""),
                    resource=ref.get("resource", ""),
                    subresource=ref.get("subresource", ""),
                    namespace=ref.get("namespace", ""),
                    name=ref.get("name", ""),
                    received=_ts(event.get("requestReceivedTimestamp")),
                    completed=_ts(event.get("stageTimestamp")),
                    code=int((event.get("responseStatus") or {}).get("code") or 0),
                )
            )
        return self.requests

    def between(self, start: float, end: float, user: str = OPERATOR_USER) -> list[Request]:
        self.refresh()
        return [r for r in self.requests if r.user == user and start <= r.received < end]


def _ts(value: str | None) -> float:
    return datetime.fromisoformat(value).timestamp() if value else 0.0


def summarize(requests: list[Request]) -> dict[str, Any]:
    """Writes and reads by verb and resource, and Events created."""
    writes: dict[str, int] = {}
    reads: dict[str, int] = {}
    for r in requests:
        what = r.resource + (f"/{r.subresource}" if r.subresource else "")
        bucket = writes if r.verb in WRITE_VERBS else reads
        bucket[f"{r.verb} {what}"] = bucket.get(f"{r.verb} {what}", 0) + 1
    return {
        "writes": sum(writes.values()),
        "reads": sum(reads.values()),
        "events_created": writes.get("create events", 0),
        "status_patches": writes.get(f"patch {PLURAL}/status", 0),
        "writes_by_kind": dict(sorted(writes.items())),
        "reads_by_kind": dict(sorted(reads.items())),
    }


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
