#!/usr/bin/env bash
# Install the Debian packages that building and running the image need, when missing:
#   mmdebstrap (the base), binutils (strip), umoci (unpack) and runc (run; e2e/test_image.py),
#   and shellcheck, which actionlint runs on the workflows' scripts (make lint).
# Called by `make bootstrap`. Without root or apt-get it only says what is missing (the image test then
# skips with that reason, and actionlint runs without shellcheck).
set -euo pipefail

declare -A PACKAGE_OF=([mmdebstrap]=mmdebstrap [strip]=binutils [umoci]=umoci [runc]=runc [shellcheck]=shellcheck)
missing=()
for tool in "${!PACKAGE_OF[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PACKAGE_OF[$tool]}")
done
[ ${#missing[@]} -gt 0 ] || exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort)

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[image-debs] not installed: ${missing[*]} (needs root and apt-get); the image e2e test will skip" >&2
  exit 0
fi
echo "[image-debs] apt-get install ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
