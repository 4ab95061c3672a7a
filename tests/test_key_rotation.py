"""Key rotation: the `keys` CLI, re-wrap without touching payloads, refusals, rotation under load."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.app import build_app
from broker.clock import ManualClock
from broker.config import load_config
from broker.crypto import EnvelopeCipher, FileKeySource
from broker.crypto.envelope import key_id_of
from broker.crypto.keyring import Keyring, new_key_entry
from broker.errors import KeyringError, KeyRotationRefused
from broker.keys import KeyRotation
from broker.store import SqliteStore
from broker.vault import CredentialVault
from tests.brokerproc import run_cli, write_config
from tests.conftest import UPSTREAM, Broker, BrokerFactory


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """The rotation tests run on both store backends (the CLI with a postgres config too)."""
    return str(request.param)


def _rows(broker: Broker) -> list[tuple[str, str, bytes]]:
    return [
        (str(r["user_id"]), str(r["kek_id"]), bytes(r["sealed"]))
        for r in broker.rows("SELECT user_id, kek_id, sealed FROM credentials ORDER BY user_id")
    ]


def _status(config: Path) -> dict[str, tuple[str, int]]:
    out = run_cli("keys", "status", "--config", str(config)).stdout
    return {kid: (state, int(n)) for kid, state, n in (line.split("\t") for line in out.splitlines())}


async def test_keys_cli_full_rotation(broker: Broker) -> None:
    for user in ("alice", "bob", "carol"):
        await broker.connect(user)
    await broker.start_flow("dave")  # a pending flow is sealed too
    config = write_config(broker.document, broker.tmp / "broker.yaml")
    (old,) = _status(config)
    assert _status(config)[old] == ("primary", 4)

    added = run_cli("keys", "add", "--config", str(config)).stdout
    new = added.strip()
    assert added == new + "\n" and new != old  # the id alone on stdout
    assert _status(config) == {old: ("primary", 4), new: ("active", 0)}
    refused = run_cli("keys", "retire", old, "--config", str(config), check=False)
    assert refused.returncode == 2 and "primary" in refused.stderr

    run_cli("keys", "promote", new, "--config", str(config))
    refused = run_cli("keys", "retire", old, "--config", str(config), check=False)
    assert refused.returncode == 2 and "still wraps 4 record(s)" in refused.stderr
    before = _rows(broker)
    done = run_cli("keys", "rewrap", "--config", str(config), "--batch-size", "2").stdout
    assert "re-wrapped 4 record(s)" in done and "in 2 batch(es)" in done
    after = _rows(broker)
    for (user, kid_before, sealed_before), (_, kid_after, sealed_after) in zip(before, after, strict=True):
        assert (kid_before, kid_after) == (old, new), user
        assert key_id_of(sealed_after) == new
        # The payload (nonce and ciphertext) is byte for byte the same; only the wrapped key moved.
        assert sealed_after[-100:] == sealed_before[-100:]
    again = run_cli("keys", "rewrap", "--config", str(config)).stdout
    assert "re-wrapped 0 record(s)" in again  # resumable: nothing left to do
    run_cli("keys", "retire", old, "--config", str(config))
    assert _status(config) == {new: ("primary", 4)}
    # The running broker follows the file: it still serves everyone.
    for user in ("alice", "bob", "carol"):
        assert (await broker.resolve(user)).access_token
    started = await broker.start_flow("erin")
    assert started.state


async def test_unknown_ids_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    keyring_path = tmp_path / "k.json"
    source = FileKeySource(keyring_path)
    source.save(Keyring([new_key_entry("primary")]))
    store = SqliteStore(tmp_path / "b.db")
    try:
        rotation = KeyRotation(source, store)
        with pytest.raises(KeyRotationRefused, match="not in the keyring"):
            rotation.promote("knothere")
        with pytest.raises(KeyRotationRefused, match="not in the keyring"):
            rotation.retire("knothere")
        with pytest.raises(KeyRotationRefused, match="batch size"):
            rotation.rewrap(0)
    finally:
        store.close()


async def test_rewrap_skips_a_record_rewritten_meanwhile_and_reports_unopenable(broker: Broker) -> None:
    await broker.connect("alice")
    await broker.connect("bob")
    source = FileKeySource(broker.app.config.keyring.file)
    store = broker.open_store()
    try:
        rotation = KeyRotation(source, store)
        rotation.promote(rotation.add())
        # bob's row is corrupted on disk: it cannot be re-wrapped, and is reported.
        broker.query("UPDATE credentials SET sealed = substr(sealed, 1, 90) WHERE user_id = 'bob'")
        batch = store.sealed_records(0, 10, source.load().primary_id)
        alice = next(r for r in batch if r.user_id == "alice")
        # alice is refreshed by the server between the scan and the write: the CAS skips her.
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
        cipher = EnvelopeCipher(source.load())
        from broker.vault import record_context

        stale = cipher.rewrap(alice.sealed, record_context("credentials", "alice", alice.record_key))
        assert store.replace_sealed([(alice, source.load().primary_id, stale)]) == 0
        report = rotation.rewrap()
        assert report.failed == 1 and report.remaining  # bob's broken row stays visible
        with pytest.raises(KeyRotationRefused, match="still wraps 1 record"):
            rotation.retire(next(iter(report.remaining)))
        assert (await broker.resolve("alice")).access_token
    finally:
        store.close()


async def test_rotation_under_steady_resolve_load_has_zero_failed_calls(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    users = [f"user{i}" for i in range(8)]
    for user in users:
        await broker.connect(user)
    config = write_config(broker.document, broker.tmp / "broker.yaml")
    old = broker.app.vault._cipher.primary_key_id  # type: ignore[attr-defined]
    stop = asyncio.Event()
    calls = {"resolve": 0, "refresh": 0}
    failures: list[str] = []

    async def load(offset: int) -> None:
        i = offset
        while not stop.is_set():
            user = users[i % len(users)]
            try:
                if i % 7 == 0:  # writes too: refreshes seal under whatever the primary is now
                    await broker.stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM))
                    calls["refresh"] += 1
                else:
                    resolved = await broker.resolve(user)
                    assert resolved.access_token
                    calls["resolve"] += 1
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}")
            i += 1

    def rotate() -> str:
        new = run_cli("keys", "add", "--config", str(config)).stdout.strip()
        run_cli("keys", "promote", new, "--config", str(config))
        time.sleep(0.2)
        run_cli("keys", "rewrap", "--config", str(config), "--batch-size", "3")
        run_cli("keys", "retire", old, "--config", str(config))
        return new

    workers = [asyncio.ensure_future(load(n)) for n in range(4)]
    try:
        new = await asyncio.to_thread(rotate)
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert failures == []
    assert calls["resolve"] > 100 and calls["refresh"] > 10
    assert {kid for _, kid, _ in _rows(broker)} == {new}
    # A fresh process with the rotated keyring (the old key is gone) opens every record.
    fresh = build_app(
        load_config(broker.document, environ={}, base_dir=broker.tmp).model_copy(
            update={"listen": ("127.0.0.1:0",)}
        ),
        clock=ManualClock(),
    )
    try:
        assert all(fresh.vault.get(user, broker.app.config.upstreams[0].key) for user in users)
    finally:
        fresh.store.close()
        await fresh.tokens.aclose()


async def test_start_up_with_a_keyring_that_opens_nothing_says_so(broker: Broker, tmp_path: Path) -> None:
    await broker.connect("alice")
    other = tmp_path / "other-keyring.json"
    FileKeySource(other).save(Keyring([new_key_entry("primary")]))
    document = {**broker.document, "keyring": {"file": str(other)}, "listen": ["127.0.0.1:0"]}
    config = write_config(document, tmp_path / "other.yaml")
    done = run_cli("serve", "--config", str(config), check=False)
    assert done.returncode == 2
    assert "key ids not in the keyring" in done.stderr and str(other) in done.stderr
    # Same ids, other material: named as the wrong keyring.
    real = FileKeySource(broker.app.config.keyring.file).load()
    impostor = Keyring([new_key_entry("primary")])
    entry = impostor.entries[0]
    from broker.crypto.keyring import KeyEntry

    FileKeySource(other).save(Keyring([KeyEntry(real.primary_id, "primary", 0.0, entry.material)]))
    with pytest.raises(KeyringError, match="not the keyring the store was written with"):
        build_app(load_config(document, environ={}, base_dir=tmp_path))
    vault = CredentialVault(broker.open_store(), EnvelopeCipher(real))
    assert vault.get("alice", broker.app.config.upstreams[0].key) is not None
    vault.store.close()
