#!/usr/bin/env bash
# Runs the Java client's tests against real freshd servers: Maven downloads the
# dependencies from Maven Central (protoc and protoc-gen-grpc-java included),
# generates the gRPC stubs from proto/freshd/v1/coordinator.proto into target/,
# compiles, and runs every test with JUnit Jupiter, the conformance scenarios of
# tests/conformance/ among them.
#
# Needs a JDK 17 or newer and Maven 3.8 or newer. The server binary is
# $FRESHD_BIN, else <repo>/target/debug/freshd (or under $CARGO_TARGET_DIR),
# built with `cargo build --bin freshd` when missing. Extra arguments go to
# Maven (say, -Dtest=ConformanceTest).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
repo="$(cd ../.. && pwd)"

if ! command -v mvn >/dev/null 2>&1; then
  echo "Maven is not installed (on Debian: apt-get install maven)" >&2
  exit 1
fi
if ! command -v java >/dev/null 2>&1; then
  echo "no java on PATH (on Debian: apt-get install openjdk-17-jdk-headless)" >&2
  exit 1
fi

if [ -z "${FRESHD_BIN:-}" ]; then
  target="${CARGO_TARGET_DIR:-$repo/target}"
  case "$target" in
    /*) ;;
    *) target="$repo/$target" ;;
  esac
  bin="$target/debug/freshd"
  if [ ! -x "$bin" ]; then
    if ! command -v cargo >/dev/null 2>&1; then
      echo "$bin is missing and cargo is not installed to build it (or set FRESHD_BIN)" >&2
      exit 1
    fi
    (cd "$repo" && cargo build --bin freshd)
  fi
  export FRESHD_BIN="$bin"
fi

exec mvn -B -ntp -T 1 verify "$@"
