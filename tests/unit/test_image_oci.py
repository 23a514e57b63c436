"""hack/image-oci.py writes the same bytes for the same content, whatever the files' times and owners.

This is what makes `make image` reproducible (the full two-build comparison is in docs/install.md); and the
image's name matches the chart's default, which is what the release workflow publishes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tarfile
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parents[2]
EPOCH = 1_700_000_000


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("image_oci", ROOT / "hack" / "image-oci.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


oci = _load()


def _tree(root: Path, mtime: int, owner: int) -> Path:
    (root / "opt" / "venv" / "bin").mkdir(parents=True)
    (root / "opt" / "venv" / "lib" / "z.py").parent.mkdir(parents=True)
    # Created in a different order each time: the layer must sort.
    names = ["z.py", "a.py", "m.py"] if owner else ["a.py", "m.py", "z.py"]
    for name in names:
        (root / "opt" / "venv" / "lib" / name).write_text(f"# {name}\n")
    (root / "opt" / "venv" / "bin" / "tool").write_text("#!/opt/venv/bin/python\n")
    (root / "opt" / "venv" / "bin" / "tool").chmod(0o755)
    (root / "opt" / "venv" / "bin" / "python").symlink_to("/usr/bin/python3.11")
    os.link(root / "opt" / "venv" / "lib" / "a.py", root / "opt" / "venv" / "lib" / "a-link.py")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("nonroot:x:65532:65532::/nonexistent:/usr/sbin/nologin\n")
    for path in [root, *root.rglob("*")]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)
        if os.geteuid() == 0:
            os.lchown(path, owner, owner)
    return root


def test_a_layer_depends_on_content_only(tmp_path: Path) -> None:
    first = oci.build_layer(_tree(tmp_path / "a", 1_000, 0), tmp_path / "a.tar.gz", EPOCH, None)
    second = oci.build_layer(_tree(tmp_path / "b", 2_000_000_000, 1234), tmp_path / "b.tar.gz", EPOCH, None)
    assert first["digest"] == second["digest"]
    assert first["diff_id"] == second["diff_id"]
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()

    (tmp_path / "b" / "etc" / "passwd").write_text("changed\n")
    third = oci.build_layer(tmp_path / "b", tmp_path / "c.tar.gz", EPOCH, None)
    assert third["diff_id"] != first["diff_id"]
    other_epoch = oci.build_layer(tmp_path / "a", tmp_path / "d.tar.gz", EPOCH + 1, None)
    assert other_epoch["diff_id"] != first["diff_id"]


def test_layer_entries_are_sorted_normalised_and_keep_links(tmp_path: Path) -> None:
    root = _tree(tmp_path / "root", 1_000, 0)
    oci.build_layer(root, tmp_path / "venv.tar.gz", EPOCH, "opt/venv")
    with tarfile.open(tmp_path / "venv.tar.gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert names[0] == "opt/venv"
    assert not [n for n in names if n.startswith("etc")], "--only left the rest of the tree out"
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (EPOCH, 0, 0, "", "")
    by_name = {m.name: m for m in members}
    assert by_name["opt/venv/bin/python"].issym()
    assert by_name["opt/venv/bin/tool"].mode & 0o777 == 0o755
    links = [m for m in members if m.islnk()]
    assert len(links) == 1, "a hard link is kept as a link, not a second copy"


def test_an_archive_depends_on_its_inputs_only(tmp_path: Path) -> None:
    layer = oci.build_layer(_tree(tmp_path / "root", 1_000, 0), tmp_path / "layer.tar.gz", EPOCH, None)
    (tmp_path / "layer.json").write_text(json.dumps(layer))
    (tmp_path / "config.json").write_text(
        json.dumps({"architecture": "amd64", "config": {"User": "65532:65532", "Labels": {"a": "b"}}})
    )
    digests = []
    for out in ("one.oci.tar", "two.oci.tar"):
        args = oci.argparse.Namespace(
            layer=[str(tmp_path / "layer.json")],
            config_json=str(tmp_path / "config.json"),
            ref_name="0.1.0",
            image_name="ghcr.io/example/smtp-oauth-operator:0.1.0",
            epoch=EPOCH,
            out=str(tmp_path / out),
        )
        digests.append(oci.assemble(args)["manifest_digest"])
    assert digests[0] == digests[1]
    assert (tmp_path / "one.oci.tar").read_bytes() == (tmp_path / "two.oci.tar").read_bytes()
    with tarfile.open(tmp_path / "one.oci.tar") as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        (descriptor,) = index["manifests"]
        config_digest = json.load(tar.extractfile("blobs/sha256/" + descriptor["digest"][7:]))["config"][
            "digest"
        ]  # type: ignore[arg-type]
        config = json.load(tar.extractfile("blobs/sha256/" + config_digest[7:]))  # type: ignore[arg-type]
    assert descriptor["annotations"]["org.opencontainers.image.ref.name"] == "0.1.0"
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert config["config"]["Labels"]["org.opencontainers.image.created"] == config["created"]
    assert config["rootfs"]["diff_ids"] == [layer["diff_id"]]


def test_the_image_is_named_as_the_charts_default() -> None:
    values = yaml.safe_load((ROOT / "charts" / "smtp-oauth-operator" / "values.yaml").read_text())
    script = (ROOT / "hack" / "image.sh").read_text()
    found = re.search(r'REPOSITORY="\$\{IMAGE_REPOSITORY:-([^}]+)\}"', script)
    assert found, "hack/image.sh no longer sets REPOSITORY"
    assert found.group(1) == values["image"]["repository"]
    # The release workflow pushes to ghcr.io/<owner>/smtp-oauth-operator: the same name for this owner.
    workflow = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    owner = values["image"]["repository"].split("/")[1]
    assert (
        f"github.com/{owner}/smtp-oauth-operator"
        in (ROOT / "charts" / "smtp-oauth-operator" / "Chart.yaml").read_text()
    )
    assert "IMAGE_NAME: smtp-oauth-operator" in workflow


def test_versions_agree_for_the_release_tag() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version
    chart = yaml.safe_load((ROOT / "charts" / "smtp-oauth-operator" / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == version.group(1), (
        "the release workflow refuses a tag unless pyproject.toml and Chart.yaml agree"
    )


def test_every_runtime_dependency_is_pinned_for_the_image() -> None:
    """hack/image.sh installs with --no-index from the pins: a new or re-ranged dependency needs a re-lock."""
    from packaging.requirements import Requirement  # noqa: PLC0415 - pytest's own dependency
    from packaging.utils import canonicalize_name  # noqa: PLC0415

    with open(ROOT / "pyproject.toml", "rb") as fh:
        import tomllib  # noqa: PLC0415

        dependencies = tomllib.load(fh)["project"]["dependencies"]
    pins = {}
    for line in (ROOT / "hack" / "image-requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    for dependency in dependencies:
        requirement = Requirement(dependency)
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, (
            f"{requirement.name} is not in hack/image-requirements.txt: run hack/image.sh --lock"
        )
        assert requirement.specifier.contains(pinned, prereleases=True), (
            f"{requirement.name}=={pinned} does not satisfy {requirement}: run hack/image.sh --lock"
        )
