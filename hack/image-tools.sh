#!/usr/bin/env bash
# Build (or reuse) the release tools from Go modules, cached by version:
#   syft        the image's SBOM (SPDX), used by hack/image.sh
#   actionlint  the GitHub workflows' linter, used by `make lint`
#
# Usage: hack/image-tools.sh TOOL...      prints the path of each tool, one a line, in order
# Cache: ${SMTPOAUTH_TOOLS_DIR:-~/.cache/smtp-oauth-operator}/<tool>-<version>/<tool> (+ .stamp); Go's module and
# build caches stay at their defaults. A binary is reused when its stamp (version, flags, Go version) matches.
set -euo pipefail

SYFT_VERSION="v1.57.1"
ACTIONLINT_VERSION="v1.7.12"

CACHE="${SMTPOAUTH_TOOLS_DIR:-$HOME/.cache/smtp-oauth-operator}"

log() { printf '[image-tools %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ $# -gt 0 ] || die "usage: $0 syft|actionlint ..."
command -v go >/dev/null || die "go not found in PATH (Go >= 1.26 is required)"
export CGO_ENABLED=0 GOWORK=off GOFLAGS="${GOFLAGS:-} -buildvcs=false"

build() { # tool version package ldflags
  local tool="$1" version="$2" pkg="$3" ldflags="$4" dir out stamp start
  dir="$CACHE/$tool-$version"
  out="$dir/$tool"
  stamp="$(printf '%s\n' "$version" "$pkg" "$ldflags" "$(go env GOVERSION)" | sha256sum | cut -c1-16)"
  mkdir -p "$dir"
  exec 8>"$dir/.lock"
  flock 8
  if [ -x "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null || true)" = "$stamp" ]; then
    log "$tool $version: cached ($out)"
  else
    log "$tool $version: building from Go modules ..."
    start=$(date +%s)
    rm -rf "$dir/.gobin"
    (cd "$dir" && GOBIN="$dir/.gobin" go install -trimpath -ldflags "$ldflags" "$pkg@$version")
    mv -f "$dir/.gobin/$tool" "$out"
    rmdir "$dir/.gobin"
    echo "$stamp" >"$out.stamp"
    log "$tool $version: built in $(($(date +%s) - start))s"
  fi
  exec 8>&-
  echo "$out"
}

for tool in "$@"; do
  case "$tool" in
    syft)
      build syft "$SYFT_VERSION" github.com/anchore/syft/cmd/syft \
        "-s -w -X main.version=${SYFT_VERSION#v} -X main.gitCommit=gomod -X main.gitDescription=$SYFT_VERSION" ;;
    actionlint)
      build actionlint "$ACTIONLINT_VERSION" github.com/rhysd/actionlint/cmd/actionlint \
        "-s -w -X github.com/rhysd/actionlint.version=$ACTIONLINT_VERSION" ;;
    *) die "unknown tool: $tool" ;;
  esac
done
