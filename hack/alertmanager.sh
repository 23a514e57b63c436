#!/usr/bin/env bash
# Build (or reuse) Prometheus Alertmanager from its Go module, for the relay's end-to-end test.
#
# Usage: hack/alertmanager.sh [--print-bin] [--force]
# The LAST line on stdout is the path of the binary. Cached by version (and Go version) under
#   ${SMTPOAUTH_TOOLS_DIR:-$HOME/.cache/smtp-oauth-operator}/alertmanager-<version>/bin/alertmanager
#
# `go install github.com/prometheus/alertmanager/cmd/alertmanager@<version>` fails: ui/web.go embeds
# ui/app/dist, which the module zip does not ship (it is built by npm in the release process). So the
# module is downloaded, copied to a writable directory, given a placeholder ui/app/dist/index.html (the
# web UI is not used; the API is) and built there with the version stamped as the releases do.
set -euo pipefail

AM_VERSION="v0.35.0"
TOOLS_DIR="${SMTPOAUTH_TOOLS_DIR:-$HOME/.cache/smtp-oauth-operator}"
OUT_DIR="$TOOLS_DIR/alertmanager-$AM_VERSION"
BIN="$OUT_DIR/bin/alertmanager"

log() { printf '[alertmanager %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --print-bin) echo "$BIN"; exit 0 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done

command -v go >/dev/null || die "go not found in PATH"
mkdir -p "$OUT_DIR/bin"
exec 9>"$OUT_DIR/.lock"
if ! flock -n 9; then
  log "another build holds $OUT_DIR/.lock; waiting"
  flock 9
fi

GO_VERSION="$(go env GOVERSION)"
STAMP="$AM_VERSION $GO_VERSION placeholder-ui"
if [ "$force" = 0 ] && [ -x "$BIN" ] && [ "$(cat "$OUT_DIR/.stamp" 2>/dev/null)" = "$STAMP" ]; then
  echo "$BIN"
  exit 0
fi

export CGO_ENABLED=0 GOWORK=off GOFLAGS="${GOFLAGS:-} -buildvcs=false"
started=$(date +%s)
log "downloading github.com/prometheus/alertmanager@$AM_VERSION"
dir="$(go mod download -json "github.com/prometheus/alertmanager@$AM_VERSION" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
[ -d "$dir" ] || die "go mod download gave no directory"

work="$(mktemp -d)"
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cp -r "$dir/." "$work/src"
chmod -R u+w "$work/src"
mkdir -p "$work/src/ui/app/dist"
printf '<!doctype html><title>Alertmanager</title><p>UI not built (API only).</p>\n' \
  >"$work/src/ui/app/dist/index.html"

pkg=github.com/prometheus/common/version
ldflags="-s -w -X $pkg.Version=${AM_VERSION#v} -X $pkg.Revision=gomod-$AM_VERSION -X $pkg.Branch=HEAD"
ldflags+=" -X $pkg.BuildUser=smtp-oauth-operator -X $pkg.BuildDate=module"
log "building ./cmd/alertmanager"
(cd "$work/src" && go build -trimpath -ldflags "$ldflags" -o "$BIN.tmp" ./cmd/alertmanager)
mv "$BIN.tmp" "$BIN"
echo "$STAMP" >"$OUT_DIR/.stamp"
log "built in $(( $(date +%s) - started )) s: $("$BIN" --version 2>&1 | head -n1)"
echo "$BIN"
