#!/usr/bin/env bash
# Install the real browser the hosted connect tests drive (tests/test_connect_browser.py):
# Debian's chromium and chromium-driver (headless Chromium through Selenium). Idempotent: when
# both are installed already, nothing is fetched. Prints the versions it found.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null
fi
chromium --version 2>/dev/null | grep -v '^/usr/bin/chromium: ' || true
chromedriver --version
