#!/usr/bin/env bash
# Build (or reuse) a real Kubernetes control plane's binaries from Go modules:
#   etcd, kube-apiserver, kubectl, helm (+ optional kube-controller-manager).
#
# Usage: hack/k8s-tools.sh [--print-bin-dir] [--force] [TOOL...]
#   TOOL is any of: etcd kube-apiserver kubectl helm kube-controller-manager
#   (default: etcd kube-apiserver kubectl helm; "all" adds kube-controller-manager).
#   --print-bin-dir  print the bin dir and exit without building anything.
#   --force          rebuild the named tools even if they are present.
#
# Output: progress and per-tool timing on stderr; the LAST line on stdout is the
# bin dir holding all tools, so callers can do:
#   BIN_DIR="$(hack/k8s-tools.sh | tail -n1)"
#
# Cache layout (outside the repo, keyed by version):
#   ${SMTPOAUTH_TOOLS_DIR:-$HOME/.cache/smtp-oauth-operator/k8s}/
#     v1.36.3/bin/{kube-apiserver,kubectl,kube-controller-manager}   real files
#     v1.36.3/bin/etcd -> ../../etcd-v3.6.8/bin/etcd                  symlink
#     v1.36.3/bin/helm -> ../../helm-v3.22.0/bin/helm                 symlink
# A binary is reused when it exists and its stamp (a hash of the wrapper
# go.mod/go.sum, Go version and build flags) matches; otherwise it is rebuilt.
# Go's module and build caches stay at their defaults (~/go/pkg/mod, ~/.cache/go-build).
set -euo pipefail

K8S_VERSION="v1.36.3"   # must match hack/k8s/apiserver/go.mod
ETCD_VERSION="v3.6.8"   # must match hack/k8s/etcd/go.mod (k8s v1.36.3 uses etcd client v3.6.8)
HELM_VERSION="v3.22.0"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${SMTPOAUTH_TOOLS_DIR:-$HOME/.cache/smtp-oauth-operator/k8s}"
BIN_DIR="$TOOLS_DIR/$K8S_VERSION/bin"
ETCD_DIR="$TOOLS_DIR/etcd-$ETCD_VERSION/bin"
HELM_DIR="$TOOLS_DIR/helm-$HELM_VERSION/bin"

log() { printf '[k8s-tools %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

force=0
tools=()
while [ $# -gt 0 ]; do
  case "$1" in
    --print-bin-dir) echo "$BIN_DIR"; exit 0 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    all) tools+=(etcd kube-apiserver kubectl helm kube-controller-manager) ;;
    etcd|kube-apiserver|kubectl|helm|kube-controller-manager) tools+=("$1") ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done
[ ${#tools[@]} -gt 0 ] || tools=(etcd kube-apiserver kubectl helm)

command -v go >/dev/null || die "go not found in PATH (Go >= 1.26 is required)"

# Sanity: the versions above must be the ones the wrapper modules pin.
grep -qE "k8s.io/kubernetes $K8S_VERSION( |\$)" "$ROOT/hack/k8s/apiserver/go.mod" \
  || die "hack/k8s/apiserver/go.mod does not require k8s.io/kubernetes $K8S_VERSION"
grep -qE "go.etcd.io/etcd/server/v3 $ETCD_VERSION( |\$)" "$ROOT/hack/k8s/etcd/go.mod" \
  || die "hack/k8s/etcd/go.mod does not require go.etcd.io/etcd/server/v3 $ETCD_VERSION"

mkdir -p "$BIN_DIR" "$ETCD_DIR" "$HELM_DIR"

# One build at a time per cache (pytest and a developer shell may race).
exec 9>"$TOOLS_DIR/.lock"
if ! flock -n 9; then
  log "another k8s-tools.sh holds $TOOLS_DIR/.lock; waiting"
  flock 9
fi

export CGO_ENABLED=0 GOWORK=off
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"
GO_VERSION="$(go env GOVERSION)"

k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
K8S_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  K8S_LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
  K8S_LDFLAGS+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit=gomod-$K8S_VERSION"
done
ETCD_LDFLAGS="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=gomod-$ETCD_VERSION"
# helm reads its own version and the default Kubernetes version for
# `helm template`/lint from these variables (as its Makefile sets them).
HELM_LDFLAGS="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
HELM_LDFLAGS+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
# helm v3.22.0's go.mod uses k8s.io/client-go v0.37.0 -> default capabilities v1.37.
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  HELM_LDFLAGS+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=37"
done

stamp_of() { # tool -> hash of everything its binary depends on
  local tool="$1" mod
  case "$tool" in
    etcd) mod="$ROOT/hack/k8s/etcd"; { echo "$ETCD_VERSION $ETCD_LDFLAGS"; cat "$mod/go.mod" "$mod/go.sum"; } ;;
    helm) echo "$HELM_VERSION $HELM_LDFLAGS" ;;
    *) mod="$ROOT/hack/k8s/apiserver"; { echo "$tool $K8S_VERSION $K8S_LDFLAGS"; cat "$mod/go.mod" "$mod/go.sum"; } ;;
  esac | { cat; echo "$GO_VERSION"; } | sha256sum | cut -c1-16
}

build_one() { # tool
  local tool="$1" dir out stamp start secs
  case "$tool" in
    etcd) dir="$ETCD_DIR" ;;
    helm) dir="$HELM_DIR" ;;
    *) dir="$BIN_DIR" ;;
  esac
  out="$dir/$tool"
  stamp="$(stamp_of "$tool")"
  if [ "$force" = 0 ] && [ -x "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null || true)" = "$stamp" ]; then
    log "$tool: cached ($out)"
    return 0
  fi
  log "$tool: building ..."
  start=$(date +%s)
  rm -f "$out.tmp"
  case "$tool" in
    etcd)
      (cd "$ROOT/hack/k8s/etcd" && go build -trimpath -ldflags "$ETCD_LDFLAGS" -o "$out.tmp" go.etcd.io/etcd/server/v3) ;;
    helm)
      # Separate `go install` (module mode, outside any wrapper) so that minimal
      # version selection does not mix helm's k8s.io/* versions with ours.
      mkdir -p "$dir/.gobin"
      (cd "$dir" && GOBIN="$dir/.gobin" go install -trimpath -ldflags "$HELM_LDFLAGS" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
      mv "$dir/.gobin/helm" "$out.tmp"; rmdir "$dir/.gobin" ;;
    *)
      (cd "$ROOT/hack/k8s/apiserver" && go build -trimpath -ldflags "$K8S_LDFLAGS" -o "$out.tmp" "k8s.io/kubernetes/cmd/$tool") ;;
  esac
  mv -f "$out.tmp" "$out"
  echo "$stamp" > "$out.stamp"
  secs=$(( $(date +%s) - start ))
  log "$tool: built in ${secs}s ($(du -h "$out" | cut -f1), $out)"
}

total_start=$(date +%s)
for t in "${tools[@]}"; do
  build_one "$t"
done
# The bin dir holds every tool; etcd and helm are versioned on their own.
ln -sfn "../../etcd-$ETCD_VERSION/bin/etcd" "$BIN_DIR/etcd"
ln -sfn "../../helm-$HELM_VERSION/bin/helm" "$BIN_DIR/helm"
log "done in $(( $(date +%s) - total_start ))s: $BIN_DIR"
echo "$BIN_DIR"
