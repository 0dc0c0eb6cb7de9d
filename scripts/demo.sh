#!/usr/bin/env bash
# Quick start 1: install what is missing, then run the demo (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
command -v cargo >/dev/null || { echo "demo: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }
exec cargo run --release --example demo -- "$@"
