"""A caller that gives up (its deadline passes, or it cancels) while the broker is talking to the
authorization server: what the call started still finishes, so nothing ends half-done.

- Complete: the code has been presented (the server redeems it whether or not anyone reads its
  answer), the flow is consumed; the credential must still be stored, or the user's login is
  lost and the issued grant is orphaned upstream.
- Disconnect / DisconnectAll: the README promises the local credential is deleted whatever the
  revocation's outcome; a slow revocation endpoint plus a caller's deadline must not leave it
  in place (and still served by Resolve).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.authserver import AuthServer
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc


def _credentials(broker: Broker) -> int:
    return int(broker.query("SELECT COUNT(*) FROM credentials")[0][0])


async def _until(condition: Any, seconds: float = 8.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return bool(condition())


@pytest.mark.parametrize("how", ["deadline", "cancel"])
async def test_complete_given_up_by_its_caller_still_stores_the_credential(broker: Broker, how: str) -> None:
    started = await broker.start_flow()
    callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
    broker.auth.fail_next("timeout", seconds=1.5)  # answers normally, 1.5 s late
    request = pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
    if how == "deadline":
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await broker.stub.Complete(request, timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        call = broker.stub.Complete(request)
        assert await _until(lambda: broker.auth.token_requests("authorization_code"))
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert await _until(lambda: _credentials(broker) == 1), "the redeemed code's credential was lost"
    answer = await broker.resolve("alice")
    assert answer.access_token in broker.auth.issued
    assert len(broker.auth.token_requests("authorization_code")) == 1
    acquired = [e for e in broker.extra["audit"].events if e.action == "acquire"]
    assert [(e.outcome, e.user) for e in acquired] == [("success", "alice")]
    # The flow stays consumed.
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await broker.stub.Complete(request)
    assert error_info(again.value).reason == "FLOW_NOT_FOUND"


@contextlib.asynccontextmanager
async def _hanging_endpoint() -> AsyncIterator[str]:
    """An HTTP endpoint that accepts connections and never answers."""
    release = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/revoke"
    finally:
        release.set()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("rpc", ["Disconnect", "DisconnectAll"])
async def test_disconnect_given_up_by_its_caller_still_deletes(
    make_broker: BrokerFactory, auth_server: AuthServer, rpc: str
) -> None:
    async with _hanging_endpoint() as revoke:
        client = auth_server.new_client(redirect_uri="https://app.test/callback")
        broker = await make_broker(
            client=client,
            upstreams=[upstream_doc(auth_server, client, revocation_endpoint=revoke)],
            http={"timeout_seconds": 1.5},
        )
        await broker.connect("alice")
        request: Any = (
            pb.DisconnectRequest(user_id="alice", upstream=UPSTREAM)
            if rpc == "Disconnect"
            else pb.DisconnectAllRequest(user_id="alice")
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await getattr(broker.stub, rpc)(request, timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await _until(lambda: _credentials(broker) == 0), "the credential outlived Disconnect"
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await broker.resolve("alice")
        assert error_info(gone.value).reason == "NOT_CONNECTED"
        kinds = [r[0] for r in broker.query("SELECT kind FROM connection_events ORDER BY seq")]
        assert kinds[-1] == "disconnected"
        audited = [e for e in broker.extra["audit"].events if e.action == "disconnect"]
        assert audited and all(e.outcome == "success" for e in audited)


async def test_a_complete_that_fails_after_its_caller_gave_up_is_still_audited(broker: Broker) -> None:
    """Nobody is left to answer, but the audit trail still records the failed acquisition."""
    started = await broker.start_flow()
    callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
    broker.auth.fail_next("oauth_error", status=400, error="invalid_grant", delay=1.0)
    request = pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Complete(request, timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def acquired() -> list[tuple[str, str, str]]:
        return [(e.outcome, e.user, e.reason) for e in broker.extra["audit"].events if e.action == "acquire"]

    assert await _until(lambda: acquired() != []), "the failure after the caller left was not audited"
    assert acquired() == [("failure", "alice", "TOKEN_REQUEST_REJECTED")]
    assert _credentials(broker) == 0


def test_a_complete_whose_caller_gave_up_still_lands_when_the_broker_is_stopped(live_broker: Any) -> None:
    """A rolling restart (SIGTERM) right after the caller gave up: the broker finishes the
    completion before it closes its store, so the user's login is not lost."""
    from tests.live import REQUEST_HEADER

    stub = live_broker.stub()
    md = (REQUEST_HEADER,)
    started = stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream=live_broker.upstream), metadata=md
    )
    callback = live_broker.auth.authorize(started.authorization_url, "alice")
    live_broker.auth.fail_next("timeout", seconds=1.5)  # answers normally, 1.5 s late
    request = pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
    with pytest.raises(grpc.RpcError) as info:
        stub.Complete(request, metadata=md, timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert live_broker.stop() == 0
    database = live_broker.config_path.parent / "data" / "broker.db"
    with contextlib.closing(sqlite3.connect(database)) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM credentials").fetchone()
    assert count == 1, "the login was lost when the broker stopped"
