#!/usr/bin/env bash
# Install the Go-built tools the ecosystem checks need, at pinned versions:
#   grpcurl, buf, protoc-gen-go, protoc-gen-go-grpc, and kustomize (renders deploy/kubernetes
#   for the manifest tests where kubectl is not installed), and helm (lint/template of
#   deploy/helm in tests/deploy), and local-kms (the AWS KMS API on loopback for the wrapped
#   keyring tests, tests/test_wrapped_keyring.py); plus the cert-manager Go module, whose CRDs
#   (deploy/crds) the chart tests validate cert-manager objects against
# Everything is built from source with `go install` through the Go module proxy
# (no release-binary downloads). Idempotent: a tool already in GOBIN at the
# pinned version is skipped. Prints what it did and how long each step took.
#
# Usage: scripts/ci/install-tools.sh            # install / verify all tools
#        GOBIN=/some/dir scripts/ci/install-tools.sh
# Afterwards put "$(go env GOPATH)/bin" (or $GOBIN) on PATH.
set -euo pipefail

GRPCURL_VERSION="${GRPCURL_VERSION:-v1.9.4}"
BUF_VERSION="${BUF_VERSION:-v1.75.0}"
PROTOC_GEN_GO_VERSION="${PROTOC_GEN_GO_VERSION:-v1.36.12}"
PROTOC_GEN_GO_GRPC_VERSION="${PROTOC_GEN_GO_GRPC_VERSION:-v1.6.2}"
KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-v5.5.0}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
LOCAL_KMS_VERSION="${LOCAL_KMS_VERSION:-v0.0.0-20260228092603-2a5e92d09ab6}"
CERT_MANAGER_VERSION="${CERT_MANAGER_VERSION:-v1.16.2}"

if ! command -v go >/dev/null 2>&1; then
  echo "install-tools: go is not on PATH; install Go >= 1.26.7 (buf v1.75.0 needs it) first" >&2
  exit 1
fi

# Never silently fetch a different Go toolchain; fail loudly instead.
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
GOBIN_DIR="$(go env GOBIN)"
if [ -z "$GOBIN_DIR" ]; then
  GOBIN_DIR="$(go env GOPATH)/bin"
fi
export GOBIN="$GOBIN_DIR"
mkdir -p "$GOBIN"

# installed_version BIN -> the main module version recorded in the binary, or "".
installed_version() {
  local bin="$GOBIN/$1"
  [ -x "$bin" ] || return 0
  go version -m "$bin" 2>/dev/null | awk '$1 == "mod" { print $3; exit }'
}

install_one() {
  local name="$1" pkg="$2" version="$3"
  local have
  have="$(installed_version "$name")"
  if [ "$have" = "$version" ]; then
    echo "install-tools: $name $version already in $GOBIN, skipped"
    return 0
  fi
  if [ -n "$have" ]; then
    echo "install-tools: $name $have in $GOBIN, replacing with $version"
  fi
  local start end
  start="$(date +%s)"
  go install "$pkg@$version"
  end="$(date +%s)"
  echo "install-tools: installed $name $version into $GOBIN in $((end - start))s"
}

install_one protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO_VERSION"
install_one protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION"
install_one grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl "$GRPCURL_VERSION"
install_one buf github.com/bufbuild/buf/cmd/buf "$BUF_VERSION"
if ! command -v kubectl >/dev/null 2>&1; then
  install_one kustomize sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION"
fi
install_one helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
install_one local-kms github.com/nsmithuk/local-kms "$LOCAL_KMS_VERSION"

# Only the module source (its CRDs), into the module cache; nothing is built.
cm_start="$(date +%s)"
cm_dir="$(go mod download -json "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION" | awk -F'"' '$2 == "Dir" { print $4 }')"
echo "install-tools: cert-manager $CERT_MANAGER_VERSION CRDs in $cm_dir/deploy/crds ($(( $(date +%s) - cm_start ))s)"

case ":$PATH:" in
  *":$GOBIN:"*) ;;
  *) echo "install-tools: note: $GOBIN is not on PATH; add it: export PATH=\"$GOBIN:\$PATH\"" ;;
esac
echo "install-tools: done"
