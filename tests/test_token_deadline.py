"""``http.timeout_seconds`` bounds a whole token request, and a refresh lease outlives it.

The authorization server here answers "slow-loris" style: the headers at once, then one byte of
the body every few hundred milliseconds, so no single read ever waits long. Only a deadline on
the whole request cuts it. Two real broker processes share one store (SQLite file, PostgreSQL):
the refresh token must be presented once, and every call must end near the deadline.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import ClientAuthMethod
from broker.errors import UpstreamUnavailable
from broker.oauth.client import ClientCredentials, TokenEndpointClient
from tests.authserver import AuthServer
from tests.brokerproc import ServerProcess, write_config
from tests.conftest import UPSTREAM, Broker, BrokerFactory, RequestHeader, error_info
from tests.test_processes import connect_over_grpc

DEADLINE = 1.0  # http.timeout_seconds in these tests
MARGIN = 2.0  # what a loaded machine adds on top (gRPC, a store write, process scheduling)
DRIP = 0.3  # seconds between body bytes: far below the deadline, so no single read times out


async def _timed(call: Any, limit: float) -> tuple[float, Any]:
    """(seconds the call took, its answer or exception); gives up after ``limit`` seconds."""
    started = time.monotonic()
    try:
        answer: Any = await asyncio.wait_for(call, limit)
    except (grpc.aio.AioRpcError, TimeoutError) as exc:
        answer = exc
    return time.monotonic() - started, answer


async def test_a_dripping_answer_is_cut_at_the_deadline(make_broker: BrokerFactory) -> None:
    broker = await make_broker(http={"timeout_seconds": DEADLINE})
    await broker.connect("alice")
    broker.auth.fail_next("drip", seconds=DRIP)
    took, answer = await _timed(
        broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM)), 10.0
    )
    assert isinstance(answer, grpc.aio.AioRpcError), answer
    assert answer.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(answer).reason == "UPSTREAM_UNAVAILABLE"
    assert DEADLINE * 0.9 <= took <= DEADLINE + MARGIN
    (row,) = broker.rows(
        "SELECT status, last_error, lease_owner, next_attempt_at FROM credentials WHERE user_id = ?",
        ("alice",),
    )
    retry_in = row.pop("next_attempt_at") - broker.clock.now()
    assert row == {"status": "error", "last_error": "timeout", "lease_owner": None}
    # The server may still be working on the request it never finished answering: the same
    # refresh token is not presented again for at least one more timeout.
    assert retry_in >= DEADLINE


async def test_the_deadline_covers_connect_and_a_slow_first_byte(make_broker: BrokerFactory) -> None:
    broker = await make_broker(http={"timeout_seconds": DEADLINE})
    await broker.connect("alice")
    broker.auth.fail_next("timeout", seconds=30)  # nothing at all comes back
    took, answer = await _timed(
        broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM)), 10.0
    )
    assert isinstance(answer, grpc.aio.AioRpcError) and answer.code() == grpc.StatusCode.UNAVAILABLE
    assert took <= DEADLINE + MARGIN


@pytest.mark.parametrize("store_backend", ["sqlite", "postgres"])
async def test_two_processes_and_a_dripping_server_present_the_refresh_token_once(
    broker: Broker, tmp_path: Path
) -> None:
    auth = broker.auth
    assert auth.rotate_refresh_tokens and auth.revoke_grant_on_reuse  # RFC 9700 reuse detection
    config = write_config(broker.document, tmp_path / "procs.yaml", http={"timeout_seconds": DEADLINE})
    servers = [ServerProcess(config, tmp_path / f"server{n}.log") for n in range(2)]
    channels = [grpc.aio.insecure_channel(s.address, interceptors=[RequestHeader()]) for s in servers]
    try:
        stubs = [pb_grpc.CredentialBrokerStub(c) for c in channels]
        auth.access_ttl = 61  # inside the 60 s refresh window almost at once
        await connect_over_grpc(stubs[0], auth, "alice")
        auth.access_ttl = 3600
        await asyncio.sleep(1.2)  # stale now for both processes, still valid for a minute
        auth.fail_next("drip", seconds=DRIP)  # the refresh is processed, its answer dripped
        request = pb.ResolveRequest(user_id="alice", upstream=UPSTREAM)
        # Both processes at once, and again a little later while the first request still drips.
        first = [_timed(stubs[n % 2].Resolve(request), 12.0) for n in range(10)]
        results = await asyncio.gather(*first, _later(stubs, request))
        calls = [*results[:-1], *results[-1]]
        slow = [round(took, 2) for took, _ in calls if took > DEADLINE + MARGIN]
        print(
            f"\nslowest of {len(calls)} calls: {max(took for took, _ in calls):.2f} s (deadline {DEADLINE} s)"
        )
        uses = auth.token_requests("refresh_token")
        # (Both at once: on failure, say how late the calls were AND how often the token went out.)
        spread = [round(u.time - uses[0].time, 2) for u in uses]
        assert (slow, len(uses)) == ([], 1), (
            f"late calls (s): {slow}; refresh token presented {len(uses)}x, at +{spread} s"
        )
        # Every caller got the cached token, still valid for what it asked (min_valid_seconds 0).
        failures = [a for _, a in calls if not isinstance(a, pb.ResolveResponse)]
        assert failures == []
        assert len({a.access_token for _, a in calls}) == 1
        (token,) = {a.access_token for _, a in calls}
        assert auth.access_token_info(token) is not None  # the grant was not revoked for reuse
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            server.stop()


async def _later(stubs: list[pb_grpc.CredentialBrokerStub], request: pb.ResolveRequest) -> list[Any]:
    await asyncio.sleep(DEADLINE * 0.6)
    return list(await asyncio.gather(*(_timed(stubs[n % 2].Resolve(request), 12.0) for n in range(4))))


async def test_a_request_whose_deadline_passed_before_it_was_sent_is_never_sent(
    auth_server: AuthServer,
) -> None:
    """A process the kernel held back between claiming a refresh lease and sending the refresh
    (a busy host; the background refresher runs in the idle scheduling class) must not send it
    late: its deadline, fixed before the claim, is what keeps the request inside the lease. The
    connection to the server is warm, so nothing on the way to the send has to wait."""
    client = TokenEndpointClient(timeout=DEADLINE, max_bytes=65536)
    credentials = ClientCredentials("late", None, ClientAuthMethod.NONE)
    form = [("grant_type", "refresh_token"), ("refresh_token", "rt-late")]
    loop = asyncio.get_running_loop()
    try:
        status, _ = await client.post_form(auth_server.token_endpoint, form, credentials)
        assert status == 401  # answered (an unknown client): the connection is open
        sent = len(auth_server.token_requests())
        for _ in range(20):
            with pytest.raises(UpstreamUnavailable, match="timed out"):
                await client.post_form(
                    auth_server.token_endpoint, form, credentials, deadline=loop.time() - 0.001
                )
        await asyncio.sleep(0.3)  # a request that did go out would have been recorded by now
        assert len(auth_server.token_requests()) == sent
    finally:
        await client.aclose()
