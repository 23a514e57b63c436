"""``python -m e2e.bench memory``: operator RSS with and without many large Secrets nobody references.

Issue 10, defect 9. On a fresh control plane with the local Entra ID and Exchange: one SmtpOAuthConfig
(and its Secret) in one namespace, tested and Ready. The operator's RSS (``/proc/PID/status``: VmRSS
sampled every 100 ms, VmHWM as the kernel's peak) is measured in three phases, each the same length:

1. ``none``: the operator restarted with no other Secrets (start-up, list, watch, idle);
2. ``arriving``: the same process while N Secrets of S KiB are created in another namespace (their
   watch events arrive);
3. ``relist``: the operator restarted with those N Secrets in the cluster (the start-up list).

"steady" is the mean VmRSS over the last ``--window`` seconds of a phase, "peak" the process's VmHWM
at the end of it. Target (issue 10): steady and peak of 2. and 3. within 20 MB of 1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
from e2e.bench import world
from e2e.controlplane import ensure_tools

TARGET_MB = 20.0
MIB = 1024 * 1024


def _log(message: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {message}", flush=True)


class Sampler:
    """VmRSS of one process every 100 ms in a thread, until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []  # (monotonic, KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.samples.append((time.monotonic(), world.memory_kib(self.pid)["VmRSS"]))
            except (OSError, KeyError):
                return

    def finish(self, window: float) -> dict[str, float]:
        peak = world.memory_kib(self.pid)["VmHWM"]
        self._stop.set()
        self._thread.join()
        end = self.samples[-1][0]
        last = [kib for t, kib in self.samples if t >= end - window]
        return {
            "steady_mib": round(statistics.fmean(last) / 1024, 1),
            "peak_mib": round(peak / 1024, 1),
            "max_sampled_mib": round(max(kib for _, kib in self.samples) / 1024, 1),
        }


def _wait_ready(api: kubernetes.client.ApiClient, namespace: str, name: str, timeout: float = 120) -> None:
    custom = kubernetes.client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = custom.get_namespaced_custom_object(world.GROUP, world.VERSION, namespace, world.PLURAL, name)
        if world._is_ready(obj):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{namespace}/{name} not Ready within {timeout:.0f} s")


def _create_bulk(api: kubernetes.client.ApiClient, namespace: str, count: int, size: int) -> float:
    """``count`` Secrets of ``size`` bytes, created as Helm creates its release Secrets (no
    last-applied-configuration annotation); returns the seconds it took."""
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": namespace}})
    started = time.monotonic()

    def create(i: int) -> None:
        blob = base64.b64encode(os.urandom(size)).decode()  # incompressible, like a gzipped Helm release
        core.create_namespaced_secret(
            namespace,
            {
                "metadata": {"name": f"unrelated-{i:05d}", "labels": {"owner": "helm"}},
                "data": {"release": blob},
            },
            _request_timeout=120,
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(count)))
    return time.monotonic() - started


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    bin_dir = ensure_tools()
    cp, _ = world.start_control_plane(bin_dir, out)
    peers: world.Peers | None = None
    operator: world.Operator | None = None
    try:
        peers = world.Peers(out)
        world.install_crd(cp)
        kubeconfig = world.operator_kubeconfig(cp, out)
        api = world.admin_client(cp)
        namespace = "mail"
        world.namespace_with_trust(api, namespace, peers)
        app = world.new_app(peers, "exo-app")
        world.create_secret(api, namespace, app.secret_name, app.secret)
        body = world.config(peers, namespace, "mail", app, "24h")
        kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
            world.GROUP, world.VERSION, namespace, world.PLURAL, body
        )
        log = out / "operator.log"
        operator = world.Operator(kubeconfig, log, workers=8)
        _wait_ready(api, namespace, "mail")
        operator.stop()
        phases: dict[str, Any] = {}
        phase = args.settle + args.window

        _log("phase 1: restart with no other Secrets")
        operator = world.Operator(kubeconfig, log, workers=8)
        sampler = Sampler(operator.pid)
        time.sleep(phase)
        phases["none"] = sampler.finish(args.window)
        _log(f"  {phases['none']}")

        _log(f"phase 2: {args.secrets} Secrets of {args.size_kib} KiB arrive")
        sampler = Sampler(operator.pid)
        took = _create_bulk(api, "unrelated", args.secrets, args.size_kib * 1024)
        _log(f"  created in {took:.0f} s")
        time.sleep(phase)
        phases["arriving"] = sampler.finish(args.window)
        phases["arriving"]["create_seconds"] = round(took, 1)
        _log(f"  {phases['arriving']}")
        operator.stop()

        _log("phase 3: restart with them in the cluster (the re-list)")
        operator = world.Operator(kubeconfig, log, workers=8)
        sampler = Sampler(operator.pid)
        time.sleep(phase)
        phases["relist"] = sampler.finish(args.window)
        _log(f"  {phases['relist']}")
        operator.check()
        return {
            "secrets": args.secrets,
            "size_kib": args.size_kib,
            "window_s": args.window,
            "settle_s": args.settle,
            "phases": phases,
            "load": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        if operator is not None:
            operator.stop()
        if peers is not None:
            peers.stop()
        cp.stop()


def table(results: dict[str, Any]) -> str:
    p = results["phases"]
    none = p["none"]
    lines = [
        f"Operator RSS (MiB), one SmtpOAuthConfig, {results['secrets']} unreferenced Secrets of "
        f"{results['size_kib']} KiB",
        f"{'phase':<34}{'steady':>9}{'peak':>9}{'Δ steady':>11}{'Δ peak':>9}",
    ]
    names = {
        "none": "1. restart, no other Secrets",
        "arriving": "2. while the Secrets are created",
        "relist": "3. restart with them (re-list)",
    }
    verdict = True
    for key, title in names.items():
        d_steady = (p[key]["steady_mib"] - none["steady_mib"]) * MIB / 1e6
        d_peak = (p[key]["peak_mib"] - none["peak_mib"]) * MIB / 1e6
        if key != "none":
            verdict = verdict and abs(d_steady) <= TARGET_MB and d_peak <= TARGET_MB
        lines.append(
            f"{title:<34}{p[key]['steady_mib']:>9.1f}{p[key]['peak_mib']:>9.1f}"
            + ("" if key == "none" else f"{d_steady:>+10.1f}M{d_peak:>+8.1f}M")
        )
    lines.append(f"target: within {TARGET_MB:.0f} MB of phase 1 -> {'met' if verdict else 'MISSED'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--secrets", type=int, default=2000, help="unreferenced Secrets (default 2000)")
    parser.add_argument("--size-kib", type=int, default=256, help="size of each (default 256 KiB)")
    parser.add_argument(
        "--window", type=float, default=30.0, help="steady-state window, seconds (default 30)"
    )
    parser.add_argument("--settle", type=float, default=30.0, help="time before the window (default 30)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default: a temp dir)")
    args = parser.parse_args(argv)
    out = (args.out or Path(tempfile.mkdtemp(prefix="smtp-oauth-bench-memory-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _log(f"memory benchmark -> {out}")
    results = run(args, out)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    (out / "memory.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (out / "memory.txt").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
