"""The chart's CRD copy (charts/smtp-oauth-operator/files/crds/) is crds/, byte for byte.

The chart renders the CRD from its copy (templates/crds.yaml), so a CRD edited in crds/ but not synced
would ship the old schema. Fix a failure with hack/sync-chart-crds.sh.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CANONICAL = ROOT / "crds"
CHART_COPY = ROOT / "charts" / "smtp-oauth-operator" / "files" / "crds"
SYNC = ROOT / "hack" / "sync-chart-crds.sh"


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.yaml"))


def test_the_chart_has_a_copy_of_every_crd_and_nothing_else() -> None:
    assert _names(CANONICAL), "no CRDs in crds/"
    assert _names(CHART_COPY) == _names(CANONICAL), "run hack/sync-chart-crds.sh"


@pytest.mark.parametrize("name", _names(CANONICAL))
def test_the_copy_is_byte_for_byte_equal(name: str) -> None:
    assert (CHART_COPY / name).read_bytes() == (CANONICAL / name).read_bytes(), (
        f"charts/smtp-oauth-operator/files/crds/{name} differs from crds/{name}: run hack/sync-chart-crds.sh"
    )


def test_the_chart_template_reads_the_copy() -> None:
    template = (ROOT / "charts" / "smtp-oauth-operator" / "templates" / "crds.yaml").read_text()
    for name in _names(CANONICAL):
        assert f'.Files.Get "files/crds/{name}"' in template


def test_sync_check_detects_a_difference(tmp_path: Path) -> None:
    """The sync script's --check mode fails on a changed copy (run on a scratch tree, not the repo)."""
    tree = tmp_path / "repo"
    (tree / "hack").mkdir(parents=True)
    (tree / "crds").mkdir()
    (tree / "charts" / "smtp-oauth-operator" / "files" / "crds").mkdir(parents=True)
    script = tree / "hack" / SYNC.name
    script.write_bytes(SYNC.read_bytes())
    (tree / "crds" / "a.yaml").write_text("kind: CustomResourceDefinition\n")
    subprocess.run(["bash", str(script)], check=True, capture_output=True)
    copy = tree / "charts" / "smtp-oauth-operator" / "files" / "crds" / "a.yaml"
    assert copy.read_text() == "kind: CustomResourceDefinition\n"
    assert subprocess.run(["bash", str(script), "--check"], check=False, capture_output=True).returncode == 0
    copy.write_text("kind: CustomResourceDefinition\n# drift\n")
    assert subprocess.run(["bash", str(script), "--check"], check=False, capture_output=True).returncode == 1
