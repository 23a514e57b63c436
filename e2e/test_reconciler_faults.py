"""The reconciler under faults on the real control plane (issue 10, defects 4 and 6).

The operator runs as a process with a TokenRequest token of a ServiceAccount in the test's namespace
(``run -n <namespace>``), bound to a Role holding the chart's rules (charts/.../_helpers.tpl
``namespacedRules``) minus what a test takes away.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from e2e.controlplane import REPO_ROOT, ControlPlane, free_port
from e2e.fixtures import Dev, Namespace, new_namespace, ns_name, own_control_plane, wait_until

pytestmark = pytest.mark.e2e

ADMIN = "admin@contoso.com"
OPS = "ops@contoso.com"
STATUS_PATCH = {"apiGroups": ["smtpoauth.dev"], "resources": ["smtpoauthconfigs/status"], "verbs": ["patch"]}
# The operator from the interpreter running the tests (not a fixed .venv), this checkout's sources first.
OPERATOR = (sys.executable, "-c", "import sys; from smtp_oauth_operator.cli import main; sys.exit(main())")
RULES: list[dict[str, Any]] = [
    {"apiGroups": ["smtpoauth.dev"], "resources": ["smtpoauthconfigs"], "verbs": ["list", "watch"]},
    STATUS_PATCH,
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]


class Operator:
    """``smtp-oauth-operator run -n <ns>`` as the ServiceAccount ``operator`` of that namespace."""

    def __init__(self, cp: ControlPlane, ns: Namespace, tmp: Path) -> None:
        token = cp.token_for(ns.name, "operator", duration=3600)
        kubeconfig = cp.kubeconfig_for_token(token, tmp / "operator.kubeconfig")
        self.health_port = free_port()
        self.log_path = tmp / "operator.log"
        env = {k: v for k, v in cp.env(kubeconfig).items() if k not in {"HTTPS_PROXY", "https_proxy"}}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT / "operator" / "src"), env.get("PYTHONPATH")) if p
        )
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    *OPERATOR,
                    "run",
                    "-n",
                    ns.name,
                    "--log-format=full",
                    f"--liveness=http://127.0.0.1:{self.health_port}/healthz",
                ],
                env=env,
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(lambda: self.healthz() == 200, timeout=60, what=f"/healthz 200:\n{self.log[-3000:]}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def healthz(self, timeout: float = 3.0) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=timeout) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0  # no answer: what the kubelet counts as a failure too

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def plane(k8s_bin_dir: Path) -> Iterator[ControlPlane]:
    # Not the session's plane: its `-A` operator would test (and alarm) these resources too.
    with own_control_plane(k8s_bin_dir) as cp:
        yield cp


@pytest.fixture
def ns(plane: ControlPlane, dev: Dev, request: pytest.FixtureRequest) -> Namespace:
    return new_namespace(plane, dev, ns_name(request))


@pytest.fixture
def operator_as_sa(plane: ControlPlane, ns: Namespace, tmp_path: Path) -> Any:
    started: list[Operator] = []

    def start(rules: list[dict[str, Any]]) -> Operator:
        ns.apply(
            [
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "operator"}},
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "Role",
                    "metadata": {"name": "operator"},
                    "rules": rules,
                },
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": "operator"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "operator"},
                    "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns.name}],
                },
            ]
        )
        operator = Operator(plane, ns, tmp_path)
        started.append(operator)
        return operator

    yield start
    for operator in started:
        operator.stop()
        print(f"operator log: {operator.log_path}")


def test_a_forbidden_status_write_sends_nothing_until_allowed_then_each_e_mail_once(
    ns: Namespace, dev: Dev, operator_as_sa: Any
) -> None:
    operator: Operator = operator_as_sa([r for r in RULES if r is not STATUS_PATCH])
    app = dev.new_app()
    ns.secret(app.secret)
    spec = dev.spec(app, alarms={"notify": {"to": [ADMIN]}}, testMessage={"to": OPS})
    expires = (datetime.now(UTC) + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    spec["identity"]["clientSecret"]["expiresAt"] = expires
    # recheckInterval stays 1h: with no status written, every re-evaluation would test (no
    # lastTestTime) and alarm (no lastAlarm) again, which v0.1 did every 60 s.
    ns.smtp_oauth_config("mail", spec)

    def mails() -> tuple[int, int]:
        messages = dev.messages(app)
        return (
            sum(1 for m in messages if ADMIN in m.rcpt_tos),
            sum(1 for m in messages if OPS in m.rcpt_tos),
        )

    # At most once, across restarts too: nothing is sent before the status announcing it is written.
    wait_until(
        lambda: "Could not write the status of" in operator.log,
        timeout=60,
        what=f"the first status write:\n{operator.log[-3000:]}",
    )
    first = time.monotonic()
    while time.monotonic() - first < 90:
        assert mails() == (0, 0), f"an e-mail was sent before its intent was written\n{operator.log[-3000:]}"
        assert operator.proc.poll() is None, operator.log[-3000:]
        time.sleep(1)
    assert "status" not in ns.config("mail"), "the status patch was expected to be forbidden"
    log = operator.log
    troubles = [line for line in log.splitlines() if "Could not write the status of" in line]
    assert 2 <= len(troubles) <= 5, troubles  # backing off: 15, 30, 60 s (~ ±10 %) after the pass
    assert all("403" in line for line in troubles), troubles
    assert "Traceback" not in log

    # The permission comes back: the test message and the alarm e-mail go out, each exactly once.
    ns.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
              "metadata": {"name": "operator"}, "rules": RULES})  # fmt: skip
    wait_until(
        lambda: (ns.config("mail").get("status") or {}).get("lastAlarm", {}).get("notified") is True,
        timeout=150,
        what=f"the status to be written:\n{operator.log[-3000:]}",
    )
    status = ns.config("mail")["status"]
    assert status["lastAlarm"]["type"] == "ClientSecretExpiringSoon"
    assert "sending" not in status["lastAlarm"]
    assert "testMessageTrigger" not in status
    assert ns.count_events("mail", "ClientSecretExpiringSoon") == 1
    time.sleep(5)
    assert mails() == (1, 1)


def test_a_stalled_event_loop_fails_healthz(ns: Namespace, operator_as_sa: Any) -> None:
    operator: Operator = operator_as_sa(RULES)
    assert operator.healthz() == 200
    # SIGSTOP: the process's loop runs nothing, exactly as if a callback blocked it.
    os.kill(operator.proc.pid, signal.SIGSTOP)
    try:
        stalled = time.monotonic()
        assert operator.healthz(timeout=2) == 0, "a stopped loop cannot answer"
        time.sleep(max(0.0, 33 - (time.monotonic() - stalled)))  # beyond the 30 s the loop may lag
    finally:
        os.kill(operator.proc.pid, signal.SIGCONT)
    # kopf serves a probe handler's exception as 500 (a False return would be a 200). The probe
    # sent while the process was stopped is answered first; this one must fail too.
    assert operator.healthz(timeout=10) == 500, operator.log[-3000:]
    assert "the event loop stalled for" in operator.log
    # For 30 s (kopf caches a probe result for 10 s), then a loop that runs again is healthy again.
    wait_until(lambda: operator.healthz() == 200, timeout=60, what="/healthz 200 again")
    with contextlib.suppress(ProcessLookupError):
        assert operator.proc.poll() is None
