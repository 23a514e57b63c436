"""``python -m e2e.bench relay``: the SMTP relay side by side with the floor and email-oauth2-proxy.

Against the same local Entra ID and Exchange stand-ins (e2e/bench/peers.py, a process of their own),
one load generator (e2e/bench/relay_load.py, a process of its own) sends 100 KB messages over a new
connection each, with 1, 8 and 32 concurrent clients, to:

(a) floor — the Exchange stand-in directly, AUTH XOAUTH2 with a token fetched once;
(b) relay — ``smtp-oauth-operator relay -f`` (STARTTLS + AUTH PLAIN in, XOAUTH2 out);
(c) peer  — email-oauth2-proxy (``emailproxy`` on PyPI, client-credentials flow, local STARTTLS), when
    installed (``pip install -e '.[bench]'``; ``make bench-relay`` does it).

It prints a Markdown table (messages/s, p50/p99 latency, latency added over the floor, errors) and the
relay's CPU seconds per message and RSS, read from /proc, and how many token requests the relay made.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from e2e.bench.world import REPO_ROOT, Peers, _pythonpath, new_app

from smtp_oauth_operator.testing.pki import CertificateAuthority

RELAY_USER = "bench-relay"
RELAY_PASSWORD = "bench~relay-password-0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened: {log.read_text(errors='replace')[-2000:]}")


def _cpu_rss(pid: int) -> tuple[float, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return cpu, rss


def _relay_manifests(peers: Peers, app: Any, path: Path) -> None:
    e = peers.endpoints
    ca = {"configMapKeyRef": {"name": "trust", "key": "ca.pem"}}
    docs = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "trust", "namespace": "bench"},
         "data": {"ca.pem": peers.ca_pem}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "exo-app", "namespace": "bench"},
         "stringData": {"client-secret": app.secret}},
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
         "metadata": {"name": "relay-login", "namespace": "bench"},
         "stringData": {"username": RELAY_USER, "password": RELAY_PASSWORD}},
        {"apiVersion": "smtpoauth.dev/v1alpha1", "kind": "SmtpOAuthConfig",
         "metadata": {"name": "bench", "namespace": "bench"},
         "spec": {
             "username": e["mailbox"],
             "smtp": {"host": e["smtp_host"], "port": e["smtp_port"], "caBundle": ca},
             "identity": {"tenantId": e["tenant_id"], "clientId": app.client_id,
                          "authorityHost": e["authority_host"], "caBundle": ca,
                          "clientSecret": {"secretKeyRef": {"name": "exo-app", "key": "client-secret"}}},
             "relay": {"enabled": True, "credentialsSecretRef": {"name": "relay-login"},
                       "messagesPerMinute": 10000, "recipientsPerDay": 1000000},
         }},
    ]  # fmt: skip
    path.write_text(yaml.safe_dump_all(docs))


def _peer_config(peers: Peers, app: Any, port: int, cert: Any, path: Path) -> None:
    e = peers.endpoints
    path.write_text(
        "\n".join(
            [
                f"[SMTP-{port}]",
                "local_address = 127.0.0.1",
                f"server_address = {e['smtp_host']}",
                f"server_port = {e['smtp_port']}",
                "server_starttls = True",
                "local_starttls = True",
                f"local_certificate_path = {cert.cert_file}",
                f"local_key_path = {cert.key_file}",
                "",
                f"[{e['mailbox']}]",
                f"token_url = {e['authority_host']}/{e['tenant_id']}/oauth2/v2.0/token",
                f"oauth2_scope = {e['scope']}",
                "oauth2_flow = client_credentials",
                f"client_id = {app.client_id}",
                f"client_secret = {app.secret}",
                "",
            ]
        )
    )


def _load(job: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "e2e.bench.relay_load"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": _pythonpath()},
        timeout=600,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.bench relay", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per point")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument("--size", type=int, default=100 * 1024, help="message size in bytes")
    parser.add_argument("--out", type=Path, default=None, help="write the raw results here (JSON)")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    peers = Peers(tmp)
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, dict[int, dict[str, Any]]] = {}
    notes: dict[str, Any] = {}
    try:
        # One app registration each, so that the relay's token requests are counted apart.
        app, floor_app, peer_app = new_app(peers), new_app(peers), new_app(peers)
        e = peers.endpoints
        local = CertificateAuthority.create("relay bench local CA", directory=tmp / "local").issue(
            "127.0.0.1", "localhost", directory=tmp / "local"
        )
        base = {
            "size": args.size,
            "seconds": args.seconds,
            "sender": e["mailbox"],
            "to": "ops@contoso.com",
            "upstream_ca": e["ca_file"],
            "authority_host": e["authority_host"],
            "tenant_id": e["tenant_id"],
            "client_id": floor_app.client_id,
            "client_secret": floor_app.secret,
            "scope": e["scope"],
        }

        # (b) the relay
        manifests = tmp / "relay.yaml"
        _relay_manifests(peers, app, manifests)
        relay_port = _free_port()
        relay_log = tmp / "relay.log"
        with relay_log.open("wb") as log:
            relay = subprocess.Popen(
                [sys.executable, "-m", "smtp_oauth_operator.cli", "relay", "-f", str(manifests),
                 "--listen", "127.0.0.1", "--port", str(relay_port), "--tls-cert", str(local.cert_file),
                 "--tls-key", str(local.key_file), "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": _pythonpath()},
            )  # fmt: skip
        procs.append(relay)
        _wait_port(relay_port, relay, relay_log)

        # (c) email-oauth2-proxy
        peer_port: int | None = None
        if importlib.util.find_spec("emailproxy") is not None:
            peer_port = _free_port()
            config = tmp / "emailproxy.config"
            _peer_config(peers, peer_app, peer_port, local, config)
            peer_log = tmp / "emailproxy.log"
            with peer_log.open("wb") as log:
                peer = subprocess.Popen(
                    [sys.executable, "-m", "emailproxy", "--no-gui", "--config-file", str(config),
                     "--cache-store", str(tmp / "emailproxy.cache")],
                    stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
                    env={**os.environ, "SSL_CERT_FILE": e["ca_file"]},
                )  # fmt: skip
            procs.append(peer)
            _wait_port(peer_port, peer, peer_log)
        else:
            notes["peer"] = "emailproxy is not installed (pip install -e '.[bench]')"

        modes: list[tuple[str, dict[str, Any]]] = [
            ("floor", {"mode": "floor", "port": e["smtp_port"], "ca_file": e["ca_file"]}),
            ("relay", {"mode": "login", "port": relay_port, "ca_file": str(local.ca_file),
                       "username": RELAY_USER, "password": RELAY_PASSWORD}),
        ]  # fmt: skip
        if peer_port is not None:
            modes.append(
                (
                    "peer",
                    {
                        "mode": "login",
                        "port": peer_port,
                        "ca_file": str(local.ca_file),
                        "username": e["mailbox"],
                        "password": "bench-peer-password",
                    },
                )
            )
        tokens_before = peers.counters()["token_requests_by_client"].get(app.client_id, 0)
        for name, mode in modes:
            results[name] = {}
            for clients in levels:
                cpu0, _ = _cpu_rss(relay.pid)
                result = _load({**base, **mode, "clients": clients})
                cpu1, rss = _cpu_rss(relay.pid)
                if name == "relay":
                    result["relay_cpu_per_message"] = (cpu1 - cpu0) / max(result["sent"], 1)
                    result["relay_rss"] = rss
                results[name][clients] = result
                print(f"{name:6} {clients:3} clients: {result['sent'] / result['seconds']:.1f}/s, "
                      f"{len(result['errors'])} errors", file=sys.stderr)  # fmt: skip
        notes["relay_token_requests"] = (
            peers.counters()["token_requests_by_client"].get(app.client_id, 0) - tokens_before
        )
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        peers.stop()

    print(_table(results, levels, notes))
    if args.out:
        args.out.write_text(json.dumps({"results": results, "notes": notes}, indent=1))
    return 0


def _table(results: dict[str, dict[int, dict[str, Any]]], levels: list[int], notes: dict[str, Any]) -> str:
    floor = results.get("floor", {})
    lines = [
        "| target | clients | messages/s | x floor | p50 ms | p99 ms | p50 added | p99 added | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("floor", "relay", "peer"):
        for clients in levels:
            r = results.get(name, {}).get(clients)
            if r is None:
                continue
            rate = r["sent"] / r["seconds"]
            f = floor.get(clients)
            f_rate = f["sent"] / f["seconds"] if f else float("nan")
            p50, p99 = _pct(r["latencies"], 0.5) * 1000, _pct(r["latencies"], 0.99) * 1000
            f50 = _pct(f["latencies"], 0.5) * 1000 if f else float("nan")
            f99 = _pct(f["latencies"], 0.99) * 1000 if f else float("nan")
            lines.append(
                f"| {name} | {clients} | {rate:.1f} | {rate / f_rate:.2f} | {p50:.0f} | {p99:.0f} | "
                f"{p50 - f50:+.0f} | {p99 - f99:+.0f} | {len(r['errors'])} |"
            )
    relay = results.get("relay", {})
    if relay:
        cpu = statistics.mean(r["relay_cpu_per_message"] for r in relay.values()) * 1000
        rss = max(r["relay_rss"] for r in relay.values()) / 2**20
        lines.append("")
        lines.append(f"Relay: {cpu:.1f} ms CPU per message (mean over the points), peak RSS {rss:.0f} MiB, "
                     f"{notes.get('relay_token_requests')} token request(s) during the runs.")  # fmt: skip
    if "peer" in notes:
        lines.append(f"Peer: {notes['peer']}.")
    return "\n".join(lines)
