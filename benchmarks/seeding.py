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

from broker.models import Credential, Secrets
from broker.store.base import CredentialRow
from broker.store.sqlite import SqliteStore
from broker.vault import CredentialVault

BATCH = 20_000


def sealed_rows(
    vault: CredentialVault, upstream_key: str, start: int, stop: int, now: float
) -> list[CredentialRow]:
    """Rows for user-<start> .. user-<stop-1>, sealed by the vault itself."""
    return [
        vault.seal_credential(
            Credential(
                f"user-{i}",
                upstream_key,
                Secrets(f"access-{i}", f"refresh-{i}"),
                "Bearer",
                ("read",),
                now + 86400,
                "connect_flow",
                now,
            ),
            now,
        )
        for i in range(start, stop)
    ]


def bulk_load(store: object, vault: CredentialVault, upstream_key: str, users: int) -> float:
    """Insert ``users`` credentials (user-0 ...); returns the seconds it took."""
    started = time.perf_counter()
    now = time.time()
    for start in range(0, users, BATCH):
        insert_rows(store, sealed_rows(vault, upstream_key, start, min(users, start + BATCH), now))
    return time.perf_counter() - started


def insert_rows(store: object, rows: list[CredentialRow]) -> None:
    """Insert new sealed rows in one transaction (executemany on SQLite, COPY on PostgreSQL)."""
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
