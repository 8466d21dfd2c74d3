#!/usr/bin/env bash
# Runs the Go client's tests against real freshd servers: downloads the
# module's dependencies, checks that freshdv1/ is what ./generate.sh makes
# from proto/freshd/v1/coordinator.proto (needs protoc: on Debian,
# apt-get install protobuf-compiler), then runs gofmt, go vet and go test
# (with the race detector when cgo and a C compiler are there; set
# FRESHD_GO_RACE=0 to skip it).
#
# The server binary is $FRESHD_BIN, else <repo>/target/debug/freshd (or under
# $CARGO_TARGET_DIR), built with `cargo build --bin freshd` when missing.
# Extra arguments go to go test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# One package built at a time: the machines running this are small.
export GOFLAGS="${GOFLAGS:-} -p=1"

go mod download
go mod verify >/dev/null

# The committed generated code must match the proto. The protoc version line
# of the headers is left out of the comparison.
generated="$(mktemp -d)"
trap 'rm -rf "$generated"' EXIT
./generate.sh "$generated"
for file in coordinator.pb.go coordinator_grpc.pb.go; do
  if ! diff -u \
      <(grep -Ev '^// (	|- )protoc +v' "freshdv1/$file") \
      <(grep -Ev '^// (	|- )protoc +v' "$generated/freshdv1/$file"); then
    echo "freshdv1/$file is not what ./generate.sh makes from the proto: run ./generate.sh" >&2
    exit 1
  fi
done

unformatted="$(gofmt -l .)"
if [ -n "$unformatted" ]; then
  echo "not gofmt-formatted:" >&2
  echo "$unformatted" >&2
  exit 1
fi
go vet ./...

race=()
if [ "${FRESHD_GO_RACE:-1}" != 0 ] && [ "$(go env CGO_ENABLED)" = 1 ] \
   && command -v "$(go env CC)" >/dev/null 2>&1; then
  race=(-race)
fi
go test "${race[@]}" -count=1 -timeout 10m "$@" ./...
