"""A fixed refresh-token lifetime from config (issue 14, item 3): an upstream's (or preset's)
``auth_broker.refresh_token_lifetime_seconds`` dates each NEW refresh token in ListConnections'
``refresh_token_expires_at`` when the answer sends no lifetime of its own; an answer that keeps
the old refresh token keeps its expiry; a lifetime the provider sends always wins.

Real broker, real store (both backends), the test authorization server; the clock is the only
fake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.config import load_config, provider_catalogue
from broker.errors import ConfigError
from tests.authserver import AuthServer
from tests.conftest import UPSTREAM, Broker, BrokerFactory, upstream_doc

SIXTY_DAYS = 60 * 86400


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _expiry(broker: Broker, user: str = "alice") -> float | None:
    answer = await broker.stub.ListConnections(pb.ListConnectionsRequest(user_id=user))
    (found,) = [c for c in answer.connections if c.upstream == UPSTREAM]
    if not found.HasField("refresh_token_expires_at"):
        return None
    stamp = found.refresh_token_expires_at
    return float(stamp.seconds) + stamp.nanos / 1e9


async def _refresh(broker: Broker, user: str = "alice") -> None:
    await broker.stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM))


def _live_refresh_token(auth: AuthServer, user: str) -> str:
    (token,) = [t for t in auth.live_tokens(user) if auth.refresh_token_live(t)]
    return token


async def _lifetime_broker(make_broker: BrokerFactory, auth_server: AuthServer, lifetime: int) -> Broker:
    client = auth_server.new_client(redirect_uri="https://app.example/callback")
    upstream = upstream_doc(auth_server, client, refresh_token_lifetime_seconds=lifetime)
    return await make_broker(upstreams=[upstream], client=client)


async def test_a_configured_lifetime_dates_each_new_refresh_token(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    broker = await _lifetime_broker(make_broker, auth_server, SIXTY_DAYS)
    clock = broker.clock
    assert auth_server.rotate_refresh_tokens  # every refresh below issues a new refresh token

    connected_at = clock.now()
    await broker.connect("alice")
    assert await _expiry(broker) == pytest.approx(connected_at + SIXTY_DAYS, abs=0.01)

    # A rotated refresh token is a new one: its lifetime counts from now.
    clock.advance(3600)
    rotated_at = clock.now()
    await _refresh(broker)
    assert await _expiry(broker) == pytest.approx(rotated_at + SIXTY_DAYS, abs=0.01)

    # An answer without a refresh token keeps the old one, and so its expiry.
    clock.advance(3600)
    broker.auth.fail_next("no_refresh_token")
    await _refresh(broker)
    assert await _expiry(broker) == pytest.approx(rotated_at + SIXTY_DAYS, abs=0.01)


async def test_an_echoed_refresh_token_keeps_its_expiry(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    broker = await _lifetime_broker(make_broker, auth_server, SIXTY_DAYS)
    connected_at = broker.clock.now()
    await broker.connect("alice")
    auth_server.rotate_refresh_tokens = False  # the old refresh token stays valid...
    broker.clock.advance(3600)
    same = _live_refresh_token(auth_server, "alice")
    broker.auth.fail_next("override", fields={"refresh_token": same})  # ...and the answer repeats it
    await _refresh(broker)
    assert await _expiry(broker) == pytest.approx(connected_at + SIXTY_DAYS, abs=0.01)


async def test_a_lifetime_the_provider_sends_wins_over_the_configured_one(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    broker = await _lifetime_broker(make_broker, auth_server, SIXTY_DAYS)
    clock = broker.clock
    connected_at = clock.now()
    broker.auth.fail_next("override", fields={"refresh_token_expires_in": 7200})
    await broker.connect("alice")
    assert await _expiry(broker) == pytest.approx(connected_at + 7200, abs=0.01)

    clock.advance(600)
    refreshed_at = clock.now()
    broker.auth.fail_next("override", fields={"refresh_token_expires_in": 3600})
    await _refresh(broker)
    assert await _expiry(broker) == pytest.approx(refreshed_at + 3600, abs=0.01)

    # The next rotation sends no lifetime: the configured one dates the new token.
    clock.advance(600)
    rotated_at = clock.now()
    await _refresh(broker)
    assert await _expiry(broker) == pytest.approx(rotated_at + SIXTY_DAYS, abs=0.01)


async def test_the_box_preset_lifetime_reaches_list_connections(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    client = auth_server.new_client(
        auth_method="client_secret_post", redirect_uri="https://app.example/callback"
    )
    upstream = upstream_doc(auth_server, client, provider="box")  # our server's endpoints over Box's
    del upstream["auth_broker"]["mode"], upstream["auth_broker"]["token_endpoint_auth_method"]
    broker = await make_broker(upstreams=[upstream], client=client)
    connected_at = broker.clock.now()
    await broker.connect("alice")
    assert await _expiry(broker) == pytest.approx(connected_at + SIXTY_DAYS, abs=0.01)


async def test_without_a_configured_lifetime_a_new_refresh_token_has_no_known_expiry(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker()
    await broker.connect("alice")
    assert await _expiry(broker) is None
    await _refresh(broker)
    assert await _expiry(broker) is None


# -- config ----------------------------------------------------------------------------------


def _doc(tmp_path: Path, **auth: Any) -> dict[str, Any]:
    return {
        "keyring": {"file": str(tmp_path / "keyring.json")},
        "upstreams": [
            {
                "name": "files",
                "url": "https://api.files.test",
                "auth_broker": {
                    "client_id": "cid",
                    "client_secret": "test-secret-not-real",
                    "redirect_uri": "https://app.test/callback",
                    **auth,
                },
            }
        ],
    }


_OWN = {
    "mode": "oauth_connect",
    "authorization_endpoint": "https://auth.files.test/authorize",
    "token_endpoint": "https://auth.files.test/token",
}


def test_the_lifetime_is_read_from_config(tmp_path: Path) -> None:
    config = load_config(
        _doc(tmp_path, **_OWN, refresh_token_lifetime_seconds=86400), environ={}, base_dir=tmp_path
    )
    assert config.upstreams[0].auth_broker.refresh_token_lifetime_seconds == 86400
    unset = load_config(_doc(tmp_path, **_OWN), environ={}, base_dir=tmp_path)
    assert unset.upstreams[0].auth_broker.refresh_token_lifetime_seconds is None


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (0, "must be more than 0"),
        (-60, "must be more than 0"),
        ("60 days", "must be a whole number"),
        ("86400", "must be a whole number"),
        (1.5, "must be a whole number"),
        (True, "must be a whole number"),
        ([86400], "must be a whole number"),
    ],
)
def test_a_lifetime_that_is_not_a_positive_whole_number_is_refused(
    tmp_path: Path, value: object, why: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            _doc(tmp_path, **_OWN, refresh_token_lifetime_seconds=value), environ={}, base_dir=tmp_path
        )
    assert f"upstreams[0].auth_broker.refresh_token_lifetime_seconds: {why}" in info.value.message


def test_box_preset_gives_sixty_days_and_an_upstream_may_override_it(tmp_path: Path) -> None:
    # Box: "A Refresh Token is valid for 60 days and can be used ... only once" (Refresh a Token).
    assert provider_catalogue()["box"].auth_broker.refresh_token_lifetime_seconds == SIXTY_DAYS
    preset = load_config(_doc(tmp_path, provider="box"), environ={}, base_dir=tmp_path)
    assert preset.upstreams[0].auth_broker.refresh_token_lifetime_seconds == SIXTY_DAYS
    shorter = load_config(
        _doc(tmp_path, provider="box", refresh_token_lifetime_seconds=3600), environ={}, base_dir=tmp_path
    )
    assert shorter.upstreams[0].auth_broker.refresh_token_lifetime_seconds == 3600
    dropped = load_config(
        _doc(tmp_path, provider="box", refresh_token_lifetime_seconds=None), environ={}, base_dir=tmp_path
    )
    assert dropped.upstreams[0].auth_broker.refresh_token_lifetime_seconds is None


def test_only_presets_with_a_documented_fixed_lifetime_set_one() -> None:
    with_lifetime = {
        name: entry.auth_broker.refresh_token_lifetime_seconds
        for name, entry in provider_catalogue().items()
        if entry.auth_broker.refresh_token_lifetime_seconds is not None
    }
    assert with_lifetime == {"box": SIXTY_DAYS}
