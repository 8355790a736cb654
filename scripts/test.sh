#!/usr/bin/env bash
# The README's test command: installs what is missing, then runs fmt,
# clippy and every test (unit tests and end-to-end tests on real MariaDB,
# etcd and HAProxy).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The end-to-end tests start the real binaries, so build them first.
echo "== cargo build"
cargo build --workspace --bins --locked

echo "== cargo test"
cargo test --workspace --locked --no-fail-fast
