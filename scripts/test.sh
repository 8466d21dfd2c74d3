#!/usr/bin/env bash
# Runs every test of the project: the server's unit and integration tests
# (real servers on loopback port 0), lint and formatting checks.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
