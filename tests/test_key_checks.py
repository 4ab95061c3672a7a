"""Per-key check values: damaged records never stop the broker; a wrong keyring is refused.

Start-up tells "this is not the store's keyring" from "some records are damaged" by the store's
per-key check values (broker/crypto/keycheck.py, broker/key_checks.py), never by trying a few
records. Damaged records fail closed for their own user only.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from broker.crypto import keycheck
from broker.crypto.keyring import FileKeySource, KeyEntry, Keyring, new_key_entry
from broker.errors import KeyringError
from broker.keys import KeyRotation
from tests.brokerproc import run_cli, write_config
from tests.conftest import Broker, BrokerFactory, error_info


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends."""
    return str(request.param)


def _checks(broker: Broker) -> dict[str, bytes]:
    return {str(k): bytes(v) for k, v in broker.query("SELECT kek_id, check_value FROM key_checks")}


def _kek_ids(broker: Broker) -> dict[str, str]:
    return {str(u): str(k) for u, k in broker.query("SELECT user_id, kek_id FROM credentials")}


def _damage(broker: Broker, user: str) -> None:
    """Flip one bit of the record's authentication tag (its last byte)."""
    (sealed,) = broker.query("SELECT sealed FROM credentials WHERE user_id = ?", (user,))[0]
    sealed = bytes(sealed)
    broker.query(
        "UPDATE credentials SET sealed = ? WHERE user_id = ?", (sealed[:-1] + bytes([sealed[-1] ^ 1]), user)
    )


async def _reconnect_required(broker: Broker, user: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve(user)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(info.value).reason == "RECONNECT_REQUIRED"


async def _two_keys_in_use(make_broker: BrokerFactory) -> tuple[Broker, dict[str, list[str]]]:
    """A broker whose store has four users under each of two key ids; users by key id."""
    broker = await make_broker(read_cache_seconds=0)
    for i in range(4):
        await broker.connect(f"old{i}")
    store = broker.open_store()
    try:
        rotation = KeyRotation(FileKeySource(broker.app.config.keyring.file), store)
        rotation.promote(rotation.add())  # the serving broker follows the file
    finally:
        store.close()
    for i in range(4):
        await broker.connect(f"new{i}")
    by_key: dict[str, list[str]] = {}
    for user, kid in sorted(_kek_ids(broker).items()):
        by_key.setdefault(kid, []).append(user)
    assert sorted(len(users) for users in by_key.values()) == [4, 4]
    return broker, by_key


async def test_damaged_records_never_stop_the_broker(make_broker: BrokerFactory) -> None:
    first, by_key = await _two_keys_in_use(make_broker)
    assert set(_checks(first)) == set(by_key)  # each key proved itself when first written
    damaged = [user for users in by_key.values() for user in users[:3]]
    for user in damaged:
        _damage(first, user)

    again = await make_broker(read_cache_seconds=0)  # a restart on the same store and keyring
    for users in by_key.values():
        assert (await again.resolve(users[3])).access_token  # healthy users resolve
    for user in damaged:
        await _reconnect_required(again, user)  # each damaged record fails closed, alone

    for users in by_key.values():
        for user in users[3:]:
            _damage(first, user)
    # Every record damaged, one record's key id column too (an id nobody ever had).
    first.query("UPDATE credentials SET kek_id = 'kdamaged' WHERE user_id = ?", (damaged[0],))
    last = await make_broker(read_cache_seconds=0)
    for users in by_key.values():
        for user in users:
            await _reconnect_required(last, user)
    # Reconnecting overwrites a damaged record: that user is whole again.
    await last.connect(damaged[1])
    assert (await last.resolve(damaged[1])).access_token


async def test_a_store_without_check_values_gets_them_on_first_start(make_broker: BrokerFactory) -> None:
    first, by_key = await _two_keys_in_use(make_broker)
    first.query("DELETE FROM key_checks")  # as written by a broker before check values existed
    for users in by_key.values():
        for user in users[:3]:
            _damage(first, user)  # and three damaged records per key: the first three tried
    again = await make_broker(read_cache_seconds=0)
    assert set(_checks(again)) == set(by_key)
    keyring = FileKeySource(again.app.config.keyring.file).load()
    for entry in keyring.entries:
        assert keycheck.verify_check_value(entry, _checks(again)[entry.id])
    for users in by_key.values():
        assert (await again.resolve(users[3])).access_token
        await _reconnect_required(again, users[0])


async def test_a_different_keyring_is_refused_with_what_to_do(broker: Broker, tmp_path: Path) -> None:
    await broker.connect("alice")
    real = FileKeySource(broker.app.config.keyring.file).load()
    expected = real.primary_id
    other = tmp_path / "other-keyring.json"
    FileKeySource(other).save(Keyring([new_key_entry("primary")]))
    document = {**broker.document, "keyring": {"file": str(other)}}
    config = write_config(document, tmp_path / "other.yaml")
    for keyring in (
        Keyring([new_key_entry("primary")]),  # other ids
        Keyring([KeyEntry(expected, "primary", 0.0, new_key_entry("primary").material)]),  # same id
    ):
        FileKeySource(other).save(keyring)
        done = run_cli("serve", "--config", str(config), check=False)
        assert done.returncode == 2 and done.stdout == ""
        (line,) = done.stderr.splitlines()
        assert "Traceback" not in line
        assert str(other) in line  # the keyring file
        assert f"expects key ids {expected}," in line  # the ids the store expects
        assert "keyring.file" in line and "restore" in line  # what to do
        assert "not the keyring the store was written with" in line
    # The record trial was never the judge: with every record deleted the store still knows.
    broker.query("DELETE FROM credentials")
    broker.query("DELETE FROM pending_flows")
    with pytest.raises(KeyringError, match=f"expects key ids {expected}"):
        from broker.app import build_app
        from broker.config import load_config

        build_app(load_config(document, environ={}, base_dir=tmp_path))
    assert set(_checks(broker)) == {expected}  # nothing was written for the impostor


async def test_keys_commands_keep_check_values_and_refuse_a_wrong_keyring(
    broker: Broker, tmp_path: Path
) -> None:
    await broker.connect("alice")
    config = write_config(broker.document, tmp_path / "broker.yaml")
    old = broker.app.vault._cipher.primary_key_id  # type: ignore[attr-defined]
    new = run_cli("keys", "add", "--config", str(config)).stdout.strip()
    assert set(_checks(broker)) == {old, new}  # written when the key is added
    run_cli("keys", "promote", new, "--config", str(config))
    run_cli("keys", "rewrap", "--config", str(config))
    run_cli("keys", "retire", old, "--config", str(config))
    assert set(_checks(broker)) == {new}  # and dropped with the key
    assert (await broker.resolve("alice")).access_token

    impostor = Keyring([KeyEntry(new, "primary", 0.0, new_key_entry("primary").material)])
    FileKeySource(broker.app.config.keyring.file).save(impostor)
    for args in (("keys", "add"), ("keys", "rewrap"), ("keys", "promote", new)):
        done = run_cli(*args, "--config", str(config), check=False)
        assert done.returncode == 2, args
        assert "not the keyring the store was written with" in done.stderr, args
    assert FileKeySource(broker.app.config.keyring.file).load().ids() == [new]  # untouched


def test_check_value_format() -> None:
    key = new_key_entry("primary")
    value = keycheck.make_check_value(key)
    assert value[:3] == b"CK\x01" and len(value) == 3 + 12 + len(keycheck.CHECK_PLAINTEXT) + 16
    assert keycheck.verify_check_value(key, value)
    assert value != keycheck.make_check_value(key)  # a fresh nonce each time
    impostor = KeyEntry(key.id, "primary", 0.0, new_key_entry("primary").material)
    assert not keycheck.verify_check_value(impostor, value)
    renamed = KeyEntry("kother", "primary", 0.0, key.material)  # bound to the key id
    assert not keycheck.verify_check_value(renamed, value)
    for position in range(len(value)):
        flipped = value[:position] + bytes([value[position] ^ 1]) + value[position + 1 :]
        assert not keycheck.verify_check_value(key, flipped)
    for length in range(len(value)):
        assert not keycheck.verify_check_value(key, value[:length])


def test_the_one_time_trial_reads_records_whose_sealed_column_turned_to_text(tmp_path: Path) -> None:
    """SQLite lets a damaged row hold text in the sealed column; the trial still reads past it."""
    import sqlite3

    from broker.crypto import EnvelopeCipher
    from broker.key_checks import StoreKeyCheck
    from broker.models import Credential, CredentialStatus, Secrets
    from broker.store import SqliteStore
    from broker.vault import CredentialVault

    keyring = Keyring([new_key_entry("primary")])
    store = SqliteStore(tmp_path / "broker.db")
    try:
        vault = CredentialVault(store, EnvelopeCipher(keyring))
        for i in range(4):
            credential = Credential(
                f"user{i}", "gh_k", Secrets(f"at-{i}", None), "Bearer", (), None, "oauth_connect", 1.0,
                CredentialStatus.CONNECTED,
            )  # fmt: skip
            vault.save(credential, None, 1.0)
        conn = sqlite3.connect(tmp_path / "broker.db")
        # substr || text yields TEXT holding invalid UTF-8: the first three records, as a broker
        # written before check values existed would have left them.
        conn.execute("UPDATE credentials SET sealed = substr(sealed, 2) || 'x' WHERE user_id != 'user3'")
        conn.commit()
        conn.close()
        report = StoreKeyCheck(store, "keyring.json", "test").verify(keyring)
        assert report.by_trial == (keyring.primary_id,) and report.written == (keyring.primary_id,)
        assert StoreKeyCheck(store, "keyring.json", "test").verify(keyring).confirmed == (keyring.primary_id,)
    finally:
        store.close()
