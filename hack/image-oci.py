#!/usr/bin/env python3
"""Deterministic OCI image pieces for hack/image.sh (standard library only).

    image-oci.py layer ROOT OUT.tar.gz --epoch N [--only SUBPATH]
        A layer from the directory ROOT (or only ROOT/SUBPATH, kept at that path): entries sorted by
        name, every mtime set to N, owners root:root with no names, hard links kept, gzip without a
        name or time. Prints {"digest", "diff_id", "size"} as JSON.

    image-oci.py assemble --layer L.json... --config-json C.json --ref-name TAG --image-name NAME
                          --epoch N --out IMAGE.oci.tar
        An OCI image layout holding one image (the layers as given, the config fields from C.json), as
        a sorted tar with the same normalisation. Prints {"manifest_digest", "config_digest"}.

Two runs over the same inputs give the same bytes, hence the same digests (the layers' gzip output
also depends on the zlib version: compare digests on one machine, or the uncompressed diff_ids).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _normalise(info: tarfile.TarInfo, epoch: int) -> tarfile.TarInfo:
    info.mtime = epoch
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.pax_headers = {}
    return info


def _walk(base: Path, start: Path) -> list[Path]:
    """Every path under ``start`` (itself included), sorted by its name relative to ``base``."""
    paths = [start]
    for dirpath, dirnames, filenames in os.walk(start):
        dirnames.sort()
        here = Path(dirpath)
        paths.extend(here / name for name in dirnames)
        paths.extend(here / name for name in filenames)
    return sorted(paths, key=lambda p: p.relative_to(base).as_posix())


def build_layer(root: Path, out: Path, epoch: int, only: str | None) -> dict[str, Any]:
    start = root / only if only else root
    if not start.is_dir():
        raise SystemExit(f"image-oci: {start} is not a directory")
    raw = out.with_suffix(".tmp-raw")
    with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in _walk(root, start):
            rel = path.relative_to(root).as_posix()
            if rel == ".":
                continue
            info = _normalise(tar.gettarinfo(str(path), arcname=rel), epoch)
            if info.isreg():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            elif info.isdir() or info.issym() or info.islnk():
                tar.addfile(info)
            else:
                raise SystemExit(f"image-oci: {path}: unsupported file type (device, socket or fifo)")
    diff_id = _sha256_file(raw)
    tar_size = raw.stat().st_size
    # filename="" and mtime=0: nothing of this run in the gzip header.
    with (
        raw.open("rb") as src,
        out.open("wb") as dst,
        gzip.GzipFile(filename="", mode="wb", fileobj=dst, compresslevel=6, mtime=0) as gz,
    ):
        shutil.copyfileobj(src, gz, CHUNK)
    raw.unlink()
    return {
        "digest": _sha256_file(out),
        "diff_id": diff_id,
        "size": out.stat().st_size,
        "tar_size": tar_size,
        "path": str(out),
    }


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def assemble(args: argparse.Namespace) -> dict[str, Any]:
    epoch = args.epoch
    created = datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    layers = [json.loads(Path(p).read_text()) for p in args.layer]
    fields = json.loads(Path(args.config_json).read_text())
    labels = dict(fields["config"].get("Labels", {}))
    labels["org.opencontainers.image.created"] = created
    fields["config"]["Labels"] = labels

    config = {
        "created": created,
        "architecture": fields["architecture"],
        **({"variant": fields["variant"]} if fields.get("variant") else {}),
        "os": "linux",
        "config": fields["config"],
        "rootfs": {"type": "layers", "diff_ids": [layer["diff_id"] for layer in layers]},
        "history": [
            {"created": created, "created_by": layer.get("created_by", "hack/image.sh")} for layer in layers
        ],
    }
    blobs: dict[str, bytes | Path] = {}
    config_bytes = _canonical(config)
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    blobs[config_digest] = config_bytes
    annotations = {
        k: v
        for k, v in labels.items()
        if k.startswith("org.opencontainers.image.")
        and k.rsplit(".", 1)[-1] in {"created", "version", "revision", "source", "licenses", "title"}
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": len(config_bytes)},
        "layers": [
            {"mediaType": LAYER_MEDIA_TYPE, "digest": layer["digest"], "size": layer["size"]}
            for layer in layers
        ],
        "annotations": annotations,
    }
    for layer in layers:
        blobs[layer["digest"]] = Path(layer["path"])
    manifest_bytes = _canonical(manifest)
    manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    blobs[manifest_digest] = manifest_bytes
    platform = {"architecture": config["architecture"], "os": "linux"}
    if fields.get("variant"):
        platform["variant"] = fields["variant"]
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [
            {
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "platform": platform,
                "annotations": {
                    # skopeo, umoci and podman read the tag from here ...
                    "org.opencontainers.image.ref.name": args.ref_name,
                    # ... containerd (`ctr images import`, `kind load image-archive`) the full name.
                    "io.containerd.image.name": args.image_name,
                },
            }
        ],
    }
    files: dict[str, bytes | Path] = {
        "oci-layout": _canonical({"imageLayoutVersion": "1.0.0"}),
        "index.json": _canonical(index),
    }
    for digest, blob in blobs.items():
        files["blobs/sha256/" + digest.removeprefix("sha256:")] = blob

    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({"blobs", "blobs/sha256"})
        for name in sorted([*dirs, *files]):
            info = tarfile.TarInfo(name)
            if name in dirs:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(_normalise(info, epoch))
                continue
            info.mode = 0o644
            blob = files[name]
            if isinstance(blob, Path):
                info.size = blob.stat().st_size
                with blob.open("rb") as fh:
                    tar.addfile(_normalise(info, epoch), fh)
            else:
                info.size = len(blob)
                tar.addfile(_normalise(info, epoch), io.BytesIO(blob))
    tmp.replace(out)
    return {"manifest_digest": manifest_digest, "config_digest": config_digest, "archive": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    layer = sub.add_parser("layer")
    layer.add_argument("root", type=Path)
    layer.add_argument("out", type=Path)
    layer.add_argument("--epoch", type=int, required=True)
    layer.add_argument("--only", default=None)
    layer.add_argument("--created-by", default="hack/image.sh")
    asm = sub.add_parser("assemble")
    asm.add_argument("--layer", action="append", required=True)
    asm.add_argument("--config-json", required=True)
    asm.add_argument("--ref-name", required=True)
    asm.add_argument("--image-name", required=True)
    asm.add_argument("--epoch", type=int, required=True)
    asm.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "layer":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = build_layer(args.root, args.out, args.epoch, args.only)
        result["created_by"] = args.created_by
    else:
        result = assemble(args)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
