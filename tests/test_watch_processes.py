"""WatchConnections across real replicas: two ``broker serve`` processes on one PostgreSQL. A
watcher on replica B sees CONNECTED, REFRESHED, NEEDS_REAUTH and DISCONNECTED for changes made
through replica A, in order and with no gaps (LISTEN/NOTIFY wakes B); after B is restarted, the
watcher reconnects with after_sequence and misses nothing that happened while B was down."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.brokerproc import ServerProcess, write_config
from tests.conftest import UPSTREAM, Broker, RequestHeader, error_info
from tests.test_processes import connect_over_grpc

K = pb.ConnectionEventKind
HEADER = (("x-credential-broker-request", "true"),)


class _Watch:
    """A WatchConnections stream read by a background task into a queue."""

    def __init__(self, stub: pb_grpc.CredentialBrokerStub, after: int) -> None:
        request = pb.WatchConnectionsRequest(user_id="alice", upstreams=[UPSTREAM], after_sequence=after)
        self.call: Any = stub.WatchConnections(request, metadata=HEADER)
        self.events: asyncio.Queue[pb.ConnectionEvent | None] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                await self.events.put(response.event)
        except grpc.aio.AioRpcError:
            pass
        finally:
            await self.events.put(None)

    async def take(self, count: int, timeout: float = 15.0) -> list[pb.ConnectionEvent]:
        out = []
        for _ in range(count):
            event = await asyncio.wait_for(self.events.get(), timeout)
            assert event is not None, "the stream ended"
            out.append(event)
        return out

    async def nothing_more(self, seconds: float = 2.5) -> None:
        # Longer than PostgreSQL's fallback poll: a stray event would have arrived by then.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.events.get(), seconds)

    def cancel(self) -> None:
        self.call.cancel()
        self._task.cancel()


def _consecutive(seen: list[pb.ConnectionEvent], after: int) -> None:
    assert [e.sequence for e in seen] == list(range(after + 1, after + 1 + len(seen)))
    assert all(e.user_id == "alice" and e.upstream == UPSTREAM for e in seen)


@pytest.mark.parametrize("store_backend", ["postgres"])
async def test_a_watcher_on_process_b_follows_changes_made_through_process_a(
    broker: Broker, tmp_path: Path
) -> None:
    auth = broker.auth
    config = write_config(broker.document, tmp_path / "replicas.yaml")
    a = ServerProcess(config, tmp_path / "a.log")
    b = ServerProcess(config, tmp_path / "b.log")
    channels: list[grpc.aio.Channel] = []

    def stub(server: ServerProcess) -> pb_grpc.CredentialBrokerStub:
        channels.append(grpc.aio.insecure_channel(server.address, interceptors=[RequestHeader()]))
        return pb_grpc.CredentialBrokerStub(channels[-1])

    try:
        via_a, via_b = stub(a), stub(b)
        start = broker.app.store.last_event_sequence()
        watch = _Watch(via_b, start)
        await connect_over_grpc(via_a, auth, "alice")
        await via_a.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
        auth.revoke_user("alice")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await via_a.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
        assert error_info(refused.value).reason == "RECONNECT_REQUIRED"
        await via_a.Disconnect(pb.DisconnectRequest(user_id="alice", upstream=UPSTREAM))

        seen = await watch.take(4)
        assert [e.kind for e in seen] == [
            K.CONNECTION_EVENT_KIND_CONNECTED,
            K.CONNECTION_EVENT_KIND_REFRESHED,
            K.CONNECTION_EVENT_KIND_NEEDS_REAUTH,
            K.CONNECTION_EVENT_KIND_DISCONNECTED,
        ]
        _consecutive(seen, start)
        watch.cancel()

        # B goes down; changes go on through A; B comes back and the watcher resumes.
        b.stop()
        await connect_over_grpc(via_a, auth, "alice")
        await via_a.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
        b = ServerProcess(config, tmp_path / "b2.log")
        resumed = _Watch(stub(b), seen[-1].sequence)
        missed = await resumed.take(2)
        assert [e.kind for e in missed] == [
            K.CONNECTION_EVENT_KIND_CONNECTED,
            K.CONNECTION_EVENT_KIND_REFRESHED,
        ]
        _consecutive(missed, seen[-1].sequence)
        # And live again after the replay.
        await via_a.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
        (live,) = await resumed.take(1)
        assert (live.kind, live.sequence) == (K.CONNECTION_EVENT_KIND_REFRESHED, missed[-1].sequence + 1)
        await resumed.nothing_more()
        resumed.cancel()
    finally:
        for channel in channels:
            await channel.close()
        a.stop()
        b.stop()
