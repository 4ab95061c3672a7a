"""The database host becomes unreachable without a word (a network partition, a connection a NAT
or load balancer dropped silently): nothing comes back, not even a reset. A store call must then
fail (STORE_UNAVAILABLE) within seconds, not when TCP gives up about 15 minutes later: Resolve
reads on the event loop, so until then the whole broker would hang while its WatchConnections
streams looked healthy and silent. Needs root and iptables (packets to and from the test
cluster's port are dropped); skipped otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from broker.errors import StoreError
from broker.store.base import CredentialRow
from broker.store.postgres import PostgresStore
from tests.pgcluster import PgCluster, fresh_schema

KEY = "gh_0011223344556677"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("iptables") is None, reason="needs root and iptables"
)


@contextmanager
def _partitioned(port: int) -> Iterator[None]:
    """Drop every packet to and from ``port`` (loopback traffic passes INPUT both ways)."""
    rules = [
        ["INPUT", "-p", "tcp", direction, str(port), "-j", "DROP"] for direction in ("--dport", "--sport")
    ]
    added: list[list[str]] = []
    try:
        for rule in rules:
            done = subprocess.run(["iptables", "-I", *rule], capture_output=True, timeout=10, check=False)
            if done.returncode != 0:
                pytest.skip("iptables is here but cannot add rules (no netfilter in this kernel)")
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-D", *rule], check=True, capture_output=True, timeout=10)


def test_a_read_from_an_unreachable_database_fails_within_seconds(pg_cluster: PgCluster) -> None:
    with fresh_schema(pg_cluster.dsn) as dsn:
        store = PostgresStore(dsn, pool_size=2)
        try:
            store.save_credential(
                CredentialRow(
                    "alice", KEY, "Bearer", (), 2e9, "connect_flow", "connected", 0, "k1", b"s", 1e9, 1e9
                ),
                None,
            )
            outcome: list[object] = []

            def read() -> None:
                try:
                    outcome.append(store.get_credential("alice", KEY))
                except StoreError as exc:
                    outcome.append(exc)

            with _partitioned(pg_cluster.port):
                started = time.monotonic()
                reader = threading.Thread(target=read, daemon=True)
                reader.start()
                reader.join(15)
                took = time.monotonic() - started
            reader.join(30)  # the reference's read finishes once packets flow again
            assert took < 15, "the read hung on the unreachable database"
            assert len(outcome) == 1 and isinstance(outcome[0], StoreError)
            # Reachable again: the store answers by itself.
            deadline = time.monotonic() + 10
            while True:
                try:
                    found = store.get_credential("alice", KEY)
                    break
                except StoreError:
                    assert time.monotonic() < deadline, "the store did not recover"
                    time.sleep(0.2)
            assert found is not None
        finally:
            store.close()
