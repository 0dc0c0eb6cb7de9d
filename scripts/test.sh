#!/usr/bin/env bash
# Quick start 2: install what is missing, then run every test (needs root:
# the tests load the real BPF programs into child cgroups they create).
# With CI=true a privileged test that cannot run fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
command -v cargo >/dev/null || { echo "test: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }
exec cargo test --release "$@"
