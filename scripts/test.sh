#!/usr/bin/env bash
# Runs every test of the project: formatting, lint and rustdoc checks, the
# server's unit and integration tests (real servers on loopback port 0), then
# the client libraries' suites, which run the conformance scenarios against
# real servers.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  echo "promtool is missing: install Debian's prometheus package (apt-get install prometheus)," >&2
  echo "or run .ci/run, which installs it." >&2
  exit 1
fi

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server is missing: the load tool's tests run its Redis side against a real one" >&2
  echo "(apt-get install redis-server), or run .ci/run, which installs it." >&2
  exit 1
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The public API's docs: every link resolves and none points at a private item.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
cargo test --workspace --locked
clients/python/run-tests.sh
