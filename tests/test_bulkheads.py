"""Bulkheads: one hung upstream never delays another.

Upstream "slow" hangs every token request; 110 users' refreshes pile up on it. Meanwhile a
connect flow (Complete) and a refresh (Resolve) on upstream "fast", a second authorization
server, must take their normal time: each token endpoint host has its own connection pool and
each upstream its own bounded number of concurrent token requests (http.max_concurrent_requests).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import grpc

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.models import Credential, Secrets
from tests import leakcheck
from tests.authserver import AuthServer
from tests.conftest import REDIRECT_URI, BrokerFactory, upstream_doc

STUCK = 110
TIMEOUT = 8.0  # http.timeout_seconds: the stuck refreshes hold on this long
NORMAL = 3.0  # a generous bound on a normal call on a loaded machine, far below TIMEOUT


def _upstream(auth: AuthServer, name: str) -> dict[str, Any]:
    doc = upstream_doc(auth, auth.new_client(redirect_uri=REDIRECT_URI))
    return {**doc, "name": name, "url": f"https://api.{name}.test"}


async def test_a_hung_upstream_does_not_delay_another(
    make_broker: BrokerFactory, auth_server: AuthServer, other_auth_server: AuthServer
) -> None:
    broker = await make_broker(
        upstreams=[_upstream(auth_server, "slow"), _upstream(other_auth_server, "fast")],
        http={"timeout_seconds": TIMEOUT},
    )
    # 110 users on "slow" whose tokens are inside the refresh window.
    slow = broker.app.config.upstream("slow")
    assert slow is not None
    now = broker.clock.now()
    for n in range(STUCK):
        tokens = Secrets("at_" + secrets.token_urlsafe(16), "rt_" + secrets.token_urlsafe(16))
        leakcheck.add_secret(tokens.access_token, tokens.refresh_token or "")
        stale = Credential(f"user{n}", slow.key, tokens, "Bearer", ("repo",), now + 30, "connect_flow", now)
        assert broker.app.vault.save(stale, None, now) is not None
    auth_server.fail_next("timeout", count=STUCK, seconds=60)  # hangs until the broker gives up
    stuck = [
        asyncio.ensure_future(broker.stub.Refresh(pb.RefreshRequest(user_id=f"user{n}", upstream="slow")))
        for n in range(STUCK)
    ]
    try:
        await _until(lambda: len(auth_server.token_requests()) >= 10)
        await asyncio.sleep(0.3)  # let the rest pile up wherever they wait
        # Meanwhile, upstream "fast": a connect flow, then a Resolve that must refresh.
        other_auth_server.access_ttl = 30  # the new credential is inside the refresh window at once
        started = time.monotonic()
        flow = await broker.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id="alice", upstream="fast")
        )
        callback = await asyncio.to_thread(other_auth_server.authorize, flow.authorization_url, "alice")
        done = await asyncio.wait_for(
            broker.stub.Complete(
                pb.CompleteRequest(state=flow.state, code=callback["code"], user_id="alice")
            ),
            TIMEOUT + 5,
        )
        connected = time.monotonic() - started
        assert done.credential.upstream == "fast"
        other_auth_server.access_ttl = 3600
        started = time.monotonic()
        resolved = await asyncio.wait_for(broker.resolve("alice", upstream="fast"), TIMEOUT + 5)
        refreshed = time.monotonic() - started
        assert len(other_auth_server.token_requests("refresh_token")) == 1  # it did refresh
        assert other_auth_server.access_token_info(resolved.access_token)["user"] == "alice"
        print(f"\nfast upstream: connect flow {connected:.3f} s, refreshing Resolve {refreshed:.3f} s")
        assert connected < NORMAL and refreshed < NORMAL, (connected, refreshed)
        # The slow upstream got no more than its bulkhead's worth of requests at once.
        assert not any(task.done() for task in stuck)
        assert len(auth_server.token_requests()) == broker.app.config.http.max_concurrent_requests
    finally:
        # Let the hung server go: the stuck refreshes fail fast (connection cut, then refused)
        # and end on their own, rather than being cancelled half-way through a connect.
        auth_server.stop()
        ended = await asyncio.wait_for(asyncio.gather(*stuck, return_exceptions=True), TIMEOUT + 5)
    assert all(isinstance(e, grpc.aio.AioRpcError) for e in ended)
    assert {e.code() for e in ended} == {grpc.StatusCode.UNAVAILABLE}


async def _until(condition: Any, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)
