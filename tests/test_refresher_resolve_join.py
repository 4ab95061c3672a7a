"""A Resolve that arrives while this process's background refresh of the same credential is in
flight waits for it (one refresh per user and upstream at a time) but never takes its result:
when the background refresh gives up without refreshing because another replica holds the
refresh lease, the Resolve must still get a valid token (wait for the other replica's result, as
a Resolve of its own does), never the expired one.

Real parts: two brokers (replicas) on one real SQLite file, one loopback authorization server.
Replica A runs the background refresher in its own process (``separate_process: false``);
replica B holds the lease with a Refresh the authorization server answers slowly. A connection
of the test's own holds SQLite's write lock for a moment so that A's background refresh is
reliably still in flight (waiting to claim the lease) when A's Resolve arrives.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.clock import ManualClock
from broker.refresher import BackgroundRefresher
from tests.conftest import UPSTREAM, BrokerFactory


async def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_resolve_sharing_a_background_refresh_that_met_another_replicas_lease_gets_a_valid_token(
    make_broker: BrokerFactory,
) -> None:
    clock = ManualClock(time.time())
    replica_a = await make_broker(
        clock=clock,
        background_refresh={
            "enabled": True,
            "ahead_seconds": 300,
            "interval_seconds": 3600,  # the test drives A's refresher itself
            "separate_process": False,
        },
    )
    replica_b = await make_broker(clock=clock, client=replica_a.client)
    auth = replica_a.auth
    auth.access_ttl = 10
    await replica_a.connect("alice")
    auth.access_ttl = 3600
    refresher = replica_a.app.refresher
    assert isinstance(refresher, BackgroundRefresher)
    upstream = replica_a.app.config.upstream(UPSTREAM)
    assert upstream is not None

    # Replica B refreshes alice; the authorization server takes 3 s to answer: B holds the lease.
    auth.fail_next("override", fields={}, delay=3)
    b_refresh = asyncio.ensure_future(
        replica_b.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    )
    await _until(lambda: len(auth.token_requests("refresh_token")) == 1)
    # alice's stored access token has now expired; B's lease (http.timeout_seconds + 5 s = 15 s
    # from its claim) has not.
    clock.advance(12)
    [(row, _, _)] = await refresher.scan(clock.now())

    db = sqlite3.connect(replica_a.app.config.store.path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")  # A's claim of the lease waits for this write lock
        background = asyncio.ensure_future(refresher.refresh_one(row, upstream))
        await asyncio.sleep(0.3)
        resolve = asyncio.ensure_future(replica_a.resolve("alice"))
        await asyncio.sleep(0.5)
    finally:
        db.execute("ROLLBACK")
        db.close()
    resolved = await asyncio.wait_for(resolve, 15)
    await background
    await b_refresh
    assert resolved.expires_at.seconds > clock.now(), "Resolve answered an expired access token"
    assert auth.access_token_info(resolved.access_token) is not None
    assert len(auth.token_requests("refresh_token")) == 1  # B's refresh served both replicas
