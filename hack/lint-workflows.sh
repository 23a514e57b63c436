#!/usr/bin/env bash
# Lint .github/workflows/*.yml with actionlint (built from its Go module by hack/image-tools.sh, cached by
# version). actionlint also runs shellcheck on `run:` scripts when shellcheck is on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
actionlint="$(bash "$ROOT/hack/image-tools.sh" actionlint | tail -n1)"
cd "$ROOT"
"$actionlint" -version | head -n1 >&2
exec "$actionlint" -no-color "$@"
