#!/usr/bin/env bash
# Debian packages the tests use as real, independent SMTP clients of the relay: swaks and msmtp.
# Installed with apt-get only when missing (called from `make bootstrap`); without root or apt-get it
# says what to install and exits 0, and the tests that need a client skip with that message.
set -euo pipefail

missing=()
command -v swaks >/dev/null 2>&1 || missing+=(swaks)
command -v msmtp >/dev/null 2>&1 || missing+=(msmtp)
# swaks does STARTTLS through these Perl modules (only "recommended" by its package).
perl -MNet::SSLeay -MIO::Socket::SSL -e 1 >/dev/null 2>&1 || missing+=(libnet-ssleay-perl libio-socket-ssl-perl)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "hack/debian-packages.sh: please install ${missing[*]} (Debian/Ubuntu: apt-get install -y ${missing[*]})" >&2
  exit 0
fi
# msmtp's package asks about an AppArmor profile; answer non-interactively.
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
  apt-get update >/dev/null
  apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
fi
