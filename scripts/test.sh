#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs and starts everything the tests need
# (scripts/testenv.sh up), checks formatting and lints, runs unit and integration tests, and
# stops the environment again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export THING_OPERATOR_TESTENV="${THING_OPERATOR_TESTENV:-$ROOT/.testenv-ci}"

cleanup() { bash scripts/testenv.sh down "$THING_OPERATOR_TESTENV" || true; }
trap cleanup EXIT

bash scripts/testenv.sh up "$THING_OPERATOR_TESTENV"

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --all-targets --features failpoints -- -D warnings
echo "== cargo test"
cargo test --features failpoints --no-fail-fast -- --test-threads 4
