#!/usr/bin/env bash
# Runs every test of the project: formatting, lint and rustdoc checks, the
# server's unit and integration tests (real servers on loopback port 0), then
# the client libraries' suites (Python, Go, TypeScript, Java), which run the
# conformance scenarios against real servers.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  echo "promtool is missing: install Debian's prometheus package (apt-get install prometheus)," >&2
  echo "or run .ci/run, which installs it." >&2
  exit 1
fi

if ! command -v protoc >/dev/null 2>&1; then
  echo "protoc is missing: the Go client's generated-code check and the TypeScript client's build" >&2
  echo "use it (apt-get install protobuf-compiler), or run .ci/run, which installs it." >&2
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
# The clients' suites start the server binary the tests above built
# (target/debug/freshd).
clients/python/run-tests.sh
clients/go/run-tests.sh
clients/typescript/run-tests.sh
clients/java/run-tests.sh
