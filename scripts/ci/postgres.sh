#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the tests and print its DSN on stdout (the only thing
# printed there; progress goes to stderr).
#
#   CREDENTIAL_BROKER_TEST_PG_DSN="$(bash scripts/ci/postgres.sh)"
#   export CREDENTIAL_BROKER_TEST_PG_DSN
#
# Installs the distribution's `postgresql` package with apt-get when initdb/pg_ctl are absent,
# creates a cluster in a fresh temp dir (owned by the `postgres` user when run as root, since
# the server refuses to run as root), and starts it on a free loopback port with trust auth.
# The cluster is disposable: fsync off, data under $TMPDIR. Stop it with
#   pg_ctl -D <dir> stop -m fast      (the dir is printed on stderr)
set -euo pipefail
log() { echo "postgres.sh: $*" >&2; }

find_bin() {
  local name=$1 found
  if found=$(command -v "$name" 2>/dev/null); then echo "$found"; return 0; fi
  found=$(ls -d /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$found" ]; then echo "$found"; return 0; fi
  return 1
}

if ! find_bin initdb >/dev/null || ! find_bin pg_ctl >/dev/null; then
  log "initdb/pg_ctl not found: installing the distribution's postgresql package"
  if [ "$(id -u)" -ne 0 ]; then log "need root to install packages"; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql >&2
fi
INITDB=$(find_bin initdb)
PG_CTL=$(find_bin pg_ctl)

as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

DATA=$(mktemp -d "${TMPDIR:-/tmp}/cb-pg-XXXXXX")
if [ "$(id -u)" -eq 0 ]; then
  if ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
  chown postgres: "$DATA"
fi
chmod 700 "$DATA"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

log "initdb in $DATA"
as_owner "$INITDB" -D "$DATA/data" -A trust -U postgres -E UTF8 --no-sync >/dev/null
log "starting on 127.0.0.1:$PORT"
as_owner "$PG_CTL" -D "$DATA/data" -l "$DATA/server.log" -w -t 60 \
  -o "-p $PORT -k $DATA -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=300" \
  start >&2
log "running; data dir $DATA/data (stop: $PG_CTL -D $DATA/data stop -m fast)"
echo "host=127.0.0.1 port=$PORT user=postgres dbname=postgres"
