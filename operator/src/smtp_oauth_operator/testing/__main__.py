"""``python -m smtp_oauth_operator.testing serve``: the fake Entra ID + Exchange as a process.

Why: the demo and the benchmark run the operator as a separate process (or in a cluster) and
need the fake cloud to outlive a single Python test. This entry point starts
:class:`~smtp_oauth_operator.testing.devservers.DevServers`, writes ``ca.pem`` and
``endpoints.json`` to ``--state-dir``, prints one line and serves until SIGTERM/SIGINT.

The client secret comes from ``--client-secret``, from ``--client-secret-file`` (read; or, if
the file does not exist yet, generated and written there with mode 0600) or from the
``SMTP_OAUTH_DEV_CLIENT_SECRET`` environment variable. It is never printed and never written
anywhere else.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from smtp_oauth_operator.testing.devservers import (
    DEFAULT_CLIENT_ID,
    DEFAULT_MAILBOX,
    DEFAULT_TENANT_ID,
    DevServers,
)

__all__ = ["main"]

SECRET_ENV = "SMTP_OAUTH_DEV_CLIENT_SECRET"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smtp_oauth_operator.testing",
        description="Local fake Entra ID and Exchange Online SMTP servers for tests and demos.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve until SIGTERM/SIGINT")
    serve.add_argument("--state-dir", required=True, type=Path, help="where ca.pem/endpoints.json go")
    serve.add_argument("--tenant", default=DEFAULT_TENANT_ID, help="tenant ID (GUID)")
    serve.add_argument("--client-id", default=DEFAULT_CLIENT_ID, help="application (client) ID")
    secret = serve.add_mutually_exclusive_group()
    secret.add_argument("--client-secret", help=f"client secret (or set {SECRET_ENV})")
    secret.add_argument(
        "--client-secret-file",
        type=Path,
        help="read the client secret from this file; if it does not exist, generate one into it",
    )
    serve.add_argument(
        "--mailbox",
        action="append",
        dest="mailboxes",
        help=f"mailbox the app may send as (repeatable; default {DEFAULT_MAILBOX})",
    )
    serve.add_argument("--smtp-port", type=int, default=0, help="SMTP port (default: a free one)")
    serve.add_argument("--idp-port", type=int, default=0, help="HTTPS port (default: a free one)")
    serve.add_argument("--token-lifetime", type=int, default=3599, help="expires_in of tokens (s)")
    return parser


def _client_secret(args: argparse.Namespace) -> str | None:
    if args.client_secret:
        return str(args.client_secret)
    path: Path | None = args.client_secret_file
    if path is not None:
        if path.exists():
            return path.read_text(encoding="utf-8").strip() or None
        generated = secrets.token_urlsafe(30)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(generated + "\n")
        return generated
    return os.environ.get(SECRET_ENV) or None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    secret = _client_secret(args)
    if secret is None:
        print(
            f"error: give --client-secret, --client-secret-file or set {SECRET_ENV}",
            file=sys.stderr,
        )
        return 2
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with DevServers(
            args.state_dir,
            client_secret=secret,
            tenant_id=args.tenant,
            client_id=args.client_id,
            mailboxes=args.mailboxes or [DEFAULT_MAILBOX],
            smtp_port=args.smtp_port,
            idp_port=args.idp_port,
            token_lifetime=args.token_lifetime,
        ) as dev:
            print(dev.summary(), flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
