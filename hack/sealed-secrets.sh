#!/usr/bin/env bash
# Build (or reuse) the Sealed Secrets controller and kubeseal from Go modules.
#
# Usage: hack/sealed-secrets.sh [--print-bin-dir] [--force]
#   --print-bin-dir  print the bin dir and exit without building anything.
#   --force          rebuild even if the binaries are present.
#
# Output: progress and timing on stderr; the LAST line on stdout is the bin dir:
#   BIN_DIR="$(hack/sealed-secrets.sh | tail -n1)"
#
# Cache layout (outside the repo, keyed by version):
#   ${SMTPOAUTH_TOOLS_DIR:-$HOME/.cache/smtp-oauth-operator/k8s}/
#     sealed-secrets-v0.40.0/bin/{controller,kubeseal}
#
# Module path: github.com/bitnami/sealed-secrets (the module declares that path since the
# repository moved; the old github.com/bitnami-labs/sealed-secrets path is only served by the
# module proxy up to v0.27.1). The proxy refuses to list the versions of the new path
# (403 on /@v/list) but serves single tags; v0.40.0 is the newest one it serves
# (v0.40.1, v0.40.2, v0.41.0, v0.39.1, v0.33.1, v0.32.2 and v0.30.0 answered 403 on
# 2026-11-28). Its go.mod has no replace directives, but the checksum database has no entry
# for it (checksum database lookup: 404 Not Found), so `go install pkg@v0.40.0` refuses with
# "verifying module: ... 404 Not Found". We therefore build from the wrapper module
# hack/sealed-secrets/ whose committed go.sum pins the module's hash (recorded once with
# GONOSUMDB=github.com/bitnami/sealed-secrets go mod tidy; every dependency was verified against
# the checksum database as usual). With the go.sum present no checksum-database lookup is needed;
# a module zip with another hash fails the build. The wrapper requires only sealed-secrets,
# so minimal version selection yields exactly the dependency versions of its own go.mod.
#
# The SealedSecret CRD comes with the module: after a build it is at
#   $(go env GOMODCACHE)/github.com/bitnami/sealed-secrets@v0.40.0/helm/sealed-secrets/crds/
# (`--print-crd` prints its path.)
set -euo pipefail

SEALED_SECRETS_VERSION="v0.40.0"   # must match hack/sealed-secrets/go.mod
MODULE="github.com/bitnami/sealed-secrets"

TOOLS_DIR="${SMTPOAUTH_TOOLS_DIR:-$HOME/.cache/smtp-oauth-operator/k8s}"
BIN_DIR="$TOOLS_DIR/sealed-secrets-$SEALED_SECRETS_VERSION/bin"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WRAPPER="$ROOT/hack/sealed-secrets"

log() { printf '[sealed-secrets %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

force=0
print_crd=0
while [ $# -gt 0 ]; do
  case "$1" in
    --print-bin-dir) echo "$BIN_DIR"; exit 0 ;;
    --print-crd) print_crd=1 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

command -v go >/dev/null || die "go not found in PATH (Go >= 1.26.8 is required by sealed-secrets $SEALED_SECRETS_VERSION)"
grep -qE "$MODULE $SEALED_SECRETS_VERSION( |\$)" "$WRAPPER/go.mod" \
  || die "$WRAPPER/go.mod does not require $MODULE $SEALED_SECRETS_VERSION"

if [ "$print_crd" = 1 ]; then
  moddir="$(go env GOMODCACHE)/$MODULE@$SEALED_SECRETS_VERSION"
  if [ ! -d "$moddir" ]; then
    (cd "$WRAPPER" && GOWORK=off go mod download "$MODULE") >&2
  fi
  crd="$(find "$moddir" -path '*crds*' -name '*.yaml' | sort | head -n1)"
  [ -n "$crd" ] || die "no CRD yaml under $moddir"
  echo "$crd"
  exit 0
fi

mkdir -p "$BIN_DIR"
exec 9>"$BIN_DIR/.lock"
if ! flock -n 9; then
  log "another build holds $BIN_DIR/.lock; waiting"
  flock 9
fi

export CGO_ENABLED=0 GOWORK=off GOFLAGS="-buildvcs=false"
# The controller and kubeseal print this version (`--version`); upstream sets it the same way.
LDFLAGS="-s -w -X main.VERSION=$SEALED_SECRETS_VERSION"
GO_VERSION="$(go env GOVERSION)"
stamp="$({ echo "$MODULE $SEALED_SECRETS_VERSION $LDFLAGS $GO_VERSION"; cat "$WRAPPER/go.mod" "$WRAPPER/go.sum"; } | sha256sum | cut -c1-16)"

total_start=$(date +%s)
for tool in controller kubeseal; do
  out="$BIN_DIR/$tool"
  if [ "$force" = 0 ] && [ -x "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null || true)" = "$stamp" ]; then
    log "$tool: cached ($out)"
    continue
  fi
  log "$tool: building $MODULE/cmd/$tool ($SEALED_SECRETS_VERSION) ..."
  start=$(date +%s)
  rm -f "$out.tmp"
  (cd "$WRAPPER" && go build -trimpath -ldflags "$LDFLAGS" -o "$out.tmp" "$MODULE/cmd/$tool")
  mv -f "$out.tmp" "$out"
  echo "$stamp" > "$out.stamp"
  log "$tool: built in $(( $(date +%s) - start ))s ($(du -h "$out" | cut -f1), $out)"
done
log "done in $(( $(date +%s) - total_start ))s: $BIN_DIR"
echo "$BIN_DIR"
