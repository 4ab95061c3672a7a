"""Resolve's read cache is dropped per credential: this process writing one credential (a
refresh, under background refresh load thousands a minute) does not send every other cached
Resolve back to the store. A write still wins over a read of the same credential that raced it."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.models import Credential, Secrets
from broker.vault import CredentialVault
from tests.conftest import UPSTREAM, BrokerFactory


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_writing_one_credential_keeps_the_others_remembered(make_broker: BrokerFactory) -> None:
    broker = await make_broker(read_cache_seconds=60)
    await broker.connect("alice")
    await broker.connect("bob")
    await broker.events_read()
    alice = await broker.resolve("alice")
    other = broker.open_store()  # another replica deletes alice's row: unseen for up to 60 s
    try:
        assert other.delete_credential("alice", broker.app.config.upstreams[0].key)
    finally:
        other.close()
    await broker.stub.Refresh(pb.RefreshRequest(user_id="bob", upstream=UPSTREAM))  # a write here
    assert (await broker.resolve("alice")).access_token == alice.access_token  # still remembered
    assert (await broker.resolve("bob")).access_token != alice.access_token


class _RacingStore:
    """A store whose first read of a credential lets a write of it land mid-read (as a refresh
    in a worker thread would) and then returns the row it read before that write."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.during_read: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def get_credential(self, user_id: str, upstream_key: str) -> Any:
        row = self._store.get_credential(user_id, upstream_key)
        hook, self.during_read = self.during_read, None
        if hook is not None:
            thread = threading.Thread(target=hook)
            thread.start()
            thread.join()
        return row


def test_a_write_during_a_read_of_the_same_credential_wins(make_vault: Any) -> None:
    store, vault = make_vault
    now = time.time()

    def credential(token: str) -> Credential:
        return Credential("alice", "up", Secrets(token), "Bearer", (), None, "connect_flow", now)

    vault.save(credential("old"), None, now)
    store.during_read = lambda: vault.save(credential("new"), None, now)
    found = vault.get("alice", "up", recent=True)  # read "old", while "new" was written
    assert found is not None and found[0].secrets.access_token == "old"
    again = vault.get("alice", "up", recent=True)
    assert again is not None and again[0].secrets.access_token == "new"  # not the raced read


@pytest.fixture
def make_vault(tmp_path: Any) -> Any:
    from broker.crypto import generate_keyring_file
    from broker.crypto.envelope import EnvelopeCipher
    from broker.crypto.keyring import FileKeySource
    from broker.store.sqlite import SqliteStore

    generate_keyring_file(tmp_path / "keyring.json")
    store = _RacingStore(SqliteStore(tmp_path / "broker.db"))
    vault = CredentialVault(
        store, EnvelopeCipher(FileKeySource(tmp_path / "keyring.json").load()), read_cache_seconds=60
    )
    yield store, vault
    store.close()
