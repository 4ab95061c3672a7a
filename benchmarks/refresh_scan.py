"""The background refresher's scan cost per tick with many stored credentials, against few.

Two stores are loaded with the same shape of data, one small (``--small``, default 1,000) and
one large (``--large``, default 100,000; use 1,000,000 for the issue's figure):

- ``--due`` credentials (default 200) whose token expires within the next minute (due now);
- 2% that need reconnecting, with long-expired tokens (a scan that does not skip them by index
  would read more of them every day);
- 1% in a backoff after a failure: expired, retry time an hour away;
- the rest expiring evenly over the next 30 days, half of them on a keep-alive upstream.

A tick is what ``BackgroundRefresher.scan`` runs: one ``due_for_refresh`` range scan per
upstream plus one ``idle_for_refresh`` per keep-alive upstream, each bounded by the batch size. The script prints
the median tick time at each size and the ratio large/small (an O(batch) scan stays near 1x; a
full scan would grow with the row count), and the query plans. Rows are loaded straight into
the store with dummy ciphertext: the scan never opens a record.

    python benchmarks/refresh_scan.py [--backend sqlite|postgres|both] [--large 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.clock import ManualClock
from broker.config import BrokerConfig
from broker.refresher import BATCH_SIZE, BackgroundRefresher
from broker.store.base import CredentialRow
from broker.store.sql import _DUE_COLUMNS, _KEPT_ALIVE, _SCHEDULED, REFRESH_DUE
from broker.store.sqlite import SqliteStore

NOW = 1_800_000_000.0
CHUNK = 20_000


def _config() -> BrokerConfig:
    upstream = {
        "url": "https://api.example",
        "auth_broker": {
            "mode": "oauth_connect",
            "token_endpoint": "https://as.example/token",
            "authorization_endpoint": "https://as.example/authorize",
            "client_id": "c",
            "redirect_uri": "https://app.example/cb",
        },
    }
    return BrokerConfig.model_validate(
        {
            "keyring": {"file": "/nonexistent"},
            "upstreams": [
                {**upstream, "name": "a"},
                {**upstream, "name": "b", "refresh_token_idle_seconds": 90 * 86400},
            ],
        }
    )


KEYS = tuple(u.key for u in _config().upstreams)  # the second is the keep-alive upstream


def _rows(count: int, due: int, seed: int) -> list[tuple[CredentialRow, float | None]]:
    rng = random.Random(seed)
    out: list[tuple[CredentialRow, float | None]] = []
    for i in range(count):
        status, retry, last = "connected", None, NOW - rng.uniform(0, 30 * 86400)
        if i < due:
            expires = NOW + rng.uniform(0, 60)
        elif i % 50 == 0:
            status, expires = "needs_reauth", NOW - rng.uniform(0, 365 * 86400)
        elif i % 100 == 1:
            status, expires, retry = "error", NOW - rng.uniform(0, 3600), NOW + 3600
        else:
            expires = NOW + rng.uniform(600, 30 * 86400)
        row = CredentialRow(
            f"user-{i}", KEYS[i % 2], "Bearer", ("read",), expires, "connect_flow", status, 1,
            "k1", b"\x00" * 120, last, last, last,
        )  # fmt: skip
        out.append((row, retry))
    return out


def _load_sqlite(path: Path, count: int, due: int) -> SqliteStore:
    store = SqliteStore(path)
    conn = sqlite3.connect(path)
    rows = _rows(count, due, seed=count)
    with conn:
        for start in range(0, len(rows), CHUNK):
            conn.executemany(
                "INSERT INTO credentials (user_id, upstream_key, token_type, scopes, expires_at, "
                "obtained_via, status, generation, kek_id, sealed, created_at, updated_at, "
                "last_refresh_at, next_attempt_at, failure_count) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                [(*_values(r), retry) for r, retry in rows[start : start + CHUNK]],
            )
    conn.execute("ANALYZE")
    conn.close()
    return store


def _values(r: CredentialRow) -> tuple[Any, ...]:
    return (
        r.user_id, r.upstream_key, r.token_type, json.dumps(list(r.scopes)), r.expires_at,
        r.obtained_via, r.status, r.generation, r.kek_id, r.sealed, r.created_at, r.updated_at,
        r.last_refresh_at,
    )  # fmt: skip


def _load_postgres(dsn: str, count: int, due: int) -> Any:
    from broker.store.postgres import PostgresStore

    store = PostgresStore(dsn, pool_size=2)
    rows = _rows(count, due, seed=count)
    for start in range(0, len(rows), CHUNK):
        store.bulk_insert_credentials([r for r, _ in rows[start : start + CHUNK]])
    with store.pool.connection() as conn:
        conn.execute("UPDATE credentials SET next_attempt_at = %s WHERE status = 'error'", (NOW + 3600,))
        conn.execute("ANALYZE credentials")
    return store


def _tick_seconds(store: Any, rounds: int) -> tuple[float, int]:
    refresher = BackgroundRefresher(_config(), store, None, ManualClock(NOW))  # type: ignore[arg-type]

    async def ticks() -> tuple[list[float], int]:
        times, found = [], 0
        for _ in range(rounds):
            started = time.perf_counter()
            found = len(await refresher.scan(NOW))
            times.append(time.perf_counter() - started)
        return times, found

    times, found = asyncio.run(ticks())
    return statistics.median(times), found


def _plans(store: Any, backend: str) -> list[str]:
    due = (
        f"SELECT {_DUE_COLUMNS} FROM credentials WHERE {_SCHEDULED} AND upstream_key = ? "
        f"AND {REFRESH_DUE} <= ? AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
        f"ORDER BY {REFRESH_DUE} LIMIT ?"
    )
    idle = (
        f"SELECT {_DUE_COLUMNS} FROM credentials WHERE {_KEPT_ALIVE} AND upstream_key = ? "
        "AND last_refresh_at <= ? AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
        "ORDER BY last_refresh_at LIMIT ?"
    )
    params: list[tuple[Any, ...]] = [
        (KEYS[0], NOW + 300, NOW, BATCH_SIZE),
        (KEYS[1], NOW - 80 * 86400, NOW, BATCH_SIZE),
    ]
    out = []
    for query, args in zip((due, idle), params, strict=True):
        if backend == "sqlite":
            conn = sqlite3.connect(store.path)
            out += [
                " ".join(str(c) for c in r[3:]) for r in conn.execute("EXPLAIN QUERY PLAN " + query, args)
            ]
            conn.close()
        else:
            with store.pool.connection() as conn:
                rows = conn.execute("EXPLAIN " + query.replace("?", "%s"), args).fetchall()
                out += [str(r[0]).strip() for r in rows if "Scan" in str(r[0]) or "Index" in str(r[0])]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--due", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--dsn", default=None, help="PostgreSQL server (default: the test server)")
    args = parser.parse_args()
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    print(f"scan cost per tick: batch {BATCH_SIZE}, {args.due} due, median of {args.rounds} ticks")
    print(f"{'backend':<9} {'rows':>10} {'load s':>8} {'tick ms':>9} {'found':>6}")
    for backend in backends:
        results = {}
        for size in (args.small, args.large):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                if backend == "sqlite":
                    store: Any = _load_sqlite(Path(tmp) / "broker.db", size, args.due)
                    seconds, found = _tick_seconds(store, args.rounds)
                    plans = _plans(store, backend)
                    loaded = time.perf_counter() - started
                    store.close()
                else:
                    from benchmarks.seeding import postgres_dsn

                    with postgres_dsn(args.dsn) as dsn:
                        store = _load_postgres(dsn, size, args.due)
                        seconds, found = _tick_seconds(store, args.rounds)
                        plans = _plans(store, backend)
                        loaded = time.perf_counter() - started
                        store.close()
            results[size] = seconds
            print(f"{backend:<9} {size:>10} {loaded:>8.1f} {seconds * 1000:>9.3f} {found:>6}")
        print(
            f"{backend:<9} ratio {args.large}/{args.small}: {results[args.large] / results[args.small]:.2f}x"
        )
        for plan in plans:
            print(f"{backend:<9} plan: {plan}")


if __name__ == "__main__":
    main()
