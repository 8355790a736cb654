#!/usr/bin/env bash
# The README's test command: installs what is missing, then runs fmt,
# clippy and every test (unit tests and end-to-end tests on real MariaDB,
# etcd and HAProxy).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh --for-tests

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The end-to-end tests start the real binaries, so build them first.
echo "== cargo build"
cargo build --workspace --bins --locked

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# Runs a test command, its output also kept in $log for the summary; a
# failure is remembered, not fatal, so every test still runs.
run_tests() {
    echo "== $*"
    set +e
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" -ne 0 ]; then status=$rc; fi
}

# Unit tests (and doc tests) of every crate but the end-to-end one: fast,
# no stack, run in parallel as cargo does.
run_tests cargo test --workspace --exclude lab-tests --locked --no-fail-fast

# End-to-end tests: each one starts a whole lab (MariaDB, etcd, HAProxy,
# partner-api, the Bs and A), and several measure latency or CPU. On two
# cores two labs at once starve each other, so one test runs at a time:
# cargo runs the test binaries one after another, and --test-threads=1
# serialises the tests inside each. (cargo-nextest's test groups would do
# the same, but serial is all we need and it would be one more tool to
# build on every fresh machine.)
run_tests cargo test -p lab-tests --locked --no-fail-fast -- --test-threads=1

# One summary line over every test binary (cargo prints one per binary,
# the last of which is often an empty doc-test run).
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .* ([0-9]+) failed' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
