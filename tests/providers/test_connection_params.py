"""Per-connection endpoints and connection fields (issue 13), end to end: the real gRPC server,
``provider: NAME`` with only the endpoints overridden, loopback emulators written from the
providers' documentation.

Shopify: the shop fills every endpoint, is kept (sealed) with the connection and reused by
refresh; hostile values are refused before anything is stored or sent. QuickBooks: realmId from
the callback is kept and returned; revocation takes a JSON body. Microsoft: the tenant as a
connection param, reused by a reconnect. Google and QuickBooks: Disconnect revokes at the
provider.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import REDIRECT_URI, Broker, BrokerFactory, error_info
from tests.providers.emulator import CLIENT_ID, Emulator
from tests.providers.google import Google
from tests.providers.microsoft import TENANT, MicrosoftTenant
from tests.providers.quickbooks import REALM_ID, QuickBooks
from tests.providers.salesforce import Salesforce
from tests.providers.shopify import Shopify
from tests.providers.zendesk import Zendesk


def _start(kind: type[Emulator]) -> Iterator[Any]:
    server = kind().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shopify() -> Iterator[Shopify]:
    yield from _start(Shopify)


@pytest.fixture
def quickbooks() -> Iterator[QuickBooks]:
    yield from _start(QuickBooks)


async def _broker(make_broker: BrokerFactory, emulator: Emulator, **auth: Any) -> Broker:
    ab = {
        "provider": emulator.provider,
        "client_id": CLIENT_ID,
        "client_secret": emulator.client_secret,
        "redirect_uri": REDIRECT_URI,
        **emulator.endpoints(),
        **auth,
    }
    return await make_broker(
        upstreams=[{"name": "up", "url": "https://api.provider.test", "auth_broker": ab}]
    )


async def _connect(
    broker: Broker, emulator: Emulator, user: str = "alice", params: dict[str, str] | None = None
) -> pb.CompleteResponse:
    started = await broker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(
            user_id=user,
            upstream="up",
            connection_params=emulator.connection_params if params is None else params,
        )
    )
    callback = await asyncio.to_thread(emulator.authorize, started.authorization_url, user)
    others = {k: v for k, v in callback.items() if k not in ("code", "state")}
    return await broker.stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id=user, callback_params=others)
    )


async def _resolve(broker: Broker, user: str = "alice") -> pb.ResolveResponse:
    return await broker.stub.Resolve(pb.ResolveRequest(user_id=user, upstream="up"))


async def _fields(broker: Broker, user: str = "alice") -> dict[str, str]:
    listed = await broker.stub.ListConnections(pb.ListConnectionsRequest(user_id=user))
    (connection,) = listed.connections
    return dict(connection.connection_fields)


@pytest.mark.parametrize("store_backend", ["sqlite", "postgres"])
async def test_shopify_shop_fills_every_endpoint_and_is_kept_sealed(
    make_broker: BrokerFactory, shopify: Shopify, store_backend: str
) -> None:
    broker = await _broker(make_broker, shopify, scopes=["read_products", "write_orders"])
    await _connect(broker, shopify, "alice", {"shop": "acme-store"})
    await _connect(broker, shopify, "bob", {"shop": "other-shop"})
    asked = shopify.authorization_requests()
    assert [urlsplit(r.path).path for r in asked] == [
        "/acme-store/admin/oauth/authorize",
        "/other-shop/admin/oauth/authorize",
    ]
    assert asked[0].query["scope"] == "read_products,write_orders"
    assert "code_challenge" not in asked[0].query  # Shopify documents no PKCE
    exchange = shopify.token_requests()[0]
    assert exchange.path == "/acme-store/admin/oauth/access_token"
    assert exchange.form()["expiring"] == "1" and exchange.form()["client_secret"] == shopify.client_secret

    resolved = await _resolve(broker)
    assert dict(resolved.connection_fields) == {"shop": "acme-store"}
    assert await _fields(broker, "bob") == {"shop": "other-shop"}
    # Refresh reuses each connection's own shop.
    broker.clock.advance(3600)
    renewed = await _resolve(broker)
    assert renewed.access_token != resolved.access_token
    assert dict(renewed.connection_fields) == {"shop": "acme-store"}
    await broker.stub.Refresh(pb.RefreshRequest(user_id="bob", upstream="up"))
    refreshes = [r.path for r in shopify.token_requests() if r.form().get("grant_type") == "refresh_token"]
    assert sorted(refreshes) == [
        "/acme-store/admin/oauth/access_token",
        "/other-shop/admin/oauth/access_token",
    ]
    # Sealed with the tokens: not in any clear column or file.
    assert b"acme-store" not in broker.db_bytes() and b"other-shop" not in broker.db_bytes()


HOSTILE = [
    "evil.com/x",
    "a.b",
    "%2e",
    "acme-st\u043ere",  # a Cyrillic 'o'
    "\uff41cme",  # a fullwidth 'a'
    "a" * 64,
    "a" * 10_000,
    "",
    "acme\n",
    "acme\nstore",
    "acme store",
    "ACME",  # the pattern is lowercase
    "evil.com#",
    "acme@evil.com",
    "acme:443",
    "..",
    "-acme",
]


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v)[:24])
async def test_hostile_shop_values_are_refused_before_anything_is_stored_or_sent(
    make_broker: BrokerFactory, shopify: Shopify, value: str
) -> None:
    broker = await _broker(make_broker, shopify)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id="alice", upstream="up", connection_params={"shop": value})
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert "connection_params.shop" in details
    if len(value) > 3:
        assert value not in details  # never echoed
    assert broker.query("SELECT COUNT(*) FROM pending_flows")[0][0] == 0
    assert shopify.requests == []
    # The server keeps serving: a good value works at once.
    await _connect(broker, shopify, "alice", {"shop": "acme-store"})


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, "connection_params.shop: required"),
        ({"shop": "acme", "host": "evil.com"}, "'host' is not declared"),
        ({"shop": "acme", "sh\nop": "x"}, "a key is not declared"),
    ],
)
async def test_missing_or_undeclared_params_are_refused(
    make_broker: BrokerFactory, shopify: Shopify, params: dict[str, str], expected: str
) -> None:
    broker = await _broker(make_broker, shopify)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id="alice", upstream="up", connection_params=params)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (info.value.details() or "")
    assert broker.query("SELECT COUNT(*) FROM pending_flows")[0][0] == 0


async def test_not_connected_without_params_says_how_and_sends_nothing(
    make_broker: BrokerFactory, shopify: Shopify
) -> None:
    broker = await _broker(make_broker, shopify)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _resolve(broker)
    detail = error_info(info.value)
    assert detail.reason == "NOT_CONNECTED"
    assert "authorization_url" not in detail.metadata  # no shop known: no URL can be built
    assert "connection_params" in (info.value.details() or "")
    assert broker.query("SELECT COUNT(*) FROM pending_flows")[0][0] == 0
    assert shopify.requests == []


async def test_a_dead_shopify_grant_reconnects_at_the_same_shop(
    make_broker: BrokerFactory, shopify: Shopify
) -> None:
    broker = await _broker(make_broker, shopify)
    await _connect(broker, shopify, "alice", {"shop": "acme-store"})
    shopify.kill_grants("alice")
    broker.clock.advance(3600)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _resolve(broker)
    detail = error_info(info.value)
    assert detail.reason == "RECONNECT_REQUIRED"
    # The way back is at the connection's own shop.
    assert urlsplit(detail.metadata["authorization_url"]).path == "/acme-store/admin/oauth/authorize"


@pytest.mark.parametrize("store_backend", ["sqlite", "postgres"])
async def test_quickbooks_realm_id_from_the_callback_and_json_revocation(
    make_broker: BrokerFactory, quickbooks: QuickBooks, store_backend: str
) -> None:
    broker = await _broker(make_broker, quickbooks)
    await _connect(broker, quickbooks)
    resolved = await _resolve(broker)
    assert dict(resolved.connection_fields) == {"realm_id": REALM_ID}
    assert await _fields(broker) == {"realm_id": REALM_ID}
    assert quickbooks.token_requests()[-1].basic() == (CLIENT_ID, quickbooks.client_secret)
    # Refresh (rotating refresh token) keeps the field.
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))
    assert dict((await _resolve(broker)).connection_fields) == {"realm_id": REALM_ID}
    assert REALM_ID.encode() not in broker.db_bytes()  # sealed
    # Disconnect revokes at Intuit, with the JSON body it documents.
    done = await broker.stub.Disconnect(pb.DisconnectRequest(user_id="alice", upstream="up"))
    assert done.deleted
    assert [(r.token_type_hint, r.outcome) for r in done.revocations] == [
        ("refresh_token", "revoked"),
        ("access_token", "revoked"),
    ]
    revocations = [r for r in quickbooks.requests if r.path == QuickBooks.revoke_path]
    assert len(revocations) == 2 and all(
        r.headers["content-type"].startswith("application/json") for r in revocations
    )
    assert len(quickbooks.revoked) == 2
    assert all(g.dead for g in quickbooks.grants.values())


async def test_callback_params_keep_only_declared_fields_never_code_or_state(
    make_broker: BrokerFactory, quickbooks: QuickBooks
) -> None:
    broker = await _broker(make_broker, quickbooks)
    started = await broker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream="up")
    )
    callback = await asyncio.to_thread(quickbooks.authorize, started.authorization_url, "alice")
    # Too many or too large callback_params: refused before the flow is used.
    for bad in ({f"k{i}": "v" for i in range(65)}, {"realmId": "9" * 5000}):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await broker.stub.Complete(
                pb.CompleteRequest(
                    state=started.state, code=callback["code"], user_id="alice", callback_params=bad
                )
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "callback_params" in (info.value.details() or "")
    assert quickbooks.token_requests() == []
    await broker.stub.Complete(
        pb.CompleteRequest(
            state=started.state,
            code=callback["code"],
            user_id="alice",
            callback_params={**callback, "realmId": REALM_ID, "other": "ignored"},
        )
    )
    assert await _fields(broker) == {"realm_id": REALM_ID}


async def test_microsoft_tenant_as_a_connection_param(make_broker: BrokerFactory) -> None:
    emulator = MicrosoftTenant().start()
    try:
        broker = await _broker(make_broker, emulator)
        await _connect(broker, emulator)
        assert emulator.token_requests()[-1].path == f"/{TENANT}/oauth2/v2.0/token"
        assert dict((await _resolve(broker)).connection_fields) == {"tenant": TENANT}
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))
        assert emulator.token_requests()[-1].path == f"/{TENANT}/oauth2/v2.0/token"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await broker.stub.BuildAuthorizationURL(
                pb.BuildAuthorizationURLRequest(
                    user_id="bob", upstream="up", connection_params={"tenant": "contoso.onmicrosoft.com"}
                )
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        emulator.stop()


async def test_salesforce_instance_url_is_returned(make_broker: BrokerFactory) -> None:
    emulator = Salesforce().start()
    try:
        broker = await _broker(make_broker, emulator)
        await _connect(broker, emulator)
        assert dict((await _resolve(broker)).connection_fields) == {
            "instance_url": "https://emulated.my.salesforce.com"
        }
    finally:
        emulator.stop()


async def test_google_disconnect_revokes_at_google(make_broker: BrokerFactory) -> None:
    emulator = Google().start()
    try:
        broker = await _broker(make_broker, emulator, scopes=["openid", "email"])
        await _connect(broker, emulator)
        done = await broker.stub.Disconnect(pb.DisconnectRequest(user_id="alice", upstream="up"))
        assert [(r.token_type_hint, r.outcome) for r in done.revocations] == [
            ("refresh_token", "revoked"),
            ("access_token", "revoked"),
        ]
        assert all(g.dead for g in emulator.grants.values())
    finally:
        emulator.stop()


async def test_zendesk_subdomain_json_body_and_pkce(make_broker: BrokerFactory) -> None:
    emulator = Zendesk().start()
    try:
        broker = await _broker(make_broker, emulator, scopes=["read", "write"])
        await _connect(broker, emulator, "alice", {"subdomain": "acme-support"})
        asked = emulator.authorization_requests()[-1]
        assert asked.path == "/acme-support/oauth/authorizations/new"
        assert asked.query["scope"] == "read write" and asked.query["code_challenge_method"] == "S256"
        exchange = emulator.token_requests()[-1]
        assert exchange.path == "/acme-support/oauth/tokens"
        body = exchange.json()
        assert body["grant_type"] == "authorization_code" and body["client_secret"] == emulator.client_secret
        assert "code_verifier" in body
        assert dict((await _resolve(broker)).connection_fields) == {"subdomain": "acme-support"}
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))
        assert emulator.token_requests()[-1].path == "/acme-support/oauth/tokens"
        assert emulator.token_requests()[-1].json()["grant_type"] == "refresh_token"
    finally:
        emulator.stop()
