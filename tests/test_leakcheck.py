"""The leak check itself finds what it is meant to find."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from broker.logs import fields, get_logger
from tests import leakcheck


def test_leak_check_finds_planted_secrets(tmp_path: Path) -> None:
    secret = "rt_" + "planted-secret-value"
    get_logger().warning("oops", extra=fields(detail=f"token {secret}"))
    db = tmp_path / "x.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (v TEXT)")
    conn.execute("INSERT INTO t VALUES (?)", ("kek-in-the-clear-0123",))
    conn.commit()
    conn.close()
    leakcheck.add_secret("kek-in-the-clear-0123")
    leakcheck.observe_status("bad thing", {"authorization_url": f"https://x/?state={secret}"})
    found = leakcheck.check([tmp_path], [secret])
    assert any(f.startswith("log WARNING") for f in found)
    assert any(f.startswith("x.db") for f in found)
    assert not any(f.startswith("error returned") for f in found)  # authorization_url is exempt
    assert all(secret not in f for f in found)
    leakcheck.reset()
    db.unlink()


def test_leak_check_finds_a_secret_in_a_postgresql_schema(pg_server_dsn: str) -> None:
    import psycopg

    from tests.pgcluster import fresh_schema

    secret = "rt_" + "planted-in-postgres-value"
    with fresh_schema(pg_server_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE credentials (v text, b bytea)")
        conn.execute("INSERT INTO credentials VALUES ('clear', %s)", (b"\x00raw " + secret.encode(),))
    found = leakcheck.check([], [secret])  # the schema was dumped before it was dropped
    assert any(f.startswith("PostgreSQL schema t_") for f in found), found
    assert all(secret not in f for f in found)
    leakcheck.reset()
