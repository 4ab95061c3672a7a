#!/usr/bin/env bash
# Regenerate internal/gen from proto/ with protoc-gen-go and protoc-gen-go-grpc,
# run through the protoc that ships in Python's grpcio-tools.
#   PYTHON   a Python with grpcio-tools (default: python3)
#   GOBIN    where protoc-gen-go{,-grpc} live (default: $(go env GOPATH)/bin)
#   OUT      output directory (default: this directory; the tests use a temp dir
#            to check that the committed code is up to date)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
proto_root="$(cd "$here/../../proto" && pwd)"
python="${PYTHON:-python3}"
gobin="${GOBIN:-$(go env GOPATH)/bin}"
out="${OUT:-$here}"
module="credentialbroker"
pkg="$module/internal/gen/credentialbroker/v1;credentialbrokerv1"
mkdir -p "$out"
"$python" -m grpc_tools.protoc \
  --plugin=protoc-gen-go="$gobin/protoc-gen-go" \
  --plugin=protoc-gen-go-grpc="$gobin/protoc-gen-go-grpc" \
  -I "$proto_root" \
  --go_out="$out" --go_opt=module="$module" \
  --go_opt="Mcredentialbroker/v1/broker.proto=$pkg" \
  --go-grpc_out="$out" --go-grpc_opt=module="$module" \
  --go-grpc_opt="Mcredentialbroker/v1/broker.proto=$pkg" \
  credentialbroker/v1/broker.proto
