"""Tampered or corrupt records fail closed: RECONNECT_REQUIRED, logged, counted, server serving."""

from __future__ import annotations

import struct
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import Broker, BrokerFactory, error_info

# Columns written with the sealed payload (a sealed copy is checked), the key id column, and the
# status; user_id/upstream_key are bound through the associated data.
BOUND = ("token_type", "scopes", "expires_at", "obtained_via", "updated_at", "status", "kek_id")
# Lifecycle bookkeeping, never secret and not sealed: changing it cannot hand out a token.
UNBOUND = ("generation", "created_at", "last_refresh_at", "last_error", "failure_count", "next_attempt_at")


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends."""
    return str(request.param)


@pytest.fixture
async def broker(make_broker: BrokerFactory) -> Broker:
    """These tests change the database behind the broker's back, as another process would, so
    the broker reads it on every Resolve (test_read_cache.py covers the default window)."""
    return await make_broker(read_cache_seconds=0)


def _get(broker: Broker, column: str, user: str = "alice") -> Any:
    value = broker.rows(f"SELECT {column} FROM credentials WHERE user_id = ?", (user,))[0][column]
    return value


def _set(broker: Broker, column: str, value: Any, user: str = "alice") -> None:
    broker.query(f"UPDATE credentials SET {column} = ? WHERE user_id = ?", (value, user))


def _flip(value: Any, position: int = 0) -> Any:
    """The value with one byte flipped (a bit of one byte; numbers in their IEEE/int bytes)."""
    if isinstance(value, bytes):
        return value[:position] + bytes([value[position] ^ 0x01]) + value[position + 1 :]
    if isinstance(value, str):
        raw = value.encode()
        return (raw[:position] + bytes([raw[position] ^ 0x01]) + raw[position + 1 :]).decode()
    if isinstance(value, float):
        raw = bytearray(struct.pack(">d", value))
        raw[-1] ^= 0x01
        return struct.unpack(">d", bytes(raw))[0]
    if isinstance(value, int):
        return value ^ 0x01
    return 1.0  # NULL becomes a value


async def _reconnect_required(broker: Broker, user: str = "alice") -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve(user)
    assert error_info(info.value).reason == "RECONNECT_REQUIRED"
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def _serving(broker: Broker) -> None:
    health = health_pb2_grpc.HealthStub(broker.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert (await broker.resolve("bob")).access_token  # another user is unaffected


async def test_every_byte_of_the_sealed_column_fails_closed(broker: Broker) -> None:
    await broker.connect("alice")
    await broker.connect("bob")
    good = await broker.resolve("alice")  # now cached in memory too
    sealed = _get(broker, "sealed")
    counted = broker.app.vault.decryption_failures
    for position in range(len(sealed)):
        _set(broker, "sealed", _flip(sealed, position))
        await _reconnect_required(broker)
    assert broker.app.vault.decryption_failures - counted == len(sealed)
    _set(broker, "sealed", sealed)
    assert (await broker.resolve("alice")).access_token == good.access_token
    await _serving(broker)


@pytest.mark.parametrize("column", BOUND)
async def test_a_flipped_byte_in_a_bound_column_fails_closed(
    broker: Broker, column: str, caplog: pytest.LogCaptureFixture
) -> None:
    await broker.connect("alice")
    await broker.connect("bob")
    await broker.resolve("alice")
    original = _get(broker, column)
    positions = range(len(original.encode())) if isinstance(original, str) else [0]
    for position in positions:
        _set(broker, column, _flip(original, position))
        await _reconnect_required(broker)
    assert any(r.getMessage() == "stored credential failed to decrypt" for r in caplog.records)
    _set(broker, column, original)
    assert (await broker.resolve("alice")).access_token
    await _serving(broker)


@pytest.mark.parametrize("column", UNBOUND)
async def test_bookkeeping_columns_never_yield_another_token(broker: Broker, column: str) -> None:
    await broker.connect("alice")
    await broker.connect("bob")
    mine = await broker.resolve("alice")
    _set(broker, column, _flip(_get(broker, column)))
    try:
        got = await broker.resolve("alice")
        assert got.access_token == mine.access_token
    except grpc.aio.AioRpcError as exc:
        assert error_info(exc).reason in ("RECONNECT_REQUIRED", "UPSTREAM_UNAVAILABLE")
    await _serving(broker)


async def test_ciphertext_moved_to_another_user_or_row(broker: Broker) -> None:
    await broker.connect("alice")
    await broker.connect("bob")
    bob = await broker.resolve("bob")
    alice_sealed = _get(broker, "sealed")
    _set(broker, "sealed", _get(broker, "sealed", "bob"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        got = await broker.resolve("alice")
        assert got.access_token != bob.access_token  # pragma: no cover - must not get here
    assert error_info(info.value).reason == "RECONNECT_REQUIRED"
    _set(broker, "sealed", alice_sealed)
    # Renaming the row (the user id column) moves the record to a user it was not sealed for.
    _set(broker, "user_id", "mallory")
    with pytest.raises(grpc.aio.AioRpcError) as moved:
        await broker.resolve("alice")
    assert error_info(moved.value).reason == "NOT_CONNECTED"
    await _reconnect_required(broker, "mallory")
    await _serving(broker)


async def test_truncated_records_and_unknown_key_ids(broker: Broker) -> None:
    await broker.connect("alice")
    await broker.connect("bob")
    sealed = _get(broker, "sealed")
    for length in (0, 1, 3, 4, 12, 70, 80, len(sealed) - 17, len(sealed) - 1):
        _set(broker, "sealed", sealed[:length])
        await _reconnect_required(broker)
    kid = _get(broker, "kek_id")
    unknown = "z" * len(kid)
    _set(broker, "sealed", sealed.replace(kid.encode(), unknown.encode(), 1))
    _set(broker, "kek_id", unknown)
    await _reconnect_required(broker)
    # A reconnect overwrites the broken record; nothing was deleted on the way.
    await broker.connect("alice")
    assert (await broker.resolve("alice")).access_token
    await _serving(broker)


async def test_a_corrupt_pending_flow_fails_closed_without_a_crash(broker: Broker) -> None:
    started = await broker.start_flow("alice")
    broker.query("UPDATE pending_flows SET sealed = substr(sealed, 1, 50)")
    import asyncio

    from broker._proto.credentialbroker.v1 import broker_pb2 as pb

    callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Complete(
            pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
        )
    # The flow is gone: the user is told to start a new one (nothing else can help them).
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(info.value).reason == "FLOW_NOT_FOUND"
    assert broker.app.vault.decryption_failures == 1
    assert broker.rows("SELECT * FROM pending_flows WHERE user_id = 'alice'") == []
    await broker.connect("bob")
    await _serving(broker)


async def test_a_sealed_column_turned_to_text_fails_closed_and_is_never_quoted(broker: Broker) -> None:
    """SQLite lets a damaged row hold TEXT (invalid UTF-8) where the sealed bytes were. Reading
    it must fail closed for that user, like any damaged record, and the error must not quote the
    column's contents (sqlite3's decode error does)."""
    if broker.app.config.store.backend != "sqlite":
        pytest.skip("PostgreSQL's bytea column cannot hold text")
    await broker.connect("alice")
    await broker.connect("bob")
    sealed = _get(broker, "sealed")
    broker.query("UPDATE credentials SET sealed = substr(sealed, 2) || 'x' WHERE user_id = 'alice'")
    assert broker.rows("SELECT typeof(sealed) AS t FROM credentials WHERE user_id = 'alice'") == [
        {"t": "text"}
    ]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice")
    assert (info.value.code(), error_info(info.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RECONNECT_REQUIRED",
    ), info.value.details()
    assert repr(sealed[2:12])[2:-1] not in (info.value.details() or "")
    await _serving(broker)


async def test_a_text_column_that_is_not_utf8_is_an_error_that_quotes_nothing(broker: Broker) -> None:
    """A damaged row whose clear text column holds invalid UTF-8: the store error says what is
    wrong without quoting the column (sqlite3's own message would)."""
    if broker.app.config.store.backend != "sqlite":
        pytest.skip("PostgreSQL refuses invalid UTF-8 in text columns")
    await broker.connect("alice")
    await broker.connect("bob")
    broker.query(
        "UPDATE credentials SET token_type = CAST(X'42ff65617265725365637265745a' AS TEXT) "
        "WHERE user_id = 'alice'"
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice")
    details = info.value.details() or ""
    assert "not UTF-8" in details and "earerSecret" not in details, details
    await _serving(broker)
