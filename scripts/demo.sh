#!/usr/bin/env bash
# The main demo (README): an echo server and client in a private cgroup,
# with and without the short-circuit. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo run --release --locked --example shortcircuit
