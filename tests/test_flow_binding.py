"""A pending flow's ciphertext is bound to its upstream (issue 12, item 8).

The verifier (and the state) are sealed with associated data that names the flow's upstream, as
credentials are. A row moved to another upstream in the database fails to open, so Complete on
it is refused before any request is made: upstream A's code and verifier never reach B.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.authserver import AuthServer
from tests.conftest import REDIRECT_URI, UPSTREAM, BrokerFactory, error_info, upstream_doc


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends."""
    return str(request.param)


@pytest.fixture
def other_server() -> Iterator[AuthServer]:
    server = AuthServer().start()
    try:
        yield server
    finally:
        server.stop()
        assert server.internal_errors == []


async def test_flow_moved_to_another_upstream_fails_closed(
    make_broker: BrokerFactory, auth_server: AuthServer, other_server: AuthServer
) -> None:
    client_a = auth_server.new_client(redirect_uri=REDIRECT_URI)
    client_b = other_server.new_client(redirect_uri=REDIRECT_URI)
    doc_b = upstream_doc(other_server, client_b)
    doc_b.update(name="other", url="https://api.other.test")
    broker = await make_broker(client=client_a, upstreams=[upstream_doc(auth_server, client_a), doc_b])
    key_a, key_b = (u.key for u in broker.app.config.upstreams)
    started = await broker.start_flow("alice", UPSTREAM)
    callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
    moved = broker.query(
        "UPDATE pending_flows SET upstream_key = ? WHERE upstream_key = ? RETURNING state_hash",
        (key_b, key_a),
    )
    assert len(moved) == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Complete(
            pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(info.value).reason == "FLOW_NOT_FOUND"
    assert other_server.token_requests() == []  # B's token endpoint saw nothing
    assert auth_server.token_requests() == []
    assert broker.query("SELECT COUNT(*) FROM credentials")[0][0] == 0
    # The flow was consumed on first use, as any flow is.
    assert broker.query("SELECT COUNT(*) FROM pending_flows")[0][0] == 0


async def test_flow_moved_back_opens_again(make_broker: BrokerFactory, auth_server: AuthServer) -> None:
    """The binding is the upstream key itself: a row that sits where it was sealed opens."""
    client = auth_server.new_client(redirect_uri=REDIRECT_URI)
    doc_b = upstream_doc(auth_server, client)
    doc_b.update(name="other", url="https://api.other.test")
    broker = await make_broker(client=client, upstreams=[upstream_doc(auth_server, client), doc_b])
    key_a, key_b = (u.key for u in broker.app.config.upstreams)
    started = await broker.start_flow("alice", UPSTREAM)
    broker.query("UPDATE pending_flows SET upstream_key = ? WHERE upstream_key = ?", (key_b, key_a))
    broker.query("UPDATE pending_flows SET upstream_key = ? WHERE upstream_key = ?", (key_a, key_b))
    callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
    done = await broker.stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
    )
    assert done.credential.upstream == UPSTREAM
