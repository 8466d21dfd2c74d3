#!/usr/bin/env bash
# Runs the Python client's tests against real freshd servers: creates a
# virtualenv in clients/python/.venv, installs the package with its test
# extra (the build generates the gRPC stubs from proto/), then runs pytest.
#
# The server binary is $FRESHD_BIN, else <repo>/target/debug/freshd, built
# with `cargo build --bin freshd` when missing. Extra arguments go to pytest.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
venv="$here/.venv"

if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -m venv "$venv"; then
    echo "cannot create a virtualenv with $python (on Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
fi

# Reinstall only when the packaging changed; the stubs follow the proto on
# their own (tests/conftest.py regenerates them when it changed).
stamp="$venv/.freshd-installed"
wanted="$(cat "$here/pyproject.toml" "$here/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ] \
   || ! "$venv/bin/python" -c 'import freshd, pytest, grpc_tools, cryptography' >/dev/null 2>&1; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$here[test]"
  echo "$wanted" > "$stamp"
fi

if [ -z "${FRESHD_BIN:-}" ]; then
  bin="${CARGO_TARGET_DIR:-$repo/target}/debug/freshd"
  if [ ! -x "$bin" ]; then
    (cd "$repo" && cargo build --bin freshd)
  fi
  export FRESHD_BIN="$bin"
fi

cd "$here"
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
