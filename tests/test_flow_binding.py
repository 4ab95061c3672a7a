"""A pending flow's ciphertext is bound to its upstream (issue 12, item 8).

The verifier (and the state) are sealed with associated data that names the flow's upstream, as
credentials are. A row moved to another upstream in the database fails to open, so Complete on
it is refused before any request is made: upstream A's code and verifier never reach B.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.crypto import EnvelopeCipher, FileKeySource
from broker.crypto.envelope import key_id_of
from broker.crypto.keyring import KeyEntry, Keyring, new_key_entry
from broker.errors import KeyringError
from broker.key_checks import StoreKeyCheck
from broker.keys import KeyRotation
from broker.oauth import rfc7636
from broker.store.base import PendingFlowRow
from broker.vault import record_context
from tests.authserver import AuthServer
from tests.conftest import REDIRECT_URI, UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends."""
    return str(request.param)


async def test_flow_moved_to_another_upstream_fails_closed(
    make_broker: BrokerFactory, auth_server: AuthServer, other_auth_server: AuthServer
) -> None:
    client_a = auth_server.new_client(redirect_uri=REDIRECT_URI)
    client_b = other_auth_server.new_client(redirect_uri=REDIRECT_URI)
    doc_b = upstream_doc(other_auth_server, client_b)
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
    assert other_auth_server.token_requests() == []  # B's token endpoint saw nothing
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


async def test_a_rewrapped_flow_still_completes(make_broker: BrokerFactory) -> None:
    """Key rotation re-wraps a flow's data key under the flow's full associated data."""
    broker = await make_broker()
    started = await broker.start_flow("alice")
    source = FileKeySource(Path(broker.document["keyring"]["file"]))
    store = broker.open_store()
    try:
        rotation = KeyRotation(source, store)
        rotation.promote(rotation.add())
        report = rotation.rewrap()
        assert (report.rewrapped, report.failed) == (1, 0)
    finally:
        store.close()
    (kek_id,) = broker.query("SELECT kek_id FROM pending_flows")[0]
    assert kek_id == source.load().primary_id
    callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
    await broker.stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
    )


def _legacy_flow(broker: Broker, user: str, state: str) -> None:
    """A flow as the previous release wrote it: the verifier sealed under (user, state hash)
    alone, without the state and without its upstream."""
    now = broker.clock.now()
    state_hash = rfc7636.state_hash(state)
    cipher = EnvelopeCipher(FileKeySource(Path(broker.document["keyring"]["file"])).load())
    payload = json.dumps({"verifier": rfc7636.new_verifier()}).encode()
    sealed = cipher.seal(payload, record_context("pending_flows", user, state_hash))
    key = broker.app.config.upstreams[0].key
    row = PendingFlowRow(state_hash, user, key, now, now + 600, key_id_of(sealed), sealed)
    store = broker.open_store()
    try:
        assert store.add_pending_flow(row, 5, now)
    finally:
        store.close()


async def test_flows_of_the_previous_format_fail_closed(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    state = rfc7636.new_state()
    _legacy_flow(broker, "alice", state)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Complete(pb.CompleteRequest(state=state, code="some-code", user_id="alice"))
    assert error_info(info.value).reason == "FLOW_NOT_FOUND"
    assert broker.auth.token_requests() == []
    # Resolve does not hand out an old-format flow (its URL cannot be rebuilt): it starts one.
    _legacy_flow(broker, "bob", rfc7636.new_state())
    with pytest.raises(grpc.aio.AioRpcError) as resolved:
        await broker.resolve("bob")
    url = error_info(resolved.value).metadata["authorization_url"]
    assert broker.query("SELECT COUNT(*) FROM pending_flows WHERE user_id = 'bob'")[0][0] == 2
    callback = await asyncio.to_thread(broker.auth.authorize, url, "bob")
    new_state = parse_qs(urlsplit(url).query)["state"][0]
    await broker.stub.Complete(pb.CompleteRequest(state=new_state, code=callback["code"], user_id="bob"))


async def test_a_store_holding_only_old_format_flows_still_starts(make_broker: BrokerFactory) -> None:
    """The start-up keyring check accepts an old-format flow as proof the key is right."""
    broker = await make_broker()
    _legacy_flow(broker, "alice", rfc7636.new_state())
    source = FileKeySource(Path(broker.document["keyring"]["file"]))
    store = broker.open_store()
    try:
        broker.query("DELETE FROM key_checks")  # a store from before per-key check values: the trial
        other = Keyring([new_key_entry("primary")])
        wrong = Keyring([KeyEntry(source.load().primary_id, "primary", 0.0, other.entries[0].material)])
        with pytest.raises(KeyringError, match="not the keyring"):
            StoreKeyCheck(store, "wrong.json", "test").verify(wrong)
        report = StoreKeyCheck(store, "keyring.json", "test").verify(source.load())
        assert report.by_trial == (source.load().primary_id,)
    finally:
        store.close()
