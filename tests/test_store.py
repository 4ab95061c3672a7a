"""Store and vault on both backends (SQLite, PostgreSQL): CAS, pending flow bounds, no plaintext;
plus SQLite's own schema, WAL and file mode."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from broker.crypto import EnvelopeCipher
from broker.crypto.keyring import Keyring, new_key_entry
from broker.errors import DecryptionError, KeyringError, StoreError
from broker.key_checks import StoreKeyCheck
from broker.models import Credential, PendingFlow, Secrets
from broker.store import SCHEMA_VERSION, SqliteStore
from broker.store.base import CRED_COLUMNS
from broker.vault import CredentialVault


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "postgres":
        from broker.store.postgres import PostgresStore

        s: Any = PostgresStore(request.getfixturevalue("pg_dsn"), pool_size=4)
    else:
        s = SqliteStore(tmp_path / "data" / "broker.db")
    yield s
    s.close()


sqlite_only = pytest.mark.parametrize("store", ["sqlite"], indirect=True)


def _raw(store: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """SQL straight against the backend's database (``?`` placeholders)."""
    if isinstance(store, SqliteStore):
        conn = sqlite3.connect(store.path)
        try:
            rows = conn.execute(sql, params).fetchall()
            conn.commit()
            return rows
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(store._dsn, autocommit=True) as conn:
        cursor = conn.execute(sql.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description else []


def _raw_bytes(store: Any) -> bytes:
    """Every byte the backend stores: SQLite's files, or every value in PostgreSQL's tables."""
    if isinstance(store, SqliteStore):
        return b"".join(p.read_bytes() for p in store.path.parent.iterdir() if p.name.startswith("broker.db"))
    out = [
        v if isinstance(v, bytes) else str(v).encode()
        for table in ("credentials", "pending_flows")
        for row in _raw(store, f"SELECT * FROM {table}")
        for v in row
    ]
    return b"\x00".join(out)


@pytest.fixture
def vault(store: SqliteStore) -> CredentialVault:
    return CredentialVault(store, EnvelopeCipher(Keyring([new_key_entry("primary")])))


def _cred(user: str = "alice", access: str = "at-1", refresh: str | None = "rt-1") -> Credential:
    return Credential(
        user, "gh_0011223344556677", Secrets(access, refresh), "Bearer", ("repo",), 2e9, "connect_flow", 1e9
    )


@sqlite_only
def test_schema_version_wal_and_mode(store: SqliteStore) -> None:
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600


@sqlite_only
def test_reopen_keeps_data_and_refuses_newer_schema(
    tmp_path: Path, vault: CredentialVault, store: SqliteStore
) -> None:
    vault.save(_cred(), None, 1e9)
    again = SqliteStore(store.path)
    assert again.get_credential("alice", "gh_0011223344556677") is not None
    again.close()
    conn = sqlite3.connect(store.path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="newer than this broker"):
        SqliteStore(store.path)


def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open the store"):
        SqliteStore(blocker / "broker.db")


def test_save_get_and_generation_cas(vault: CredentialVault) -> None:
    assert vault.save(_cred(), None, 1e9) == 1
    cred, row = vault.get("alice", "gh_0011223344556677")  # type: ignore[misc]
    assert cred.secrets == Secrets("at-1", "rt-1") and row.generation == 1
    assert vault.save(_cred(access="at-2"), 1, 1e9) == 2
    assert vault.save(_cred(access="at-3"), 1, 1e9) is None  # lost the race
    cred, _ = vault.get("alice", "gh_0011223344556677")  # type: ignore[misc]
    assert cred.secrets.access_token == "at-2"
    assert vault.get("bob", "gh_0011223344556677") is None


def test_cas_is_atomic_across_threads(vault: CredentialVault) -> None:
    vault.save(_cred(), None, 1e9)
    wins: list[int] = []

    def attempt(i: int) -> None:
        result = vault.save(_cred(access=f"at-{i}"), 1, 1e9)
        if result is not None:
            wins.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_row_swap_between_users_fails_to_open(vault: CredentialVault, store: SqliteStore) -> None:
    vault.save(_cred("alice", "alice-token"), None, 1e9)
    vault.save(_cred("bob", "bob-token"), None, 1e9)
    alice = _raw(store, "SELECT sealed FROM credentials WHERE user_id='alice'")[0][0]
    _raw(store, "UPDATE credentials SET sealed=?, generation=generation+1 WHERE user_id='bob'", (alice,))
    with pytest.raises(DecryptionError):
        vault.get("bob", "gh_0011223344556677")


def test_pending_flows_are_single_use_and_bounded(vault: CredentialVault, store: SqliteStore) -> None:
    for i in range(8):
        vault.add_flow(PendingFlow(f"h{i}", "alice", "gh_k", f"verifier-{i}", 100.0 + i, 700.0), 5, 100.0 + i)
    vault.add_flow(PendingFlow("other", "bob", "gh_k", "v", 100.0, 700.0), 5, 100.0)
    assert vault.take_flow("h0") is None and vault.take_flow("h2") is None  # oldest dropped
    flow = vault.take_flow("h7")
    assert flow is not None and flow.verifier == "verifier-7"
    assert vault.take_flow("h7") is None
    assert vault.take_flow("other") is not None
    # expired flows are purged when a new one is added
    vault.add_flow(PendingFlow("late", "carol", "gh_k", "v", 800.0, 1400.0), 5, 800.0)
    assert _raw(store, "SELECT COUNT(*) FROM pending_flows")[0][0] == 1


def test_no_plaintext_in_database_files(vault: CredentialVault, store: SqliteStore) -> None:
    secrets = [f"secret-access-{os.urandom(8).hex()}", f"secret-refresh-{os.urandom(8).hex()}"]
    vault.save(_cred(access=secrets[0], refresh=secrets[1]), None, 1e9)
    verifier = f"verifier-{os.urandom(8).hex()}"
    vault.add_flow(PendingFlow("h", "alice", "gh_k", verifier, 1.0, 1e10), 5, 1.0)
    raw = _raw_bytes(store)
    for secret in [*secrets, verifier]:
        assert secret.encode() not in raw
    assert b"alice" in raw  # the clear metadata is there, so the grep is looking at the right bytes


def test_keyring_check_names_missing_and_wrong_keys(vault: CredentialVault, store: SqliteStore) -> None:
    vault.save(_cred(), None, 1e9)
    with pytest.raises(KeyringError, match="not in the keyring"):
        StoreKeyCheck(store, "stranger.json", "test").verify(Keyring([new_key_entry("primary")]))


def test_migration_2_keeps_version_1_records_openable(tmp_path: Path) -> None:
    import sqlite_utils

    from broker.store import sqlite as sqlite_store

    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    sqlite_store.MIGRATIONS[0](sqlite_utils.Database(conn))
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    cipher = EnvelopeCipher(Keyring([new_key_entry("primary")]))

    class V1Store(SqliteStore):
        def _migrate(self) -> None:  # stay at version 1 while writing, like an old broker
            pass

    old = V1Store(path)
    # Written with version 1's columns only, as a version 1 broker wrote it.
    row = CredentialVault(old, cipher).seal_credential(_cred(), 1e9)
    old.close()
    values = [getattr(row, column.strip()) for column in CRED_COLUMNS.split(",")]
    values[3] = json.dumps(list(row.scopes))  # the scopes column holds JSON
    v1 = sqlite3.connect(path, isolation_level=None)
    v1.execute(f"INSERT INTO credentials ({CRED_COLUMNS}) VALUES ({', '.join('?' * len(values))})", values)
    v1.close()
    upgraded = SqliteStore(path)
    try:
        found = CredentialVault(upgraded, cipher).get("alice", "gh_0011223344556677")
        assert found is not None and found[0].secrets.access_token == "at-1"
        assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        upgraded.close()


# Run in a fresh interpreter (no threads, so forking is safe): argv[2] times, three processes
# released together by a barrier open one new store file; prints every error, then "done".
_OPEN_TOGETHER = """
import multiprocessing, sys
from pathlib import Path
from broker.errors import StoreError
from broker.store import SqliteStore

def open_store(path, barrier, results):
    barrier.wait()
    try:
        SqliteStore(Path(path)).close()
        results.put("opened")
    except StoreError as exc:
        results.put(str(exc))

if __name__ == "__main__":
    context = multiprocessing.get_context("fork")
    for attempt in range(int(sys.argv[2])):
        barrier, results = context.Barrier(3), context.Queue()
        args = (f"{sys.argv[1]}/new-{attempt}.db", barrier, results)
        openers = [context.Process(target=open_store, args=args) for _ in range(3)]
        for opener in openers:
            opener.start()
        for answer in [results.get(timeout=60) for _ in openers]:
            if answer != "opened":
                print(answer)
        for opener in openers:
            opener.join(30)
    print("done")
"""


def test_processes_opening_a_new_store_file_at_once_all_open_it(tmp_path: Path) -> None:
    # Workers, replicas and the refresh process may all open a store the first time together;
    # switching a new file to WAL answered "database is locked" without waiting (a third of tries).
    script = tmp_path / "open_together.py"
    script.write_text(_OPEN_TOGETHER)
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "40"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
    ).stdout
    assert out.splitlines() == ["done"]
