#!/usr/bin/env bash
# Build the container image smtp-oauth-operator:<version> as an OCI archive, without a container daemon or registry:
#   build/smtp-oauth-operator-<version>.oci.tar     the image (an OCI image layout in a tar; tag <version>)
#   build/smtp-oauth-operator-<version>.spdx.json   its SBOM (syft, SPDX 2.3), unless --no-sbom
#   build/smtp-oauth-operator-<version>.txt         digest, size, package lists, build inputs
#
# The image: Debian bookworm's Python 3.11 runtime and CA certificates extracted from Debian's packages
# (mmdebstrap --variant=extract; only the packages listed in KEEP below: no shell, no package manager, no
# maintainer scripts), and the project installed from its wheel into /opt/venv with the versions pinned in
# hack/image-requirements.txt; user 65532:65532; entrypoint `smtp-oauth-operator`, default command `run ...`.
# Two layers: the Debian base, then /opt/venv. Deterministic: file times are SOURCE_DATE_EPOCH (default: the
# time of the last commit that changed an input; for the base, one that changed the build scripts), owners root, entries sorted, byte code compiled with
# --invalidation-mode unchecked-hash and PYTHONHASHSEED=0; two builds of the same inputs give the same digest.
#
# Usage: hack/image.sh [--no-sbom] [--force] [--lock]
#   --no-sbom  skip the SBOM (the e2e test does not need it, and syft takes minutes to build the first time)
#   --force    rebuild both layers even when the cache has them
#   --lock     re-resolve hack/image-requirements.txt from pyproject.toml (newest versions), then stop
# Environment: IMAGE_REPOSITORY (default the chart's image.repository), IMAGE_OUT_DIR (default build/),
#   SOURCE_DATE_EPOCH, DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR, SMTPOAUTH_TOOLS_DIR.
# The last line on stdout is the archive's path. Needs root (mmdebstrap's root mode and chroot); installs
# mmdebstrap and binutils with apt-get when they are missing. Layers are cached under ~/.cache/smtp-oauth-operator/image/ by a
# hash of their inputs, so a warm run only assembles the archive (seconds).
set -euo pipefail
umask 022

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="smtp-oauth-operator"
SUITE="bookworm"
PYTHON_VERSION="3.11"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
SOURCE_URL="https://github.com/smtp-oauth-operator/smtp-oauth-operator"
REPOSITORY="${IMAGE_REPOSITORY:-ghcr.io/smtp-oauth-operator/smtp-oauth-operator}"
OUT_DIR="${IMAGE_OUT_DIR:-$ROOT/build}"
TOOLS_CACHE="${SMTPOAUTH_TOOLS_DIR:-$HOME/.cache/smtp-oauth-operator}"
LOCK_FILE="$ROOT/hack/image-requirements.txt"
OCI="$ROOT/hack/image-oci.py"

# The Python runtime's shared libraries and data, and the CA certificates. Everything apt resolves beyond
# these must be in DROP (with the reason), so that a new dependency fails the build instead of slipping in.
KEEP=(
  python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
  libc6 libgcc-s1 gcc-12-base libssl3 zlib1g libexpat1 libffi8 libbz2-1.0 liblzma5 libuuid1 libcrypt1
  media-types netbase ca-certificates base-files
)
# Needed only by maintainer scripts, which an extracted image never runs (ca-certificates' bundle and the
# python3 link are made below instead) ...
DROP=(debconf dpkg tar openssl mawk libacl1 libselinux1 libpcre2-8-0 libmd0 libzstd1 perl-base)
# ... or only by standard-library modules that the operator never imports (dbm, sqlite3, nis, readline, curses);
# their extension modules are removed too, so importing one fails with a plain ModuleNotFoundError.
DROP+=(libdb5.3 libsqlite3-0 libnsl2 libtirpc3 libtirpc-common libgssapi-krb5-2 libkrb5-3 libk5crypto3
  libkrb5support0 libcom-err2 libkeyutils1 libncursesw6 libtinfo6 libreadline8 readline-common)
UNUSED_EXTENSIONS=(_dbm _sqlite3 nis readline _curses _curses_panel
  _testbuffer _testcapi _testclinic _testimportmultiple _testinternalcapi _testmultiphase _xxsubinterpreters
  _xxtestfuzz _ctypes_test xxlimited xxlimited_35)
# Directories of documentation dropped from the base (copyright files are kept).
STRIP=(usr/share/man usr/share/info usr/share/locale usr/share/lintian usr/share/bug usr/share/doc-base
  usr/share/menu usr/share/gcc usr/share/gdb usr/share/common-licenses
  usr/lib/python3.11/test usr/lib/python3.11/pydoc_data)
# glibc's iconv modules: Python has its own codecs.
STRIP+=("usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$(uname -m)-linux-gnu")/gconv")

log() { printf '[image %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

sbom=1 force=0 lock=0
while [ $# -gt 0 ]; do
  case "$1" in
    --no-sbom) sbom=0 ;;
    --force) force=1 ;;
    --lock) lock=1 ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

ARCH="$(dpkg --print-architecture)"
case "$ARCH" in
  amd64) PYARCH=x86_64 ;;
  arm64) PYARCH=aarch64 ;;
  *) die "unsupported architecture $ARCH (amd64 and arm64 are)" ;;
esac
# pip matches --platform tags exactly: name every manylinux level bookworm's glibc (2.36) can run.
PLATFORMS=(--platform "manylinux2014_$PYARCH")
for minor in $(seq 17 36); do PLATFORMS+=(--platform "manylinux_2_${minor}_$PYARCH"); done
PIP_TARGET=(--only-binary=:all: --implementation cp --python-version "$PYTHON_VERSION" "${PLATFORMS[@]}")

if [ "$lock" = 1 ]; then
  # The runtime dependencies as pip resolves them today for the image's interpreter and platform, plus the
  # tools the build uses (pip in the image build, hatchling for the wheel), so they are pinned as well.
  report="$(mktemp)"
  trap 'rm -f "$report"' EXIT
  python3 -m pip install --quiet --disable-pip-version-check --dry-run --ignore-installed --target /nonexistent \
    "${PIP_TARGET[@]}" --report "$report" "$ROOT" pip hatchling
  {
    echo "# The image's Python packages (and the build's pip and hatchling), pinned; used as pip constraints by"
    echo "# hack/image.sh and operator/Dockerfile. Regenerate with: hack/image.sh --lock"
    python3 -c '
import json, sys
report = json.load(open(sys.argv[1]))
pins = sorted((i["metadata"]["name"].lower(), i["metadata"]["version"]) for i in report["install"])
print("\n".join(f"{n}=={v}" for n, v in pins if n != sys.argv[2]))
' "$report" "$NAME"
  } >"$LOCK_FILE"
  log "wrote $LOCK_FILE"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap's root mode and chroot); run it with sudo"
debs=()
command -v mmdebstrap >/dev/null || debs+=(mmdebstrap)
command -v strip >/dev/null || debs+=(binutils)
if [ ${#debs[@]} -gt 0 ]; then
  log "installing ${debs[*]} with apt-get"
  apt-get install -y -q --no-install-recommends "${debs[@]}" >&2 \
    || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${debs[@]}" >&2; }
fi
for tool in python3 git sha256sum dpkg-deb chroot flock strip mmdebstrap; do
  command -v "$tool" >/dev/null || die "$tool not found"
done

VERSION="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$ROOT/pyproject.toml")"
INPUTS=(pyproject.toml README.md operator/src hack/image.sh hack/image-oci.py hack/image-requirements.txt)
# The base layer's time comes from the build scripts only, so that a change of the operator's code leaves the
# base layer (and its digest, which registries and nodes then reuse) as it was.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH="$(git -C "$ROOT" log -1 --format=%ct -- "${INPUTS[@]}" 2>/dev/null || true)"
  BASE_EPOCH="$(git -C "$ROOT" log -1 --format=%ct -- hack/image.sh hack/image-oci.py 2>/dev/null || true)"
  if [ -z "$SOURCE_DATE_EPOCH" ] || [ -z "$BASE_EPOCH" ]; then die "not a git checkout: set SOURCE_DATE_EPOCH"; fi
else
  BASE_EPOCH="$SOURCE_DATE_EPOCH"
fi
export SOURCE_DATE_EPOCH
REVISION="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git -C "$ROOT" status --porcelain -- "${INPUTS[@]}" 2>/dev/null)" ]; then
  REVISION="$REVISION-dirty"
fi

CACHE="$TOOLS_CACHE/image/$ARCH"
mkdir -p "$CACHE" "$OUT_DIR"
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
  log "another image build holds $CACHE/.lock; waiting"
  flock 9
fi

hash_of() { sha256sum | cut -c1-20; }
# The inputs of each layer (file contents, not times), so that an unrelated commit reuses the cache.
BASE_KEY="$({
  printf '%s\n' "$SUITE" "$ARCH" "$MIRROR" "$SECURITY_MIRROR" "$BASE_EPOCH" "${KEEP[*]}" "${DROP[*]}" "${STRIP[*]}" "${UNUSED_EXTENSIONS[*]}"
  sed -n '/^build_base()/,/^}/p' "$0"
  cat "$OCI"
} | hash_of)"
APP_KEY="$({
  echo "$BASE_KEY"
  sed -n -e '/^pinned_wheels()/,/^}/p' -e '/^build_app()/,/^}/p' "$0"
  cd "$ROOT" && find pyproject.toml README.md hack/image-requirements.txt operator/src -type f \
    ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
} | hash_of)"
BASE="$CACHE/base-$BASE_KEY"
APP="$CACHE/app-$APP_KEY"

# Runs a program of the image's root file system with a clean environment.
in_root() { # rootfs command...
  local rootfs="$1"
  shift
  env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/tmp LC_ALL=C.UTF-8 PYTHONHASHSEED=0 \
    SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" "$(command -v chroot)" "$rootfs" "$@"
}

compile_python() { # rootfs dir: byte code that never looks at mtimes (the root file system is read-only)
  in_root "$1" /usr/bin/python3.11 -m compileall -q -j 1 --invalidation-mode unchecked-hash "$2" >/dev/null
}

build_base() {
  local tmp deb pkg rootfs keep=" ${KEEP[*]} " drop=" ${DROP[*]} " unexpected=()
  tmp="$(mktemp -d "$CACHE/.base.XXXXXX")"
  rootfs="$tmp/rootfs"
  mkdir -p "$rootfs/var/lib/dpkg/status.d"
  log "base: downloading ${#KEEP[@]} Debian packages ($SUITE, $ARCH) with mmdebstrap"
  mmdebstrap --quiet --mode=root --variant=extract --skip=cleanup/apt/cache --architectures="$ARCH" \
    --include="$(IFS=,; echo "${KEEP[*]}")" --format=directory "$SUITE" "$tmp/mm" \
    "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY_MIRROR $SUITE-security main" >&2
  : >"$tmp/packages.txt"
  for deb in "$tmp"/mm/var/cache/apt/archives/*.deb; do
    pkg="$(dpkg-deb -f "$deb" Package)"
    if [[ "$keep" == *" $pkg "* ]]; then
      dpkg-deb -x "$deb" "$rootfs"
      # One control paragraph per package (the distroless layout): SBOM tools and scanners read these.
      { dpkg-deb -f "$deb"; echo "Status: install ok installed"; } >"$rootfs/var/lib/dpkg/status.d/$pkg"
      printf '%s %s\n' "$pkg" "$(dpkg-deb -f "$deb" Version)" >>"$tmp/packages.txt"
    elif [[ "$drop" != *" $pkg "* ]]; then
      unexpected+=("$pkg")
    fi
  done
  [ ${#unexpected[@]} = 0 ] || die "unexpected dependencies: ${unexpected[*]} (add each to KEEP or DROP)"
  for pkg in "${KEEP[@]}"; do
    [ -f "$rootfs/var/lib/dpkg/status.d/$pkg" ] || die "package $pkg was not downloaded"
  done
  rm -rf "$tmp/mm"

  (
    cd "$rootfs"
    rm -rf "${STRIP[@]}"
    for ext in "${UNUSED_EXTENSIONS[@]}"; do rm -f usr/lib/python3.11/lib-dynload/"$ext".cpython-311-*.so; done
    find usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
    find usr/share/doc -mindepth 1 -type d -empty -delete
    # What the skipped maintainer scripts would have made: the CA bundle (update-ca-certificates), OpenSSL's
    # default paths to it (the openssl package's links), and python3.
    mkdir -p etc/ssl/certs usr/lib/ssl
    find usr/share/ca-certificates -name '*.crt' -print0 | LC_ALL=C sort -z | xargs -0 cat >etc/ssl/certs/ca-certificates.crt
    ln -s /etc/ssl/certs/ca-certificates.crt usr/lib/ssl/cert.pem
    ln -s /etc/ssl/certs usr/lib/ssl/certs
    ln -s python3.11 usr/bin/python3
    printf '%s\n' 'root:x:0:0:root:/root:/usr/sbin/nologin' \
      'nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin' >etc/passwd
    printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >etc/group
    printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' >etc/nsswitch.conf
    mkdir -p opt dev proc sys run
    mkdir -p -m 1777 tmp
    chmod 1777 tmp
  )
  log "base: compiling the standard library"
  SOURCE_DATE_EPOCH="$BASE_EPOCH" compile_python "$rootfs" /usr/lib/python3.11
  python3 "$OCI" layer "$rootfs" "$tmp/layer.tar.gz" --epoch "$BASE_EPOCH" \
    --created-by "Debian $SUITE packages: $(cut -d' ' -f1 "$tmp/packages.txt" | tr '\n' ' ')" >"$tmp/layer.json"
  # The layer's JSON names its file: point it at the final place.
  sed -i "s|$tmp/|$BASE/|" "$tmp/layer.json"
  rm -rf "$BASE"
  mv "$tmp" "$BASE"
}

pinned_wheels() { # wheelhouse: print the wheel of every pin for this platform; fail if one is missing
  local name version found status=0
  while IFS='=' read -r name _ version; do
    found="$(find "$1" -maxdepth 1 -iname "$(echo "$name" | tr -- '-.' '__')-$version-*.whl" \
      \( -name '*-none-any.whl' -o -name "*$PYARCH*" \) | LC_ALL=C sort | head -n1)"
    if [ -n "$found" ]; then echo "$found"; else status=1; fi
  done < <(grep -E '^[a-z0-9]' "$LOCK_FILE")
  return "$status"
}

build_app() {
  local tmp wheelhouse rootfs pip_version
  tmp="$(mktemp -d "$CACHE/.app.XXXXXX")"
  rootfs="$tmp/rootfs"
  wheelhouse="$TOOLS_CACHE/image/wheels"
  mkdir -p "$wheelhouse" "$tmp/install"
  if ! pinned_wheels "$wheelhouse" >/dev/null; then
    log "app: downloading the pinned wheels (hack/image-requirements.txt) for cp311 $PYARCH"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$wheelhouse" \
      "${PIP_TARGET[@]}" -r "$LOCK_FILE" >&2
  fi
  log "app: building the project's wheel"
  PIP_CONSTRAINT="$LOCK_FILE" python3 -m pip wheel --quiet --disable-pip-version-check --no-deps \
    --wheel-dir "$tmp/install" "$ROOT" >&2
  # Only the pinned files go in (the wheelhouse may hold other versions from earlier locks).
  pinned_wheels "$wheelhouse" | xargs -d '\n' cp -t "$tmp/install/"
  pip_version="$(grep -E '^pip==' "$LOCK_FILE" | cut -d= -f3)"
  cp -a "$BASE/rootfs" "$rootfs"
  cp "$LOCK_FILE" "$tmp/install/requirements.txt"
  cp -a "$tmp/install" "$rootfs/tmp/install"
  log "app: installing into /opt/venv"
  in_root "$rootfs" /usr/bin/python3.11 -m venv --without-pip /opt/venv
  in_root "$rootfs" /opt/venv/bin/python "/tmp/install/pip-$pip_version-py3-none-any.whl/pip" install \
    --quiet --disable-pip-version-check --no-index --find-links /tmp/install --no-compile --no-cache-dir \
    --constraint /tmp/install/requirements.txt "$NAME==$VERSION" >&2 \
    || die "pip could not install from the pins; if pyproject.toml's dependencies changed: hack/image.sh --lock"
  rm -rf "$rootfs/tmp/install"
  # The kubernetes wheel carries a second, asyncio client (kubernetes/aio: 1,900 files, 68 MB, almost half of
  # the image) that neither the operator nor kopf uses; nothing outside it imports it (checked here).
  local site="$rootfs/opt/venv/lib/python$PYTHON_VERSION/site-packages"
  if grep -rlE --include='*.py' '(kubernetes\.aio|from kubernetes import .*\baio\b)' "$site" | grep -v '/kubernetes/aio/'; then
    die "the files above import kubernetes.aio: it can no longer be left out of the image"
  fi
  rm -rf "$site/kubernetes/aio"
  # The wheels' extension modules carry debug sections and full symbol tables (13 MB); strip them as Debian's
  # dh_strip strips its shared libraries: the dynamic symbols the loader needs stay.
  find "$site" -name '*.so' -type f -print0 | LC_ALL=C sort -z \
    | xargs -0 strip --remove-section=.comment --remove-section=.note --strip-unneeded
  compile_python "$rootfs" /opt/venv/lib
  in_root "$rootfs" /opt/venv/bin/python -m pip --version >/dev/null 2>&1 && die "pip ended up in the image"
  in_root "$rootfs" /opt/venv/bin/python -c 'import importlib.metadata as m
print("\n".join(sorted(f"{d.name} {d.version}" for d in m.distributions())))' >"$tmp/python-packages.txt"
  python3 "$OCI" layer "$rootfs" "$tmp/layer.tar.gz" --epoch "$SOURCE_DATE_EPOCH" --only opt/venv \
    --created-by "pip install $NAME==$VERSION into /opt/venv (hack/image-requirements.txt)" >"$tmp/layer.json"
  sed -i "s|$tmp/|$APP/|" "$tmp/layer.json"
  rm -rf "$rootfs" "$tmp/install"
  rm -rf "$APP"
  mv "$tmp" "$APP"
}

start=$(date +%s)
if [ "$force" = 1 ] || [ ! -f "$BASE/layer.json" ]; then
  build_base
else
  log "base: cached ($BASE)"
fi
if [ "$force" = 1 ] || [ ! -f "$APP/layer.json" ]; then
  build_app
else
  log "app: cached ($APP)"
fi
# Keep the three newest layers of each kind.
for kind in base app; do
  find "$CACHE" -maxdepth 1 -name "$kind-*" -type d -printf '%T@ %p\n' | sort -rn | tail -n +4 | cut -d' ' -f2- \
    | while read -r old; do [ "$old" = "$BASE" ] || [ "$old" = "$APP" ] || rm -rf "$old"; done
done

ARCHIVE="$OUT_DIR/$NAME-$VERSION.oci.tar"
config="$(mktemp)"
trap 'rm -f "$config"' EXIT
python3 - "$config" <<EOF
import json, sys
labels = {
    "org.opencontainers.image.title": "$NAME",
    "org.opencontainers.image.description": "Kubernetes operator that tests and watches SMTP OAuth 2.0 configurations",
    "org.opencontainers.image.source": "$SOURCE_URL",
    "org.opencontainers.image.url": "$SOURCE_URL",
    "org.opencontainers.image.documentation": "$SOURCE_URL/blob/main/docs/install.md",
    "org.opencontainers.image.version": "$VERSION",
    "org.opencontainers.image.revision": "$REVISION",
    "org.opencontainers.image.licenses": "Apache-2.0",
    "org.opencontainers.image.base.name": "debian:$SUITE (packages extracted by hack/image.sh)",
}
config = {
    "architecture": "$ARCH",
    "variant": "v8" if "$ARCH" == "arm64" else "",
    "config": {
        "User": "65532:65532",
        "Env": [
            "PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONDONTWRITEBYTECODE=1",
            "PYTHONUNBUFFERED=1",
        ],
        "Entrypoint": ["$NAME"],
        "Cmd": ["run", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz", "--metrics-port=9090",
                "--log-format=json"],
        "WorkingDir": "/",
        "ExposedPorts": {"8080/tcp": {}, "9090/tcp": {}},
        "StopSignal": "SIGTERM",
        "Labels": labels,
    },
}
json.dump(config, open(sys.argv[1], "w"))
EOF
python3 "$OCI" assemble --layer "$BASE/layer.json" --layer "$APP/layer.json" --config-json "$config" \
  --ref-name "$VERSION" --image-name "$REPOSITORY:$VERSION" --epoch "$SOURCE_DATE_EPOCH" --out "$ARCHIVE" \
  >"$OUT_DIR/.assemble.json"
DIGEST="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["manifest_digest"])' "$OUT_DIR/.assemble.json")"
rm -f "$OUT_DIR/.assemble.json"

size_of() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
unpacked=$(($(size_of "$BASE/layer.json" tar_size) + $(size_of "$APP/layer.json" tar_size)))
{
  echo "image:    $REPOSITORY:$VERSION"
  echo "archive:  $ARCHIVE"
  echo "digest:   $DIGEST"
  echo "revision: $REVISION  SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH (base layer: $BASE_EPOCH)"
  echo "layers:   base $(size_of "$BASE/layer.json" size) B, app $(size_of "$APP/layer.json" size) B (gzip)"
  echo "uncompressed: $unpacked B ($((unpacked / 1048576)) MiB); Debian packages: $(wc -l <"$BASE/packages.txt"); Python packages: $(wc -l <"$APP/python-packages.txt")"
  echo
  echo "## Debian packages"
  cat "$BASE/packages.txt"
  echo
  echo "## Python packages (/opt/venv)"
  cat "$APP/python-packages.txt"
} >"$OUT_DIR/$NAME-$VERSION.txt"

if [ "$sbom" = 1 ]; then
  SBOM="$OUT_DIR/$NAME-$VERSION.spdx.json"
  syft="$(bash "$ROOT/hack/image-tools.sh" syft | tail -n1)"
  log "sbom: $syft scan oci-archive:$ARCHIVE"
  SYFT_CHECK_FOR_APP_UPDATE=false "$syft" scan --quiet "oci-archive:$ARCHIVE" \
    --source-name "$REPOSITORY" --source-version "$VERSION" -o "spdx-json=$SBOM"
  # The SBOM must see both worlds: the Debian packages and the venv's Python packages.
  for want in python3.11-minimal libssl3 ca-certificates "$NAME" kopf cryptography; do
    grep -q "\"name\": *\"$want\"" "$SBOM" || die "the SBOM does not list $want"
  done
  log "sbom: $SBOM"
fi
log "done in $(($(date +%s) - start))s: $REPOSITORY:$VERSION $DIGEST"
echo "$ARCHIVE"
