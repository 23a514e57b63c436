"""``check`` on input it cannot use: exit 2, one clear line (a JSON object under -o json), no traceback.

Exit 1 means "not Ready", so a crash that exits 1 would tell a pipeline that the configuration is
broken when it is the input that is. Each case is what a user really feeds the CLI by mistake.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from smtp_oauth_operator import cli

CONFIG = {
    "apiVersion": "smtpoauth.dev/v1alpha1",
    "kind": "SmtpOAuthConfig",
    "metadata": {"name": "mail", "namespace": "mail"},
    "spec": {
        "username": "no-reply@contoso.com",
        "identity": {
            "tenantId": "11111111-1111-4111-8111-111111111111",
            "clientId": "22222222-2222-4222-8222-222222222222",
            "clientSecret": {"secretKeyRef": {"name": "exo-app", "key": "client-secret"}},
        },
    },
}


def _with(**changes: object) -> str:
    doc = json.loads(json.dumps(CONFIG))
    doc.update(changes)
    return yaml.safe_dump(doc)


Writer = Callable[[Path], list[str]]


def _file(content: str | bytes) -> Writer:
    def write(tmp: Path) -> list[str]:
        path = tmp / "in.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return ["-f", str(path)]

    return write


CASES: list[tuple[str, Writer, str]] = [
    ("not-utf8", _file(b"kind: Secret\nmetadata: {name: \xff\xfe}\n"), "not UTF-8"),
    ("metadata-string", _file(_with(metadata="foo")), "metadata must be an object"),
    ("metadata-list", _file(_with(metadata=["a"])), "metadata must be an object"),
    (
        "secret-data-list",
        _file(
            _with()
            + "---\n"
            + yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": ["x"]})
        ),
        "data must map strings to strings",
    ),
    (
        "secret-stringdata-number",
        _file(
            yaml.safe_dump(
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": 1}}
            )
        ),
        "stringData must map strings to strings",
    ),
    (
        "configmap-data-string",
        _file(
            yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": "x"})
        ),
        "data must map strings to strings",
    ),
    (
        "generation-text",
        _file(_with(metadata={"name": "mail", "generation": "three"})),
        "metadata.generation must be",
    ),
    ("generation-float", _file(_with(metadata={"name": "mail", "generation": 1.5})), "metadata.generation"),
    ("name-missing", _file(_with(metadata={"namespace": "mail"})), "metadata.name must be"),
    ("annotations-list", _file(_with(metadata={"name": "m", "annotations": ["a"]})), "annotations"),
    ("list-items-not-objects", _file("kind: List\nitems: [1, 2]\n"), "items must be a list of objects"),
    ("no-kind", _file("metadata: {name: x}\n"), "has no kind"),
    ("scalar-document", _file("just text\n"), "not a Kubernetes object"),
    ("deeply-nested", _file("[" * 100_000), "nested too deeply"),
    ("huge", _file(b"# " + b"x" * 4 * 2**20 + b"\n"), "larger than 4 MiB"),
    ("invalid-yaml", _file("kind: [unclosed\n"), "not valid YAML"),
    ("missing-file", lambda tmp: ["-f", str(tmp / "missing.yaml")], "No such file"),
    ("directory", lambda tmp: ["-f", str(tmp)], "directory"),
    ("stdin-twice", lambda tmp: ["-f", "-", "-f", "-"], "standard input (-f -) can be read only once"),
    ("no-config", _file("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"), "no SmtpOAuthConfig"),
]


@pytest.mark.parametrize(("writer", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("output", ["text", "json"])
def test_unusable_input_exits_2_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    writer: Writer,
    expected: str,
    output: str,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(_with().encode())))
    code = cli.main(["check", *writer(tmp_path), "-o", output])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    if output == "json":
        assert err == ""
        assert out.count("\n") == 1, out
        assert expected in json.loads(out)["error"]
    else:
        assert out == ""
        assert err.count("\n") == 1, err
        assert err.startswith("error: ")
        assert expected in err


def test_stdin_is_read_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ``-f -`` works (an invalid spec: exit 2 with InvalidSpec, nothing contacted)."""
    doc = json.loads(json.dumps(CONFIG))
    doc["spec"]["identity"]["clientSecret"]["expiresAt"] = "9999-12-31T23:59:59-05:00"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(yaml.safe_dump(doc).encode())))
    assert cli.main(["check", "-f", "-", "-o", "json"]) == 2
    result = json.loads(capsys.readouterr().out)[0]
    assert result["reason"] == "InvalidSpec"
    assert "expiresAt" in result["message"]
    assert "9999" in result["message"]


@pytest.mark.parametrize(
    "expires_at",
    [
        "9999-12-31T23:59:59-05:00",  # valid RFC 3339 that the API server accepts; year 10000 in UTC
        "0001-01-01T00:00:00+01:00",
        "1969-12-31T23:59:59Z",
        "2027-13-01T00:00:00Z",
    ],
)
def test_out_of_range_expiry_is_invalid_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], expires_at: str
) -> None:
    doc = json.loads(json.dumps(CONFIG))
    doc["spec"]["identity"]["clientSecret"]["expiresAt"] = expires_at
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["check", "-f", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "InvalidSpec" in out
    assert "spec.identity.clientSecret.expiresAt" in out
    assert "Traceback" not in out + err


def test_the_installed_cli_prints_no_traceback(tmp_path: Path) -> None:
    """The real process (``python -m smtp_oauth_operator``): no traceback reaches the terminal."""
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    for output in ("text", "json"):
        proc = subprocess.run(
            [sys.executable, "-m", "smtp_oauth_operator", "check", "-f", str(bad), "-o", output],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )
        assert proc.returncode == 2, proc
        assert "Traceback" not in proc.stdout + proc.stderr
        assert len((proc.stdout + proc.stderr).strip().splitlines()) == 1, proc
