#!/usr/bin/env bash
# SoftHSM2 (Debian package softhsm2) for the PKCS#11 wrapped-keyring tests
# (tests/test_wrapped_keyring.py, tests/test_root_key_sources.py): a software token behind
# /usr/lib/softhsm/libsofthsm2.so and softhsm2-util. Each test makes its own token folder and
# SOFTHSM2_CONF; nothing is configured here. Idempotent: skipped when already installed.
set -euo pipefail
module=/usr/lib/softhsm/libsofthsm2.so
if [ -f "$module" ] && command -v softhsm2-util >/dev/null 2>&1; then
  echo "softhsm2: already installed ($module)"
  exit 0
fi
start="$(date +%s)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq softhsm2 >/dev/null
[ -f "$module" ] || { echo "softhsm2: $module missing after install" >&2; exit 1; }
echo "softhsm2: installed in $(( $(date +%s) - start ))s"
