"""A throwaway PostgreSQL cluster from the initdb/pg_ctl binaries, and per-test schemas.

Tests take a server from ``CREDENTIAL_BROKER_TEST_PG_DSN`` (what scripts/ci/postgres.sh prints)
or start their own cluster here. Each test gets its own schema (``search_path``), dropped after.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import leakcheck

DSN_ENV = "CREDENTIAL_BROKER_TEST_PG_DSN"


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    """A cluster in a temp dir; as root it runs as the ``postgres`` user."""

    root: Path
    port: int
    pg_ctl: str
    owner: str | None

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=3"

    def _run(self, *args: str) -> None:
        command = [*(["runuser", "-u", self.owner, "--"] if self.owner else []), *args]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c max_connections=300"
        )
        self._run(self.pg_ctl, "-D", str(self.root / "data"), "-l", str(self.root / "server.log"), "-w",
                  "-t", "60", "-o", options, "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(self.pg_ctl, "-D", str(self.root / "data"), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> tuple[PgCluster | None, str]:
    """A started cluster, or None and the reason it could not be started."""
    initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
    if not initdb or not pg_ctl:
        return None, "initdb/pg_ctl not found (run scripts/ci/postgres.sh, or set " + DSN_ENV + ")"
    owner: str | None = None
    root = Path(tempfile.mkdtemp(prefix="cb-test-pg-"))
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            return None, "running as root and there is no 'postgres' user to run the server as"
        os.chown(root, entry.pw_uid, entry.pw_gid)
        owner = "postgres"
    cluster = PgCluster(root, _free_port(), pg_ctl, owner)
    try:
        cluster._run(
            initdb, "-D", str(root / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"
        )
        cluster.start()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        cluster.destroy()
        return None, f"could not start a throwaway PostgreSQL cluster: {exc}"
    return cluster, ""


@contextmanager
def fresh_schema(dsn: str) -> Iterator[str]:
    """A DSN whose search_path is a new, empty schema; dropped afterwards."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        yield make_conninfo(dsn, options=f"-c search_path={name}")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            with suppress(psycopg.Error):  # the server may be down (restart tests): nothing to dump
                leakcheck.add_database_dump(f"PostgreSQL schema {name}", dump_schema(conn, name))
            conn.execute(f"DROP SCHEMA {name} CASCADE")


def dump_schema(conn: Any, schema: str) -> bytes:
    """Every value of every table in ``schema``: bytea raw, everything else as its text form."""
    tables = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
    ).fetchall()
    out: list[bytes] = []
    for (table,) in tables:
        for row in conn.execute(f'SELECT * FROM {schema}."{table}"').fetchall():
            out += [bytes(v) if isinstance(v, bytes | memoryview) else str(v).encode() for v in row]
    return b"\x00".join(out)
