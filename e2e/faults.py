"""The fault-injection suite (issue 10): faults driven while resources are tested and alarmed.

Each scenario runs its own operator process(es), talking to the real kube-apiserver through a
:class:`~e2e.faultproxy.FaultProxy`, against the local Entra ID and Exchange stand-ins, and returns a
:class:`Record`: how often the fault was injected, how long the resources took to converge afterwards,
and what went wrong — duplicate alarm e-mails, duplicate test messages, lost spec/Secret changes,
ghost resources and ghost metric series (all must be 0).

Every resource has its own app registration (so the stand-ins' counters are per resource), its own
Secret carrying the client secret and its expiry date (``expiresAtKey``: a Secret change is visible in
``status.clientSecretExpiresAt``), a ``testMessage`` (one message per connection test) and an alarm
recipient. Its secret expires in 3 days, so it raises exactly one alarm (the 7-day threshold).

What counts:

- a *duplicate alarm* is an alarm e-mail beyond one per alarm-worthy expiry date the resource had;
- a *duplicate test message* is a test message beyond one per change that asked for a test (spec,
  Secret) plus the periodic rechecks its ``recheckInterval`` allows in the scenario's duration, or any
  test made by a replica that kopf has paused;
- a *lost change* is a resource whose status, after the convergence timeout, does not show its last
  spec generation or its Secret's last expiry date;
- a *ghost resource* is a deleted resource the operator still acts on (a test, a mail, a login) and a
  *ghost series* a deleted resource's ``smtpoauth_*`` metric series, both after a quiet period.

``python -m e2e.faults [--full] [--only NAME…] [--write docs/reliability.md]`` runs the scenarios
outside pytest (the CI-sized run is e2e/test_faults.py, part of ``make test``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes
from e2e.controlplane import REPO_ROOT, ControlPlane, ensure_tools
from e2e.faultproxy import FaultProxy
from e2e.fixtures import CRD_NAME, App, Dev, Namespace, OperatorProcess, wait_until
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from smtp_oauth_operator.testing.devservers import DevServers
from smtp_oauth_operator.testing.peers import SilentServer

__all__ = ["CI", "FULL", "SCENARIOS", "Record", "Size", "World", "main", "table"]

GROUP, VERSION, PLURAL = "smtpoauth.dev", "v1alpha1", "smtpoauthconfigs"
ADMIN = "admin@contoso.com"  # receives the alarm e-mails
CANARY = "canary@contoso.com"  # receives the test messages
OPERATOR_NS = "faults-system"
OPERATOR_SA = "smtp-oauth-operator"
PEERING = "faults"
PEERING_CRDS = REPO_ROOT / "charts" / "smtp-oauth-operator" / "crds" / "kopf-peerings.yaml"
ALARM_DAYS = 3  # a fresh resource's secret expires in 3 days: one alarm, at the 7-day threshold
METRIC_PREFIX = "smtpoauth_"


@dataclass(frozen=True)
class Size:
    """How big a run is: the CI-sized run is part of ``make test``, the full run is a separate command."""

    name: str
    resources: int  # resources per scenario
    outage: float  # seconds the status patch fails
    etcd_down: float  # seconds etcd stays down
    sick_idp: int  # resources whose identity provider is black-holed
    sick_smtp: int  # resources whose SMTP server is black-holed
    healthy: int  # healthy resources timed with and without the sick ones
    workers: int  # --workers for the black-hole scenario
    join_window: float  # seconds a paused replica is watched (recheckInterval 1m)
    quiet: float  # quiet period before counting
    converge: float  # convergence timeout (generous: a machine under load is slow, not broken)


CI = Size(
    "ci",
    resources=3,
    outage=60,
    etcd_down=5,
    sick_idp=6,
    sick_smtp=2,
    healthy=4,
    workers=16,
    join_window=75,
    quiet=3,
    converge=150,
)
FULL = Size(
    "full",
    resources=16,
    outage=180,
    etcd_down=20,
    sick_idp=10,
    sick_smtp=6,
    healthy=12,
    workers=32,
    join_window=190,
    quiet=15,
    converge=300,
)


@dataclass
class Record:
    """One scenario's outcome: one row of docs/reliability.md."""

    fault: str
    injected: str = ""
    converge_seconds: float | None = None
    duplicate_alarms: int = 0
    duplicate_tests: int = 0
    lost_changes: int = 0
    ghost_resources: int = 0
    ghost_series: int = 0
    unexpected_errors: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return self.converge_seconds is not None

    def problems(self) -> list[str]:
        """Everything that breaks a promise; empty when the operator behaved."""
        out = []
        if not self.converged:
            out.append("did not converge")
        for what in (
            "duplicate_alarms",
            "duplicate_tests",
            "lost_changes",
            "ghost_resources",
            "ghost_series",
            "unexpected_errors",
        ):
            if getattr(self, what):
                out.append(f"{what.replace('_', ' ')}: {getattr(self, what)}")
        return out


# ------------------------------------------------------------------------------------------ resources


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _in_days(days: float) -> str:
    return _rfc3339(datetime.now(UTC) + timedelta(days=days))


@dataclass
class Res:
    """A SmtpOAuthConfig the scenario drives, and what the operator should end up showing for it."""

    ns: Namespace
    name: str
    app: App
    expires: str  # the date in its Secret (what status.clientSecretExpiresAt must show)
    recheck: str = "1h"
    timeout: int = 10  # smtp.connectionTimeoutSeconds: bumped for a spec change
    alarm_dates: set[str] = field(default_factory=set)  # alarm-worthy dates it has had
    triggers: int = 1  # changes that ask for a test (creation is one)
    generation: int = 1
    secret_present: bool = True
    deleted_at: float | None = None
    created_at: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[str, str]:
        return (self.ns.name, self.name)

    @property
    def alarmed(self) -> bool:
        return datetime.strptime(self.expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) < datetime.now(
            UTC
        ) + timedelta(days=7)


class World:
    """The control plane, the stand-ins, the operator's identity and the helpers the scenarios share."""

    def __init__(self, cp: ControlPlane, dev: Dev, workdir: Path, log: Callable[[str], None] = print) -> None:
        self.cp = cp
        self.dev = dev
        self.workdir = workdir
        self.log = log
        self.token = ""
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(cp.kubeconfig), client_configuration=configuration)
        self.api = kubernetes.client.ApiClient(configuration)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self._operators: list[OperatorProcess] = []
        self._counter = 0
        self._namespaces: list[str] = []
        self._deleted_at: dict[tuple[Path, tuple[str, str]], int] = {}  # log offsets at deletion

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        self.cp.kubectl("apply", "-f", str(REPO_ROOT / "crds"), "-f", str(PEERING_CRDS))
        self.cp.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", timeout=90)
        self.cp.kubectl(
            "wait",
            "--for=condition=Established",
            "crd/clusterkopfpeerings.kopf.dev",
            "--timeout=60s",
            timeout=90,
        )
        wait_until(
            lambda: self.cp.kubectl("get", PLURAL, "-A", check=False).returncode == 0,
            timeout=30,
            what="SmtpOAuthConfig in discovery",
        )
        self.cp.kubectl("create", "namespace", OPERATOR_NS)
        self.cp.kubectl("create", "serviceaccount", OPERATOR_SA, "-n", OPERATOR_NS)
        self.cp.kubectl(
            "create",
            "clusterrolebinding",
            "faults-operator",
            "--clusterrole=cluster-admin",
            f"--serviceaccount={OPERATOR_NS}:{OPERATOR_SA}",
        )
        self.token = self.cp.token_for(OPERATOR_NS, OPERATOR_SA, duration=24 * 3600)
        self.cp.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(
                {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}}
            ),
        )

    # ---------------------------------------------------------------- processes
    @contextlib.contextmanager
    def proxy(self, label: str) -> Iterator[FaultProxy]:
        assert self.cp.server is not None
        assert self.cp.ca_file is not None
        with FaultProxy(self.cp.server, self.cp.ca_file, self.workdir / f"proxy-{label}") as proxy:
            proxy.write_kubeconfig(self.workdir / f"proxy-{label}.kubeconfig", self.token)
            try:
                yield proxy
            finally:
                for op in self._operators:
                    op.kill()
                self._operators.clear()
                # The next scenario's operator must not inherit this one's resources (and their timers).
                for namespace in self._namespaces:
                    with contextlib.suppress(ApiException):
                        self.custom.delete_collection_namespaced_custom_object(
                            GROUP, VERSION, namespace, PLURAL
                        )
                self._namespaces.clear()

    def operator(self, proxy: FaultProxy, label: str, *args: str) -> OperatorProcess:
        """An operator process (started) whose API server is the proxy."""
        op = OperatorProcess(
            self.cp, self.workdir / f"operator-{label}.log", ["-A", *args], kubeconfig=proxy.kubeconfig
        )
        self._operators.append(op)
        op.start(timeout=90)
        return op

    # ---------------------------------------------------------------- objects
    def namespace(self, label: str) -> Namespace:
        self._counter += 1
        name = f"faults-{label}-{self._counter}-{uuid.uuid4().hex[:4]}"
        self.core.create_namespace({"metadata": {"name": name}})
        self._namespaces.append(name)
        self.core.create_namespaced_config_map(
            name, {"metadata": {"name": "dev-ca"}, "data": {"ca.pem": self.dev.ca_pem}}
        )
        return Namespace(self.cp, name, self.dev)

    def _secret_body(self, res: Res) -> dict[str, Any]:
        return {
            "metadata": {
                "name": res.name,
                # Kept the recommended way, so no SecretNotProtected warning muddies the counts.
                "labels": {"velero.io/exclude-from-backup": "true"},
            },
            "type": "Opaque",
            "stringData": {"client-secret": res.app.secret, "expires-at": res.expires},
        }

    def spec(self, res: Res, **overrides: Any) -> dict[str, Any]:
        spec = self.dev.spec(
            res.app,
            secret_name=res.name,
            recheckInterval=res.recheck,
            alarms={"notify": {"to": [ADMIN]}},
            testMessage={"to": CANARY},
            secretPolicy="Ignore",
        )
        spec["identity"]["clientSecret"]["expiresAtKey"] = "expires-at"
        spec["smtp"]["connectionTimeoutSeconds"] = res.timeout
        for path, value in overrides.items():
            node = spec
            *head, last = path.split(".")
            for part in head:
                node = node[part]
            node[last] = value
        return spec

    def create(self, ns: Namespace, name: str, *, recheck: str = "1h", **overrides: Any) -> Res:
        return self.create_many(ns, 1, prefix=name, recheck=recheck, names=[name], **overrides)[0]

    def create_many(
        self,
        ns: Namespace,
        count: int,
        prefix: str = "mail",
        *,
        recheck: str = "1h",
        names: Sequence[str] | None = None,
        **overrides: Any,
    ) -> list[Res]:
        """The Secrets first, then (a moment later, as ``kubectl apply -f secrets/ -f configs/`` would)
        the SmtpOAuthConfigs that reference them."""
        names = list(names or [f"{prefix}-{i}" for i in range(count)])
        resources = [
            Res(ns, name, self.dev.new_app(), _in_days(ALARM_DAYS), recheck=recheck) for name in names
        ]
        for res in resources:
            res.alarm_dates.add(res.expires)
            self.core.create_namespaced_secret(ns.name, self._secret_body(res))
        time.sleep(1.0)
        for res in resources:
            self.custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                ns.name,
                PLURAL,
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "SmtpOAuthConfig",
                    "metadata": {"name": res.name},
                    "spec": self.spec(res, **overrides),
                },
            )
            res.created_at = time.monotonic()
        return resources

    def change_spec(self, res: Res) -> None:
        """A spec change that asks for a test and changes no date (so no new alarm is due)."""
        res.timeout += 1
        res.triggers += 1
        res.generation += 1
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            res.ns.name,
            PLURAL,
            res.name,
            {"spec": {"smtp": {"connectionTimeoutSeconds": res.timeout}}},
        )

    def rotate_secret(self, res: Res) -> None:
        """A new client secret (registered with Entra ID first) valid for about a year, in the Secret."""
        new = self.dev.new_secret()
        self.dev.idp.add_secret(res.app.tenant_id, res.app.client_id, new)
        res.app = App(res.app.tenant_id, res.app.client_id, new)
        res.expires = _in_days(300 + secrets.randbelow(60))
        res.triggers += 1
        if res.secret_present:
            self.core.replace_namespaced_secret(res.name, res.ns.name, self._secret_body(res))
        else:
            self.core.create_namespaced_secret(res.ns.name, self._secret_body(res))
            res.secret_present = True

    def delete_secret(self, res: Res) -> None:
        self.core.delete_namespaced_secret(res.name, res.ns.name)
        res.secret_present = False

    def delete(self, res: Res, operators: Sequence[OperatorProcess]) -> None:
        for op in operators:
            size = op.log_file.stat().st_size if op.log_file.exists() else 0
            self._deleted_at[(op.log_file, res.key)] = size
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, res.ns.name, PLURAL, res.name)
        res.deleted_at = time.monotonic()

    def log_since_deleted(self, op: OperatorProcess, res: Res) -> str:
        with op.log_file.open("rb") as fh:
            fh.seek(self._deleted_at.get((op.log_file, res.key), 0))
            return fh.read().decode(errors="replace")

    def recheck(self, res: Res, value: str) -> None:
        res.triggers += 1
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            res.ns.name,
            PLURAL,
            res.name,
            {"metadata": {"annotations": {"smtpoauth.dev/recheck": value}}},
        )

    # ---------------------------------------------------------------- observing
    def objects(self, namespaces: Sequence[str]) -> dict[tuple[str, str], dict[str, Any]]:
        out = {}
        for namespace in namespaces:
            try:
                items = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
            except (ApiException, OSError, kubernetes.client.exceptions.OpenApiException):
                continue  # the API server is restarting: not converged yet
            except Exception:  # urllib3 errors while the API server restarts
                continue
            for obj in items:
                out[(namespace, obj["metadata"]["name"])] = obj
        return out

    @staticmethod
    def lag(res: Res, obj: dict[str, Any] | None) -> str | None:
        """Why ``obj`` does not (yet) show what ``res`` expects; None when it does."""
        if obj is None:
            return "missing"
        status = obj.get("status") or {}
        generation = obj["metadata"].get("generation")
        if status.get("observedGeneration") != generation:
            return f"observedGeneration {status.get('observedGeneration')} != {generation}"
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
        if res.secret_present:
            if not ready or ready.get("status") != "True":
                return f"Ready {ready and (ready.get('status'), ready.get('reason'))}"
            if status.get("clientSecretExpiresAt") != res.expires:
                return f"clientSecretExpiresAt {status.get('clientSecretExpiresAt')} != {res.expires}"
            if res.alarmed:
                last = status.get("lastAlarm") or {}
                if last.get("thresholdDays") != 7 or last.get("notified") is not True:
                    return f"lastAlarm {last}"
        elif not ready or ready.get("reason") != "SecretNotFound":
            return f"Ready {ready and (ready.get('status'), ready.get('reason'))} (Secret deleted)"
        return None

    def wait_converged(self, resources: Sequence[Res], timeout: float) -> float | None:
        """Seconds until every live resource shows what it should, or None after ``timeout``."""
        start = time.monotonic()
        live = [r for r in resources if r.deleted_at is None]
        namespaces = sorted({r.ns.name for r in live})
        lagging: dict[tuple[str, str], str] = {}
        while time.monotonic() - start < timeout:
            objs = self.objects(namespaces)
            lagging = {r.key: why for r in live if (why := self.lag(r, objs.get(r.key)))}
            if not lagging:
                return time.monotonic() - start
            time.sleep(0.5)
        self.log(f"not converged after {timeout:.0f}s: {dict(list(lagging.items())[:5])}")
        return None

    def lost_changes(self, resources: Sequence[Res]) -> int:
        live = [r for r in resources if r.deleted_at is None]
        objs = self.objects(sorted({r.ns.name for r in live}))
        lost = 0
        for res in live:
            why = self.lag(res, objs.get(res.key))
            if why:
                self.log(f"lost or unapplied change: {res.ns.name}/{res.name}: {why}")
                lost += 1
        return lost

    def alarm_mails(self, res: Res) -> int:
        return sum(1 for m in self.dev.messages(res.app) if ADMIN in m.rcpt_tos)

    def test_messages(self, res: Res) -> int:
        return sum(1 for m in self.dev.messages(res.app) if CANARY in m.rcpt_tos)

    def activity(self, res: Res) -> int:
        """Logins and mails seen for the resource's app (its identity is unique to it)."""
        return len(self.dev.auth_attempts(res.app)) + len(self.dev.messages(res.app))

    @staticmethod
    def series(op: OperatorProcess) -> set[tuple[str, str]]:
        """(namespace, name) of every smtpoauth_* metric series the operator exports."""
        try:
            text = op.metrics()
        except OSError:
            return set()
        found = set()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith(METRIC_PREFIX) and "name" in sample.labels:
                    found.add((sample.labels.get("namespace", ""), sample.labels["name"]))
        return found

    def count(
        self,
        record: Record,
        resources: Sequence[Res],
        operators: Sequence[OperatorProcess],
        *,
        seconds: float = 0.0,
        activity_before: dict[tuple[str, str], int] | None = None,
    ) -> None:
        """Fill in the duplicate, lost-change, ghost and error counts (after the quiet period)."""
        for res in resources:
            if res.deleted_at is not None:
                continue
            alarms = self.alarm_mails(res)
            allowed = len(res.alarm_dates)
            if alarms > allowed:
                self.log(f"{res.ns.name}/{res.name}: {alarms} alarm e-mails for {allowed} alarm(s)")
                record.duplicate_alarms += alarms - allowed
            tests = self.test_messages(res)
            period = _seconds(res.recheck)
            allowed = res.triggers + (math.ceil(seconds / period) if seconds else 0)
            if tests > allowed:
                self.log(f"{res.ns.name}/{res.name}: {tests} test messages for {allowed} allowed")
                record.duplicate_tests += tests - allowed
        record.lost_changes += self.lost_changes(resources)
        deleted = {r.key for r in resources if r.deleted_at is not None}
        if deleted:
            alive = [op for op in operators if op.proc is not None and op.proc.poll() is None]
            ghosts: set[tuple[str, str]] = set()
            for op in alive:
                ghosts |= self.series(op) & deleted
            record.ghost_series += len(ghosts)
            for res in resources:
                if res.deleted_at is None:
                    continue
                before = (activity_before or {}).get(res.key)
                tested = any(
                    f"Tested {res.ns.name}/{res.name}:" in self.log_since_deleted(op, res) for op in alive
                )
                if tested or (before is not None and self.activity(res) > before):
                    record.ghost_resources += 1
        for op in operators:
            record.unexpected_errors += op.log().count("Unexpected error while reconciling")


def _seconds(duration: str) -> float:
    total = 0.0
    number = ""
    for ch in duration:
        if ch.isdigit():
            number += ch
        else:
            total += int(number) * {"h": 3600, "m": 60, "s": 1}[ch]
            number = ""
    return total


def paused_tests(op: OperatorProcess, resources: Sequence[Res]) -> int:
    """Tests the operator logged while kopf had it paused (a standby must not test)."""
    count = 0
    paused = any(a.startswith("--peering") for a in op.args)  # kopf starts a peer paused
    for line in op.log().splitlines():
        if "Pausing operations in favour of" in line:
            paused = True
        elif "Resuming operations after the pause" in line:
            paused = False
        elif paused and any(f"Tested {r.ns.name}/{r.name}:" in line for r in resources):
            count += 1
    return count


# ------------------------------------------------------------------------------------------ scenarios


def _settle(world: World, size: Size) -> None:
    time.sleep(size.quiet)


def _created_and_ready(world: World, resources: Sequence[Res], size: Size, what: str) -> None:
    took = world.wait_converged(resources, size.converge)
    if took is None:
        raise AssertionError(f"{what}: the resources did not become Ready before any fault")


def scenario_apiserver_restart(world: World, size: Size) -> Record:
    record = Record("API-server restart mid-pass")
    with world.proxy("apiserver") as proxy:
        op = world.operator(proxy, "apiserver")
        ns = world.namespace("apiserver")
        resources = world.create_many(ns, size.resources)
        _created_and_ready(world, resources, size, record.fault)
        for res in resources:  # passes in flight when the API server goes
            world.change_spec(res)
        world.cp.restart_apiserver()
        lifted = time.monotonic()
        for res in resources[::2]:  # changes right after it is back
            world.change_spec(res)
        record.converge_seconds = world.wait_converged(resources, size.converge)
        if record.converge_seconds is not None:
            record.converge_seconds = time.monotonic() - lifted
        record.injected = "1 restart"
        _settle(world, size)
        world.count(record, resources, [op])
    return record


def scenario_etcd_restart(world: World, size: Size) -> Record:
    record = Record("etcd restart")
    with world.proxy("etcd") as proxy:
        op = world.operator(proxy, "etcd")
        ns = world.namespace("etcd")
        resources = world.create_many(ns, size.resources)
        _created_and_ready(world, resources, size, record.fault)
        for res in resources:
            world.change_spec(res)
        world.cp.restart_etcd(down=size.etcd_down)
        lifted = time.monotonic()
        for res in resources[1::2]:
            world.rotate_secret(res)
        took = world.wait_converged(resources, size.converge)
        record.converge_seconds = None if took is None else time.monotonic() - lifted
        record.injected = f"1 restart, etcd down {size.etcd_down:.0f} s"
        _settle(world, size)
        world.count(record, resources, [op])
    return record


def scenario_watch_gone(world: World, size: Size) -> Record:
    """Watch events stop (a partition), resources are deleted and changed, then the watch ends with
    410 Gone: the operator must re-list and drop what the list no longer has."""
    record = Record("watch ended with 410 while resources are deleted")
    with world.proxy("gone") as proxy:
        op = world.operator(proxy, "gone")
        ns = world.namespace("gone")
        resources = world.create_many(ns, max(size.resources, 4))
        _created_and_ready(world, resources, size, record.fault)
        drop = proxy.inject("WATCH", PLURAL, action="drop-events")
        doomed, changed = resources[::2], resources[1::2]
        before = {r.key: world.activity(r) for r in doomed}
        for res in doomed:
            world.delete(res, [op])
        for res in changed:
            world.change_spec(res)
        proxy.wait_for(lambda: drop.injected >= len(doomed) + len(changed), timeout=30)
        drop.remove()
        ended = proxy.end_watches(PLURAL, how="gone")
        lifted = time.monotonic()
        took = world.wait_converged(resources, size.converge)
        record.converge_seconds = None if took is None else time.monotonic() - lifted
        # The series of the deleted ones must go too: part of converging.
        deadline = time.monotonic() + size.converge / 2
        while world.series(op) & {r.key for r in doomed} and time.monotonic() < deadline:
            time.sleep(0.5)
        record.injected = f"{drop.injected} watch events dropped, {ended} watch(es) ended with 410"
        _settle(world, size)
        world.count(record, resources, [op], activity_before=before)
    return record


def scenario_status_patch_failing(world: World, size: Size) -> Record:
    """Every status write fails for a while (500, 403, 409, a black hole, a reset: one kind per
    resource) while the resources are tested for the first time and alarmed."""
    record = Record(f"status patch failing for {size.outage:.0f} s")
    with world.proxy("patch") as proxy:
        op = world.operator(proxy, "patch")
        ns = world.namespace("patch")
        kinds: list[tuple[str, int]] = [
            ("status", 500),
            ("status", 403),
            ("status", 409),
            ("stall", 0),
            ("reset", 0),
        ]
        count = max(size.resources, len(kinds))
        names = [f"mail-{i}" for i in range(count)]
        rules = []
        for i, name in enumerate(names):
            action, code = kinds[i % len(kinds)]
            rules.append(
                proxy.inject(
                    "PATCH",
                    PLURAL,
                    subresource="status",
                    namespace=ns.name,
                    name=name,
                    action=action,
                    code=code,  # type: ignore[arg-type]
                )
            )
        start = time.monotonic()
        resources = world.create_many(ns, count)
        time.sleep(max(0.0, size.outage - (time.monotonic() - start)))
        for rule in rules:
            rule.remove()
        lifted = time.monotonic()
        took = world.wait_converged(resources, size.converge)
        record.converge_seconds = None if took is None else time.monotonic() - lifted
        record.injected = (
            f"{sum(r.injected for r in rules)} failed status writes "
            f"({', '.join(sorted({f'{a} {c}' if c else a for a, c in kinds}))})"
        )
        _settle(world, size)
        world.count(record, resources, [op])
    return record


def scenario_operator_sigkill(world: World, size: Size) -> Record:
    """SIGKILL while every pass is stuck writing its status (after its test and alarm), then a restart."""
    record = Record("operator SIGKILL mid-pass and restart")
    with world.proxy("kill") as proxy:
        op = world.operator(proxy, "kill")
        ns = world.namespace("kill")
        stall = proxy.inject("PATCH", PLURAL, subresource="status", namespace=ns.name, action="stall")
        resources = world.create_many(ns, size.resources)
        # Mid-pass: each pass has either mailed and is writing, or is still testing.
        wait_until(
            lambda: stall.injected >= len(resources) or all(world.test_messages(r) for r in resources),
            timeout=size.converge,
            what="every pass to reach its status write",
        )
        time.sleep(1.0)
        op.kill()
        stall.remove()
        for res in resources[::2]:  # changes while no operator runs
            world.change_spec(res)
        op.start(timeout=90)
        lifted = time.monotonic()
        took = world.wait_converged(resources, size.converge)
        record.converge_seconds = None if took is None else time.monotonic() - lifted
        record.injected = f"1 SIGKILL with {stall.injected} status writes in flight"
        _settle(world, size)
        world.count(record, resources, [op])
    return record


def _paused(op: OperatorProcess) -> bool:
    """Whether kopf has the operator paused now (a peer starts paused until it knows its peers)."""
    log = op.current_log()
    resumed = log.rfind("Resuming operations after the pause")
    return resumed == -1 or log.rfind("Pausing operations in favour of") > resumed


def scenario_failover_active_killed(world: World, size: Size) -> Record:
    record = Record("fail-over: the active replica SIGKILLed")
    with world.proxy("failover") as proxy:
        active = world.operator(proxy, "failover-a", f"--peering={PEERING}", "--priority=200")
        standby = world.operator(proxy, "failover-b", f"--peering={PEERING}", "--priority=100")
        wait_until(lambda: _paused(standby), timeout=60, what="the standby to pause")
        ns = world.namespace("failover")
        resources = world.create_many(ns, size.resources)
        _created_and_ready(world, resources, size, record.fault)
        for res in resources:
            world.change_spec(res)
        active.kill()
        killed = time.monotonic()
        for res in resources[::2]:
            world.change_spec(res)
        took = world.wait_converged(resources, size.converge + 90)  # + kopf's 60 s peering lifetime
        record.converge_seconds = None if took is None else time.monotonic() - killed
        record.injected = "1 SIGKILL of the active replica"
        _settle(world, size)
        world.count(record, resources, [active, standby])
        record.duplicate_tests += paused_tests(standby, resources)
    return record


def scenario_failover_peer_joins(world: World, size: Size) -> Record:
    """A replica of higher priority joins: the one that was active pauses, and must stop testing."""
    record = Record("fail-over: a peer of higher priority joins")
    with world.proxy("join") as proxy:
        first = world.operator(proxy, "join-a", f"--peering={PEERING}", "--priority=100")
        ns = world.namespace("join")
        resources = world.create_many(ns, size.resources, recheck="1m")
        _created_and_ready(world, resources, size, record.fault)
        second = world.operator(proxy, "join-b", f"--peering={PEERING}", "--priority=200")
        joined = time.monotonic()
        wait_until(lambda: _paused(first), timeout=60, what="the first replica to pause")
        for res in resources[::2]:
            world.change_spec(res)
        took = world.wait_converged(resources, size.converge)
        record.converge_seconds = None if took is None else time.monotonic() - joined
        # The first replica's timers for the 1m rechecks fall due meanwhile: only the active replica
        # may test.
        time.sleep(max(0.0, size.join_window - (time.monotonic() - resources[0].created_at)))
        record.injected = "1 peer joined"
        _settle(world, size)
        world.count(record, resources, [first, second], seconds=time.monotonic() - resources[0].created_at)
        record.duplicate_tests += paused_tests(first, resources)
    return record


def scenario_blackholed_peers(world: World, size: Size) -> Record:
    """Some resources' identity provider and SMTP server accept connections and never answer; the
    healthy resources' time to Ready is measured without and with them."""
    record = Record("black-holed identity provider and SMTP server for some resources")
    with (
        world.proxy("blackhole") as proxy,
        SilentServer(hold=300) as idp_hole,
        SilentServer(hold=300) as smtp_hole,
    ):
        op = world.operator(proxy, "blackhole", f"--workers={size.workers}")
        baseline_ns = world.namespace("healthy-alone")
        baseline = world.create_many(baseline_ns, size.healthy, prefix="healthy")
        start = min(r.created_at for r in baseline)
        if world.wait_converged(baseline, size.converge) is None:
            raise AssertionError("the healthy resources did not become Ready without faults")
        alone = time.monotonic() - start
        sick_ns = world.namespace("sick")
        sick = world.create_many(
            sick_ns,
            size.sick_idp,
            prefix="idp",
            **{
                "identity.authorityHost": f"https://127.0.0.1:{idp_hole.port}",
                "identity.timeoutSeconds": 120,
            },
        )
        sick += world.create_many(
            sick_ns,
            size.sick_smtp,
            prefix="smtp",
            **{"smtp.port": smtp_hole.port, "smtp.connectionTimeoutSeconds": 120},
        )
        # However many of them the operator lets at the black holes at once (a bounded pool may hold
        # some back; a starved one may not reach its SMTP server at all), the healthy ones come once
        # the identity provider's hole holds a connection.
        wait_until(
            lambda: idp_hole.connections >= 1, timeout=60, what="a resource stuck on the IdP's black hole"
        )
        time.sleep(2.0)
        healthy_ns = world.namespace("healthy-sick")
        healthy = world.create_many(healthy_ns, size.healthy, prefix="healthy")
        start = min(r.created_at for r in healthy)
        took = world.wait_converged(healthy, size.converge)
        record.converge_seconds = None if took is None else time.monotonic() - start
        with_sick = record.converge_seconds
        record.injected = (
            f"{size.sick_idp} resources on a black-holed IdP, {size.sick_smtp} on a black-holed SMTP server "
            f"({idp_hole.connections + smtp_hole.connections} connections held)"
        )
        if with_sick is not None:
            ratio = with_sick / alone
            record.notes.append(
                f"healthy time to Ready: {alone:.2f} s alone, {with_sick:.2f} s beside the black holes "
                f"(ratio {ratio:.2f}, target <= 1.2)"
            )
        _settle(world, size)
        world.count(record, [*baseline, *healthy], [op])
        stuck_ready = [
            r.name
            for r in sick
            if (obj := world.objects([sick_ns.name]).get(r.key))
            and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (obj.get("status") or {}).get("conditions") or []
            )
        ]
        if stuck_ready:
            record.notes.append(f"black-holed resources reported Ready: {stuck_ready}")
            record.lost_changes += len(stuck_ready)
    return record


def scenario_secret_deleted_and_rotated(world: World, size: Size) -> Record:
    """Secrets are deleted or rotated while the Secret watch drops its events, which then ends with 410:
    half of the resources have a pass in flight (a recheck), half are idle, so that only the re-list can
    tell them. The deleted Secrets then come back with a new value."""
    record = Record("Secret deleted and rotated mid-pass")
    with world.proxy("secret") as proxy:
        op = world.operator(proxy, "secret")
        ns = world.namespace("secret")
        resources = world.create_many(ns, max(size.resources, 6))
        _created_and_ready(world, resources, size, record.fault)
        busy = resources[: len(resources) // 2]
        drop = proxy.inject("WATCH", "secrets", action="drop-events")
        for i, res in enumerate(busy):
            world.recheck(res, f"r{i}")
        deleted, rotated = resources[::2], resources[1::2]
        for res in deleted:
            world.delete_secret(res)
        for res in rotated:
            world.rotate_secret(res)
        proxy.wait_for(lambda: drop.injected >= len(resources), timeout=30)
        time.sleep(1.0)  # the last of the dropped events
        drop.remove()
        ended = proxy.end_watches("secrets", how="gone")
        lifted = time.monotonic()
        # The deleted ones must say SecretNotFound, the rotated ones show their new date.
        if world.wait_converged(resources, size.converge) is None:
            record.lost_changes += world.lost_changes(resources)
        for res in deleted:
            world.rotate_secret(res)  # comes back with a new value
        took = world.wait_converged(resources, size.converge)
        record.converge_seconds = None if took is None else time.monotonic() - lifted
        record.injected = (
            f"{len(deleted)} Secrets deleted, {len(rotated)} rotated ({len(busy)} resources mid-pass); "
            f"{drop.injected} Secret watch events dropped, {ended} watch(es) ended with 410"
        )
        _settle(world, size)
        world.count(record, resources, [op])
    return record


SCENARIOS: dict[str, Callable[[World, Size], Record]] = {
    "apiserver-restart": scenario_apiserver_restart,
    "etcd-restart": scenario_etcd_restart,
    "watch-gone": scenario_watch_gone,
    "status-patch-failing": scenario_status_patch_failing,
    "operator-sigkill": scenario_operator_sigkill,
    "failover-active-killed": scenario_failover_active_killed,
    "failover-peer-joins": scenario_failover_peer_joins,
    "blackholed-peers": scenario_blackholed_peers,
    "secret-deleted-rotated": scenario_secret_deleted_and_rotated,
}


# ------------------------------------------------------------------------------------------ report


def table(records: Sequence[Record]) -> str:
    head = (
        "| Fault | Injected | Time to converge | Duplicate alarm e-mails | Duplicate test messages "
        "| Lost spec/Secret changes | Ghost resources | Ghost metric series | Unexpected errors |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in records:
        took = f"{r.converge_seconds:.1f} s" if r.converge_seconds is not None else "**not converged**"
        rows.append(
            f"| {r.fault} | {r.injected} | {took} | {r.duplicate_alarms} | {r.duplicate_tests} "
            f"| {r.lost_changes} | {r.ghost_resources} | {r.ghost_series} | {r.unexpected_errors} |"
        )
    notes = [f"- {r.fault}: {n}" for r in records for n in r.notes]
    return head + "\n".join(rows) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


@contextlib.contextmanager
def world(workdir: Path, log: Callable[[str], None] = print) -> Iterator[World]:
    """A control plane and stand-ins of its own (restarts must not disturb anything else)."""
    bin_dir = ensure_tools(["all"])
    with (
        ControlPlane(bin_dir) as cp,
        DevServers(workdir / "devservers", client_secret=f"e2e~{secrets.token_urlsafe(30)}") as servers,
    ):
        w = World(cp, Dev(servers, "unused"), workdir, log)
        w.setup()
        yield w


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full run (longer outages, more resources)")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only this scenario")
    parser.add_argument("--write", default=None, help="write the table to this Markdown file")
    args = parser.parse_args(argv)
    size = FULL if args.full else CI
    names = args.only or list(SCENARIOS)
    records = []
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="smtpoauth-faults-"))
    print(f"logs in {tmp}", flush=True)
    with world(tmp) as w:
        for name in names:
            print(f"== {name}", flush=True)
            t0 = time.monotonic()
            try:
                record = SCENARIOS[name](w, size)
            except AssertionError as exc:
                record = Record(name, notes=[f"aborted: {exc}"])
            print(f"   {record} ({time.monotonic() - t0:.0f} s)", flush=True)
            records.append(record)
    text = table(records)
    print(text)
    if args.write:
        command = "python -m e2e.faults" + (" --full" if args.full else "")
        command += "".join(f" --only {n}" for n in args.only or ())
        _write_report(Path(args.write), text, command, size, time.monotonic() - started)
    return 0 if not any(r.problems() for r in records) else 1


def _write_report(path: Path, text: str, command: str, size: Size, seconds: float) -> None:
    marker = "<!-- fault table -->"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"{marker}\nMeasured {stamp} with `{command}` (size {size.name}: {size.resources} resources per "
        f"scenario, {size.outage:.0f} s status-patch outage, {size.sick_idp}+{size.sick_smtp} black-holed "
        f"resources, {size.healthy} healthy ones timed; {seconds / 60:.0f} min in all):\n\n{text}{marker}\n"
    )
    old = path.read_text() if path.exists() else ""
    if old.count(marker) >= 2:
        before, _, rest = old.partition(marker)
        _, _, after = rest.partition(marker)
        new = before + block + after.lstrip("\n")
    else:
        new = old + ("\n" if old else "") + block
    path.write_text(new)


if __name__ == "__main__":
    sys.exit(main())
