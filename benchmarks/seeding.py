"""Bulk-load sealed credentials straight into a store (not through RPCs), and find PostgreSQL.

Rows are sealed exactly as the vault seals them (same payload, same associated data), so every
loaded credential resolves; SQLite rows go in with executemany, PostgreSQL rows with COPY.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.crypto import EnvelopeCipher
from broker.crypto.envelope import RecordContext
from broker.store.base import CredentialRow
from broker.store.sqlite import SqliteStore

BATCH = 20_000


def sealed_rows(
    cipher: EnvelopeCipher, schema_version: int, upstream_key: str, start: int, stop: int, now: float
) -> list[CredentialRow]:
    rows = []
    for i in range(start, stop):
        user = f"user-{i}"
        payload = json.dumps({"access_token": f"access-{i}", "refresh_token": f"refresh-{i}"}).encode()
        sealed = cipher.seal(payload, RecordContext(schema_version, "credentials", user, upstream_key))
        rows.append(
            CredentialRow(
                user,
                upstream_key,
                "Bearer",
                ("read",),
                now + 86400,
                "connect_flow",
                "connected",
                1,
                cipher.primary_key_id,
                sealed,
                now,
                now,
                now,
            )
        )
    return rows


def bulk_load(store: object, cipher: EnvelopeCipher, upstream_key: str, users: int) -> float:
    """Insert ``users`` credentials (user-0 ...); returns the seconds it took."""
    started = time.perf_counter()
    now = time.time()
    version = store.schema_version  # type: ignore[attr-defined]
    for start in range(0, users, BATCH):
        rows = sealed_rows(cipher, version, upstream_key, start, min(users, start + BATCH), now)
        if isinstance(store, SqliteStore):
            conn = sqlite3.connect(store.path)
            with conn:
                conn.executemany(
                    "INSERT INTO credentials (user_id, upstream_key, token_type, scopes, expires_at, "
                    "obtained_via, status, generation, kek_id, sealed, created_at, updated_at, "
                    "last_refresh_at, last_error, failure_count) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            r.user_id,
                            r.upstream_key,
                            r.token_type,
                            json.dumps(list(r.scopes)),
                            r.expires_at,
                            r.obtained_via,
                            r.status,
                            r.generation,
                            r.kek_id,
                            r.sealed,
                            r.created_at,
                            r.updated_at,
                            r.last_refresh_at,
                            r.last_error,
                            r.failure_count,
                        )
                        for r in rows
                    ],
                )
            conn.close()
        else:
            store.bulk_insert_credentials(rows)  # type: ignore[attr-defined]
    return time.perf_counter() - started


@contextmanager
def postgres_dsn(dsn: str | None) -> Iterator[str]:
    """A fresh schema on ``dsn``, $CREDENTIAL_BROKER_TEST_PG_DSN, or a throwaway cluster."""
    from tests.pgcluster import DSN_ENV, fresh_schema, start_cluster

    dsn = dsn or os.environ.get(DSN_ENV)
    cluster = None
    if not dsn:
        cluster, reason = start_cluster()
        if cluster is None:
            raise SystemExit(f"no PostgreSQL: {reason}")
        dsn = cluster.dsn
    try:
        with fresh_schema(dsn) as schema_dsn:
            yield schema_dsn
    finally:
        if cluster is not None:
            cluster.destroy()
