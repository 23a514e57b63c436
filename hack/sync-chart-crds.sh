#!/usr/bin/env bash
# Copy the canonical CRDs (crds/) into the chart (charts/smtp-oauth-operator/files/crds/), byte for byte.
# Run after editing crds/; tests/unit/test_chart_crds.py fails until the copies match.
# Usage: hack/sync-chart-crds.sh [--check]   (--check: change nothing, exit 1 if the copy differs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/crds"
DST="$ROOT/charts/smtp-oauth-operator/files/crds"

if [ "${1:-}" = "--check" ]; then
  if diff -r "$SRC" "$DST" >&2; then
    echo "chart CRDs match crds/" >&2
    exit 0
  fi
  echo "chart CRDs differ from crds/: run hack/sync-chart-crds.sh" >&2
  exit 1
fi

mkdir -p "$DST"
# Remove copies of CRDs that no longer exist, then copy (cp keeps the bytes; no templating here).
for f in "$DST"/*.yaml; do
  [ -e "$f" ] || continue
  [ -e "$SRC/$(basename "$f")" ] || rm -v -- "$f" >&2
done
cp -v -- "$SRC"/*.yaml "$DST"/ >&2
