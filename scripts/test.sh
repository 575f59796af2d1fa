#!/usr/bin/env bash
# The project's test command (README, CI): installs what is missing, checks
# formatting and lints, then runs every test. Root tests need root: run as
# root (sudo); they fail, never skip, without it.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

echo "== format and lint"
cargo fmt --all --check
clang-format --dry-run --Werror bpf/*.bpf.c bpf/lib/*.h include/meshpath/*.h
cargo clippy --all-targets --locked -- -D warnings

echo "== tests (unit, integration as root, examples and benches built)"
cargo test --locked
cargo bench --locked --no-run
