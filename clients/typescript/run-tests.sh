#!/usr/bin/env bash
# Runs the TypeScript client's whole suite against real freshd servers:
# installs the dependencies from package-lock.json (npm ci), generates the
# gRPC stubs from proto/ (protoc: on Debian, apt-get install
# protobuf-compiler), builds, checks the formatting and the types, then
# runs the tests with Node's test runner.
#
# The server binary is $FRESHD_BIN, else <repo>/target/debug/freshd (or
# under $CARGO_TARGET_DIR), built with `cargo build --bin freshd` when
# missing. The TLS tests make certificates with the openssl command line
# tool and are skipped without it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$here"

for tool in node npm "${PROTOC:-protoc}"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "run-tests.sh: $tool is not installed (protoc: apt-get install protobuf-compiler)" >&2
    exit 1
  fi
done

if [ -z "${FRESHD_BIN:-}" ]; then
  target="${CARGO_TARGET_DIR:-$repo/target}"
  case "$target" in /*) ;; *) target="$repo/$target" ;; esac
  bin="$target/debug/freshd"
  if [ ! -x "$bin" ]; then
    (cd "$repo" && cargo build --bin freshd)
  fi
  export FRESHD_BIN="$bin"
fi

npm ci --no-audit --no-fund
npm run build
npm run format:check
npm run typecheck
npm test
