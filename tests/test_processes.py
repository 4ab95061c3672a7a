"""Real server processes sharing one store: one refresh for a stampede, and kill -9 safety
(SQLite's file integrity; on both stores, no acknowledged write lost and every record opens).
Both run on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.crypto import EnvelopeCipher, FileKeySource
from broker.vault import CredentialVault
from tests.authserver import AuthServer
from tests.brokerproc import ServerProcess, write_config
from tests.conftest import UPSTREAM, Broker, RequestHeader


async def connect_over_grpc(stub: pb_grpc.CredentialBrokerStub, auth: AuthServer, user: str) -> None:
    """A whole connect flow through ``stub`` (a broker process) and the authorization server."""
    started = await stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id=user, upstream=UPSTREAM)
    )
    callback = await asyncio.to_thread(auth.authorize, started.authorization_url, user)
    await stub.Complete(pb.CompleteRequest(state=started.state, code=callback["code"], user_id=user))


@pytest.mark.parametrize("store_backend", ["sqlite", "postgres"])
async def test_two_processes_200_resolves_on_a_stale_credential_make_one_refresh(
    broker: Broker, tmp_path: Path
) -> None:
    auth = broker.auth
    assert auth.rotate_refresh_tokens and auth.revoke_grant_on_reuse  # RFC 9700 reuse detection
    config = write_config(broker.document, tmp_path / "procs.yaml")
    servers = [ServerProcess(config, tmp_path / f"server{n}.log") for n in range(2)]
    channels = [grpc.aio.insecure_channel(s.address, interceptors=[RequestHeader()]) for s in servers]
    try:
        stubs = [pb_grpc.CredentialBrokerStub(c) for c in channels]
        auth.access_ttl = 61  # inside the 60 s refresh window almost at once
        await connect_over_grpc(stubs[0], auth, "alice")
        auth.access_ttl = 3600
        await asyncio.sleep(1.2)  # now stale for every process, whatever its clock
        auth.fail_next("timeout", seconds=0.3)  # a slow answer: every caller piles up
        results = await asyncio.gather(
            *(
                stubs[n % 2].Resolve(pb.ResolveRequest(user_id="alice", upstream=UPSTREAM))
                for n in range(200)
            ),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == []
        tokens = {r.access_token for r in results if isinstance(r, pb.ResolveResponse)}
        assert len(tokens) == 1
        assert len(auth.token_requests("refresh_token")) == 1
        (token,) = tokens
        assert auth.access_token_info(token)["user"] == "alice"
        # The rotated refresh token was committed: the next refresh works (no reuse, no revocation).
        await stubs[1].Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
        assert len(auth.token_requests("refresh_token")) == 2
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            server.stop()


@pytest.mark.parametrize("store_backend", ["sqlite", "postgres"])
async def test_kill_9_during_writes_loses_no_committed_credential(
    broker: Broker, tmp_path: Path, store_backend: str
) -> None:
    auth = broker.auth
    config = write_config(broker.document, tmp_path / "crash.yaml")
    keyring = FileKeySource(broker.app.config.keyring.file).load()
    key = broker.app.config.upstreams[0].key
    acknowledged: set[str] = set()
    rng = random.Random(1234)
    counter = 0
    for round_ in range(5):
        server = ServerProcess(config, tmp_path / f"crash{round_}.log")
        channel = grpc.aio.insecure_channel(server.address, interceptors=[RequestHeader()])
        stub = pb_grpc.CredentialBrokerStub(channel)
        stop = asyncio.Event()

        async def writer(stub: pb_grpc.CredentialBrokerStub = stub, stop: asyncio.Event = stop) -> None:
            nonlocal counter
            while not stop.is_set():
                counter += 1
                user = f"user{counter}"
                try:
                    await connect_over_grpc(stub, auth, user)
                    acknowledged.add(user)
                    await stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM))
                except grpc.aio.AioRpcError:
                    return  # the server died under us

        workers = [asyncio.ensure_future(writer()) for _ in range(4)]
        await asyncio.sleep(rng.uniform(0.4, 1.0))
        server.kill()
        stop.set()
        await asyncio.gather(*workers)
        await channel.close()
        if store_backend == "sqlite":
            conn = sqlite3.connect(broker.db_path)
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            conn.close()
        else:
            await _no_row_lock_outlives_the_killed_process(broker)
        store = broker.open_store()
        try:
            vault = CredentialVault(store, EnvelopeCipher(keyring))
            for user in acknowledged:
                assert vault.get(user, key) is not None, user  # every acknowledged write survived
            rows = broker.query("SELECT user_id FROM credentials")
            for (user,) in rows:
                assert vault.get(str(user), key) is not None  # and every record still opens
        finally:
            store.close()
    assert len(acknowledged) >= 20


async def _no_row_lock_outlives_the_killed_process(broker: Broker, within: float = 10.0) -> None:
    """PostgreSQL ends a dead client's transaction and frees its row locks once it sees the
    socket close; until then the next process's writes would wait. Bounded wait, then fail."""
    import psycopg

    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            for table in ("credentials", "pending_flows"):
                broker.query(f"SELECT 1 FROM {table} FOR UPDATE NOWAIT")
            return
        except psycopg.errors.LockNotAvailable:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)
