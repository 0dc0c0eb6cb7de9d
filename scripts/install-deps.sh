#!/usr/bin/env bash
# Installs the system packages sockmap-fastpath needs to build and test.
# Idempotent: packages already present are not reinstalled.
# Usage: scripts/install-deps.sh [extra-debian-package ...]
set -euo pipefail

need=(clang-19 llvm-19 libelf-dev zlib1g-dev pkg-config make gcc libc6-dev iproute2 bpftool "$@")
missing=()
for pkg in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages: ${missing[*]}; run as root or install them yourself" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
