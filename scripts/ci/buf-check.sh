#!/usr/bin/env bash
# Contract checks for proto/:
#   1. buf lint   (rules in buf.yaml: STANDARD except SERVICE_SUFFIX)
#   2. buf breaking against the last released contract, a committed buf image
#      under proto/released/ (the highest vX.Y.Z.binpb; override with BUF_BASELINE).
#
# Usage: scripts/ci/buf-check.sh [WORKSPACE_DIR]
#   WORKSPACE_DIR holds buf.yaml and proto/ (default: this repository). The
#   tests point it at a modified temp copy to prove that breaking changes fail.
#
# Cutting a release: after tagging vX.Y.Z, record its contract with
#   buf build proto -o proto/released/vX.Y.Z.binpb
# and commit the image; later changes are then checked against it.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
workspace="$(cd "${1:-$repo}" && pwd)"

if ! command -v buf >/dev/null 2>&1; then
  echo "buf-check: buf is not on PATH (run scripts/ci/install-tools.sh and add GOBIN to PATH)" >&2
  exit 127
fi

baseline="${BUF_BASELINE:-}"
if [ -z "$baseline" ]; then
  baseline="$(find "$repo/proto/released" -maxdepth 1 -name 'v*.binpb' 2>/dev/null | sort -V | tail -n 1)"
fi
if [ -z "$baseline" ] || [ ! -f "$baseline" ]; then
  echo "buf-check: no released contract image found under $repo/proto/released" >&2
  exit 2
fi

cd "$workspace"
echo "buf-check: buf lint ($workspace)"
buf lint
echo "buf-check: buf breaking proto --against ${baseline#"$repo"/}"
buf breaking proto --against "$baseline"
echo "buf-check: OK"
