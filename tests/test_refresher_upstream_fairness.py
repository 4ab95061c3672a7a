"""Background refresh across upstreams: one upstream whose token endpoint hangs must not hold
back the background refresh of another.

A real broker (in-process refresher, real SQLite file) with two upstreams on two loopback
authorization servers. Upstream "slow" hangs every token request until the broker's deadline;
a batch of its credentials is due, so its refreshes take several deadlines to drain at the
per-upstream concurrency. Meanwhile a credential of upstream "fast" falls due: it must be
refreshed within a few scan intervals, not after the slow batch has drained.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Any

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.models import Credential, Secrets
from tests import leakcheck
from tests.authserver import AuthServer
from tests.conftest import REDIRECT_URI, BrokerFactory, upstream_doc

TIMEOUT = 3.0  # http.timeout_seconds: each hung refresh holds its slot this long
STUCK = 20  # slow credentials due: 20 / 4 slots x 3 s = 15 s to drain
FAST_ENOUGH = 4.0  # a generous bound for "within a few scan intervals" on a loaded machine


def _upstream(auth: AuthServer, name: str) -> dict[str, Any]:
    doc = upstream_doc(auth, auth.new_client(redirect_uri=REDIRECT_URI))
    return {**doc, "name": name, "url": f"https://api.{name}.test"}


async def _until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_hung_upstream_does_not_hold_back_another_upstreams_background_refresh(
    make_broker: BrokerFactory, auth_server: AuthServer, other_auth_server: AuthServer
) -> None:
    broker = await make_broker(
        upstreams=[_upstream(auth_server, "slow"), _upstream(other_auth_server, "fast")],
        http={"timeout_seconds": TIMEOUT},
        background_refresh={
            "enabled": True,
            "ahead_seconds": 300,
            "max_concurrent": 4,
            "interval_seconds": 0.05,
            "separate_process": False,
        },
    )
    # alice on "fast", with a 30 s token: not due yet.
    other_auth_server.access_ttl = 30
    flow = await broker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream="fast")
    )
    callback = await asyncio.to_thread(other_auth_server.authorize, flow.authorization_url, "alice")
    await broker.stub.Complete(pb.CompleteRequest(state=flow.state, code=callback["code"], user_id="alice"))
    other_auth_server.access_ttl = 3600

    # STUCK users on "slow", due now; its token endpoint hangs past the broker's deadline.
    slow = broker.app.config.upstream("slow")
    assert slow is not None
    now = broker.clock.now()
    auth_server.fail_next("timeout", count=STUCK, seconds=60)
    for n in range(STUCK):
        tokens = Secrets("at_" + secrets.token_urlsafe(16), "rt_" + secrets.token_urlsafe(16))
        leakcheck.add_secret(tokens.access_token, tokens.refresh_token or "")
        # Obtained an hour ago, 30 s left: due.
        then = now - 3570
        stale = Credential(f"user{n}", slow.key, tokens, "Bearer", ("repo",), now + 30, "connect_flow", then)
        assert broker.app.vault.save(stale, None, then) is not None
    await _until(lambda: len(auth_server.token_requests("refresh_token")) >= 4, timeout=10)

    # Now alice's token on "fast" falls due (25 s on, inside its lead of half its lifetime).
    broker.clock.advance(25)
    started = time.monotonic()
    await _until(lambda: len(other_auth_server.token_requests("refresh_token")) >= 1, timeout=30)
    waited = time.monotonic() - started
    print(f"\nfast upstream refreshed {waited:.2f} s after falling due")
    assert waited < FAST_ENOUGH, waited
