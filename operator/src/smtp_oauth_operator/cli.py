"""``smtp-oauth-operator``: the ``check`` command (ISE's Test Connection button) and ``run``.

``check -f FILE…`` reads SmtpOAuthConfig, Secret and ConfigMap manifests, runs the operator's own
connection test for every SmtpOAuthConfig and prints the conditions it would set. Exit codes: 0 all
Ready, 1 any not Ready, 2 unusable input.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import yaml

from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.domain.discovery import describe
from smtp_oauth_operator.domain.objects import SourceObject
from smtp_oauth_operator.domain.reasons import CheckFailed, Reason
from smtp_oauth_operator.domain.spec import GROUP, KIND
from smtp_oauth_operator.services.connection import token_file_reader
from smtp_oauth_operator.services.evaluation import evaluate

__all__ = ["main"]


class InputError(Exception):
    """The manifests cannot be used (exit code 2)."""


# A manifest set is a few objects; anything larger is a mistake (a wrong file, /dev/zero) that would
# otherwise be read whole into memory before YAML could complain.
MAX_INPUT_BYTES = 4 * 1024 * 1024


class ManifestSource:
    """Secrets and ConfigMaps read from manifest files, keyed by (kind, namespace, name)."""

    def __init__(self, objects: Iterable[Mapping[str, Any]], token_file: str | None = None) -> None:
        self._token_file = token_file
        self._objects: dict[tuple[str, str, str], SourceObject] = {}
        for obj in objects:
            kind = obj.get("kind")
            if kind not in {"Secret", "ConfigMap"}:
                continue
            meta = obj.get("metadata") or {}
            key = (str(kind), str(meta.get("namespace") or "default"), str(meta.get("name")))
            kind_type = str(obj.get("type") or "Opaque") if kind == "Secret" else None
            self._objects[key] = SourceObject(_decode(obj, key), meta, type=kind_type)

    async def read(
        self, kind: Literal["Secret", "ConfigMap"], namespace: str, name: str
    ) -> SourceObject | None:
        return self._objects.get((kind, namespace, name))

    def assertion_source(self, namespace: str, service_account: str, audience: str) -> Callable[[], str]:
        """Workload identity offline: the ServiceAccount token from ``--token-file``, re-read on each
        use (``kubectl create token NAME --audience AUDIENCE > FILE``)."""
        if self._token_file is not None:
            return token_file_reader(self._token_file, "--token-file")

        def missing() -> str:
            raise CheckFailed(
                Reason.SERVICE_ACCOUNT_NOT_FOUND,
                f"no token for ServiceAccount {namespace}/{service_account}: pass --token-file with "
                f"the output of kubectl create token {service_account} -n {namespace} --audience {audience}",
            )

        return missing


def _decode(obj: Mapping[str, Any], key: tuple[str, str, str]) -> dict[str, str]:
    data: dict[str, str] = {}
    where = f"{key[0]} {key[1]}/{key[2]}"
    if key[0] == "Secret":
        for k, v in (obj.get("data") or {}).items():
            try:
                data[str(k)] = base64.b64decode(str(v), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise InputError(f"{where}: data.{k} is not base64-encoded UTF-8 text") from None
        data.update({str(k): str(v) for k, v in (obj.get("stringData") or {}).items()})
    else:
        data.update({str(k): str(v) for k, v in (obj.get("data") or {}).items()})
    return data


def _read(path: str) -> str:
    """The text of one file (``-``: standard input), at most MAX_INPUT_BYTES of UTF-8."""
    try:
        if path == "-":
            stream = getattr(sys.stdin, "buffer", None)
            raw = stream.read(MAX_INPUT_BYTES + 1) if stream is not None else sys.stdin.read().encode()
        else:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise InputError(f"{path}: larger than {MAX_INPUT_BYTES // 2**20} MiB; is it really a manifest?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def _string_map(value: Any, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InputError(f"{where} must map strings to strings")


def _validate(obj: Mapping[str, Any], where: str) -> None:
    """What the API server would have refused before the operator saw the object."""
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise InputError(f"{where}: a document has no kind; is it a Kubernetes object?")
    meta = obj.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise InputError(f"{where}: {kind}: metadata must be an object")
    name = meta.get("name")
    if kind in {KIND, "Secret", "ConfigMap"} and (not isinstance(name, str) or not name):
        raise InputError(f"{where}: {kind}: metadata.name must be a non-empty string")
    what = f"{where}: {kind} {name}"
    namespace = meta.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise InputError(f"{what}: metadata.namespace must be a non-empty string")
    generation = meta.get("generation")
    if generation is not None and (
        isinstance(generation, bool) or not isinstance(generation, int) or generation < 0
    ):
        raise InputError(f"{what}: metadata.generation must be a non-negative integer")
    _string_map(meta.get("annotations"), f"{what}: metadata.annotations")
    _string_map(meta.get("labels"), f"{what}: metadata.labels")
    if kind == "Secret":
        _string_map(obj.get("data"), f"{what}: data")
        _string_map(obj.get("stringData"), f"{what}: stringData")
    elif kind == "ConfigMap":
        _string_map(obj.get("data"), f"{what}: data")


def load(paths: Sequence[str]) -> list[Mapping[str, Any]]:
    """Every object in the files; InputError (exit 2) for anything kubectl apply would refuse."""
    if list(paths).count("-") > 1:
        raise InputError("standard input (-f -) can be read only once")
    docs: list[Mapping[str, Any]] = []
    for path in paths:
        text = _read(path)
        try:
            loaded = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML ({_one_line(str(exc))})") from None
        except RecursionError:
            raise InputError(f"{path}: nested too deeply to be a manifest") from None
        for doc in loaded:
            if doc is None:
                continue
            if not isinstance(doc, Mapping):
                raise InputError(f"{path}: a document is not a Kubernetes object")
            if doc.get("kind") == "List":
                items = doc.get("items") or []
                if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
                    raise InputError(f"{path}: List: items must be a list of objects")
                objects = list(items)
            else:
                objects = [doc]
            for obj in objects:
                _validate(obj, path)
                docs.append(obj)
    return docs


def _one_line(text: str) -> str:
    return " ".join(text.split())


async def check(docs: Sequence[Mapping[str, Any]], token_file: str | None = None) -> list[dict[str, Any]]:
    configs = [
        d for d in docs if d.get("kind") == KIND and str(d.get("apiVersion", "")).startswith(f"{GROUP}/")
    ]
    if not configs:
        raise InputError(f"no {KIND} ({GROUP}) found in the files")
    source = ManifestSource(docs, token_file)
    tokens = TokenProvider()
    results = []
    for config in configs:
        meta = dict(config.get("metadata") or {})
        meta.setdefault("namespace", "default")
        meta.setdefault("generation", 1)
        body = {**config, "metadata": meta, "status": {}}
        result = await evaluate(body, source, tokens, now=datetime.now(UTC), force=True)
        ready = result.decision.ready
        results.append(
            {
                "name": meta.get("name"),
                "namespace": meta["namespace"],
                "ready": ready.get("status") == "True",
                "reason": ready.get("reason"),
                "message": ready.get("message"),
                "conditions": [
                    {k: c[k] for k in ("type", "status", "reason", "message")}
                    for c in result.decision.status["conditions"]
                ],
                "tokenEndpoint": result.decision.status.get("tokenEndpoint"),
                "smtpEndpoint": result.decision.status.get("smtpEndpoint"),
                "durationSeconds": result.decision.status.get("lastTestDurationSeconds"),
                "clientCertificate": result.decision.status.get("clientCertificate"),
                **(
                    {"appCredentials": result.decision.status["appCredentials"]}
                    if "appCredentials" in result.decision.status
                    else {}
                ),
                **(
                    {"expiresAt": result.decision.status["clientSecretExpiresAt"]}
                    if "clientSecretExpiresAt" in result.decision.status
                    else {}
                ),
            }
        )
    return results


def _print_text(results: Sequence[Mapping[str, Any]]) -> None:
    for r in results:
        mark = "READY" if r["ready"] else "NOT READY"
        print(f"{r['namespace']}/{r['name']}: {mark} ({r['reason']})")
        print(f"  {r['message']}")
        for c in r["conditions"]:
            print(f"  {c['type']:<19} {c['status']:<8} {c['reason']:<28} {c['message']}")
        if r.get("tokenEndpoint"):
            print(f"  token endpoint: {r['tokenEndpoint']}")
        if r.get("smtpEndpoint"):
            print(f"  SMTP endpoint:  {r['smtpEndpoint']}")
        if r.get("clientCertificate"):
            cert = r["clientCertificate"]
            print(f"  certificate:    SHA-256 {cert['thumbprintSHA256']}, expires {cert['notAfter']}")
        if r.get("appCredentials"):
            print("  app credentials in Microsoft Graph (* in use):")
            for line in describe(r["appCredentials"]).splitlines():
                print(f"    {line}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smtp-oauth-operator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="test SmtpOAuthConfig manifests against the real endpoints")
    chk.add_argument("-f", "--filename", action="append", required=True, help="manifest file (- for stdin)")
    chk.add_argument("-o", "--output", choices=("text", "json"), default="text")
    chk.add_argument(
        "--token-file",
        help="a ServiceAccount token for workload identity (kubectl create token NAME --audience AUDIENCE)",
    )
    run = sub.add_parser(
        "run", help="run the operator (kopf) against the current kubeconfig or in-cluster config"
    )
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", help="watch only this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces (default)")
    run.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)"
    )
    run.add_argument("--workers", type=int, default=8, help="connection tests run at once")
    run.add_argument(
        "--liveness", default=None, help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    run.add_argument(
        "--peering", default=None, help="kopf peering name for a hot standby (default: standalone)"
    )
    run.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority: the highest live replica works, the others wait (default: random)",
    )
    run.add_argument("--log-format", choices=("plain", "full", "json"), default="full")
    run.add_argument("--log-level", choices=("warning", "info", "debug"), default="info")
    _add_relay_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "check":
        try:
            results = asyncio.run(check(load(args.filename), args.token_file))
        except InputError as exc:
            if args.output == "json":
                print(json.dumps({"error": str(exc)}))
            else:
                print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.output == "json":
            print(json.dumps(results, indent=2))
        else:
            _print_text(results)
        if any(r["reason"] == "InvalidSpec" for r in results):
            return 2  # the spec itself is bad input; the result above names the field
        return 0 if all(r["ready"] for r in results) else 1
    if args.command == "run":
        return _run(args)
    if args.command == "relay":
        return _relay(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _run(args: argparse.Namespace) -> int:
    """Translate our flags into kopf's and run it in this process."""
    import os  # noqa: PLC0415 - only the run command needs the environment

    from kopf import cli as kopf_cli  # noqa: PLC0415 - keep `check` free of kopf's start-up cost

    os.environ["SMTPOAUTH_METRICS_PORT"] = str(args.metrics_port)
    os.environ["SMTPOAUTH_WORKERS"] = str(args.workers)
    os.environ["SMTPOAUTH_NAMESPACES"] = ",".join(args.namespace or ())
    kopf_args = ["run", "-m", "smtp_oauth_operator.main", f"--log-format={args.log_format}"]
    if args.namespace:
        for namespace in args.namespace:
            kopf_args += ["--namespace", namespace]
    else:
        kopf_args.append("--all-namespaces")
    kopf_args += [f"--peering={args.peering}"] if args.peering else ["--standalone"]
    if args.priority is not None:
        kopf_args.append(f"--priority={args.priority}")
    if args.liveness:
        kopf_args.append(f"--liveness={args.liveness}")
    # kopf logs at INFO by default; its --verbose means DEBUG (every HTTP request urllib3 makes, every
    # handler call): not what --log-level info asks for.
    if args.log_level == "debug":
        kopf_args.append("--debug")
    elif args.log_level == "warning":
        kopf_args.append("--quiet")
    try:
        kopf_cli.main(args=kopf_args, prog_name="smtp-oauth-operator", standalone_mode=False)
    except KeyboardInterrupt:
        return 0
    return 0


def _add_relay_parser(sub: Any) -> None:
    relay = sub.add_parser(
        "relay",
        help="SMTP relay: accept AUTH PLAIN/LOGIN from apps, submit with XOAUTH2 through Ready configurations",
    )
    relay.add_argument(
        "-f",
        "--filename",
        action="append",
        help="serve the SmtpOAuthConfigs and Secrets in these manifest files (no cluster); "
        "without -f, watch the cluster",
    )
    relay.add_argument("-n", "--namespace", action="append", help="watch only this namespace (repeatable)")
    relay.add_argument("--listen", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")  # noqa: S104
    relay.add_argument(
        "--port", type=int, default=2587, help="STARTTLS port (default 2587; the Service maps 587)"
    )
    relay.add_argument("--tls-port", type=int, default=0, help="implicit-TLS port, e.g. 2465 (0: off)")
    relay.add_argument("--tls-cert", help="PEM certificate chain file (a kubernetes.io/tls Secret's tls.crt)")
    relay.add_argument("--tls-key", help="PEM private key file (tls.key)")
    relay.add_argument(
        "--tls-secret", help="with -f: the kubernetes.io/tls Secret in the files to use, as NAMESPACE/NAME"
    )
    relay.add_argument("--hostname", default="smtp-relay", help="the name in the greeting")
    relay.add_argument(
        "--max-message-size", type=int, default=35 * 1024 * 1024, help="bytes, advertised with SIZE (35 MB)"
    )
    relay.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics here (0: off)")
    relay.add_argument("--log-level", choices=("warning", "info", "debug"), default="info")


def _relay(args: argparse.Namespace) -> int:
    import logging  # noqa: PLC0415 - only the relay configures logging itself (kopf does for run)

    from smtp_oauth_operator.services import relay  # noqa: PLC0415 - aiosmtpd only for this command

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    options = relay.Options(
        listen=args.listen,
        port=args.port,
        tls_port=args.tls_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_secret=args.tls_secret,
        hostname=args.hostname,
        max_size=args.max_message_size,
        metrics_port=args.metrics_port,
        namespaces=tuple(args.namespace or ()),
    )
    try:
        docs = load(args.filename) if args.filename else None
        source = ManifestSource(docs) if docs is not None else None
        asyncio.run(relay.serve(options, docs, source))
    except (InputError, relay.RelayInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
