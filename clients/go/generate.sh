#!/usr/bin/env bash
# Regenerates freshdv1/ from proto/freshd/v1/coordinator.proto.
#
#   ./generate.sh            writes freshdv1/coordinator.pb.go and
#                            freshdv1/coordinator_grpc.pb.go
#   ./generate.sh OUT_DIR    writes them under OUT_DIR/freshdv1 instead
#
# Needs protoc (Debian: apt-get install protobuf-compiler). The two Go
# plugins are installed at the pinned versions below into .tools/.
set -euo pipefail
cd "$(dirname "$0")"

PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.5.1
MODULE=github.com/freshd/freshd/clients/go
PROTO_ROOT=../../proto
PROTO=freshd/v1/coordinator.proto

out=${1:-.}
tools="$PWD/.tools"
mkdir -p "$tools"
if ! "$tools/protoc-gen-go" --version 2>/dev/null | grep -q "${PROTOC_GEN_GO_VERSION}$"; then
  GOBIN="$tools" go install "google.golang.org/protobuf/cmd/protoc-gen-go@${PROTOC_GEN_GO_VERSION}"
fi
if ! "$tools/protoc-gen-go-grpc" --version 2>/dev/null | grep -q "${PROTOC_GEN_GO_GRPC_VERSION#v}$"; then
  GOBIN="$tools" go install "google.golang.org/grpc/cmd/protoc-gen-go-grpc@${PROTOC_GEN_GO_GRPC_VERSION}"
fi
command -v protoc >/dev/null || {
  echo "generate.sh: protoc is missing (Debian: apt-get install protobuf-compiler)" >&2
  exit 1
}

mkdir -p "$out/freshdv1"
mapping="M${PROTO}=${MODULE}/freshdv1;freshdv1"
PATH="$tools:$PATH" protoc \
  --proto_path="$PROTO_ROOT" \
  --go_out="$out" --go_opt="module=${MODULE}" --go_opt="$mapping" \
  --go-grpc_out="$out" --go-grpc_opt="module=${MODULE}" --go-grpc_opt="$mapping" \
  "$PROTO"
