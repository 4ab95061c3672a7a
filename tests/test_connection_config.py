"""connection_params and connection_fields in the config (issue 13): a pattern or template that
could let a value change an endpoint's host or scheme is one clear config error at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import load_config, provider_catalogue
from broker.endpoint_templates import check_pattern
from broker.errors import ConfigError

SHOP = {"pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}


def _load(tmp_path: Path, url: str = "https://api.test", **auth: Any) -> Any:
    ab = {
        "mode": "oauth_connect",
        "client_id": "cid",
        "client_secret": "test-secret-not-real",
        "redirect_uri": "https://app.test/callback",
        "authorization_endpoint": "https://{shop}.myshopify.com/admin/oauth/authorize",
        "token_endpoint": "https://{shop}.myshopify.com/admin/oauth/access_token",
        "connection_params": {"shop": SHOP},
        **auth,
    }
    document = {
        "keyring": {"file": str(tmp_path / "k.json")},
        "upstreams": [{"name": "s", "url": url, "auth_broker": ab}],
    }
    return load_config(document, environ={}, base_dir=tmp_path)


def test_a_shop_template_loads(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        url="https://{shop}.myshopify.com/admin/api",
        connection_fields={
            "shop": {"from": "connect", "param": "shop"},
            "realm": {"from": "callback", "param": "realmId"},
        },
    )
    auth = config.upstreams[0].auth_broker
    assert auth.connection_patterns() == {"shop": SHOP["pattern"]}
    assert auth.connection_fields["realm"].source == "callback"


@pytest.mark.parametrize(
    "pattern",
    [
        r"^[a-z0-9.-]{1,63}$",  # '.'
        r"^[a-z/]{1,63}$",
        r"^[a-z:]{1,63}$",
        r"^[a-z@]{1,63}$",
        r"^[a-z%]{1,63}$",
        r"^[a-z?]{1,63}$",
        r"^[a-z#]{1,63}$",
        r"^[a-z\\]{1,63}$",
        "^[a-z\u0430]{1,63}$",  # a Cyrillic letter
        r"^\w{1,63}$",
        r"^.{1,63}$",
        r"^[^/]{1,63}$",
        r"[a-z]{1,63}",  # unanchored
        r"^[a-z]{1,63}",
        r"^a$|^evil\.com$",
        r"^[a-z]+$",  # unbounded
        r"^[a-z]{1,64}$",  # longer than a DNS label
        r"^[a-z]*$",  # empty
        r"(?i)^[a-z]{1,63}$",  # flags: 'K' matches the Kelvin sign
        r"^[+-/]{1,3}$",  # a range spanning '.' and '/'
        r"^[a-z",  # not a regular expression
    ],
)
def test_a_pattern_that_lets_a_value_leave_its_label_is_refused(tmp_path: Path, pattern: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, connection_params={"shop": {"pattern": pattern}})
    assert info.value.message.startswith("upstreams[0].auth_broker.connection_params.shop.pattern: ")
    assert "\n" not in info.value.message  # one clear line
    with pytest.raises(ValueError):
        check_pattern(pattern)


@pytest.mark.parametrize(
    ("key", "template", "expected"),
    [
        ("authorization_endpoint", "https://{shop}/authorize", "at least two fixed labels"),
        ("token_endpoint", "https://{shop}.com/token", "at least two fixed labels"),
        ("token_endpoint", "https://x.{shop}/token", "at least two fixed labels"),
        ("token_endpoint", "{shop}://x.example.com/token", "must be an absolute http(s) URL"),
        ("token_endpoint", "https://x.example.com:{shop}/token", "placeholder in the port"),
        ("token_endpoint", "https://{shop}@x.example.com/token", "user info"),
        ("token_endpoint", "https://x.example.com/token?s={shop}", "query"),
        ("refresh_endpoint", "https://{tenant}.example.com/token", "{tenant} is not declared"),
        ("revocation_endpoint", "https://{shop.example.com/revoke", "unbalanced"),
        ("issuer", "https://{shop}.example.com", "issuer: may not have placeholders"),
    ],
)
def test_a_template_that_could_change_the_host_is_refused(
    tmp_path: Path, key: str, template: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, **{key: template})
    assert expected in info.value.message
    assert "upstreams[0].auth_broker" in info.value.message


def test_the_upstream_url_template_is_checked_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, url="https://{host}/api")
    assert info.value.message.startswith("upstreams[0]: url: {host} is not declared")
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, url="https://{shop}/api")
    assert "url: a placeholder in the host" in info.value.message


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"x": {"from": "callback", "param": "code"}}, "'code' is the callback's own"),
        ({"x": {"from": "callback", "param": "state"}}, "'state' is the callback's own"),
        ({"x": {"from": "callback", "param": "access_token"}}, "is the callback's own"),
        ({"x": {"from": "callback", "param": "refresh_token"}}, "is the callback's own"),
        ({"x": {"from": "token", "path": "authed_user.access_token"}}, "reads a token"),
        ({"x": {"from": "token", "path": "a|refresh_token"}}, "reads a token"),
        ({"x": {"from": "token", "path": "id_token"}}, "reads a token"),
        ({"x": {"from": "token"}}, "needs path"),
        ({"x": {"from": "callback", "path": "a"}}, "needs param"),
        ({"x": {"from": "connect", "param": "nope"}}, "'nope' is not declared in connection_params"),
        ({"x": {"from": "elsewhere", "param": "a"}}, "connection_fields.x.from"),
        ({"bad name": {"from": "callback", "param": "a"}}, "is not a name"),
        ({f"f{i}": {"from": "callback", "param": "a"} for i in range(17)}, "at most 16"),
    ],
)
def test_bad_connection_fields_are_refused(tmp_path: Path, fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, connection_fields=fields)
    assert expected in info.value.message


def test_connection_params_only_for_oauth_connect(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(
            tmp_path,
            mode="token_exchange",
            authorization_endpoint=None,
            token_endpoint="https://t.test/token",
        )
    assert "connection_params: only for mode oauth_connect" in info.value.message


def test_templated_presets_validate_and_a_config_can_override_their_params(tmp_path: Path) -> None:
    catalogue = provider_catalogue()
    assert set(catalogue["shopify"].auth_broker.connection_params) == {"shop"}
    assert set(catalogue["zendesk"].auth_broker.connection_params) == {"subdomain"}
    assert set(catalogue["microsoft-tenant"].auth_broker.connection_params) == {"tenant"}
    assert catalogue["quickbooks"].auth_broker.connection_fields["realm_id"].param == "realmId"
    document = {
        "keyring": {"file": str(tmp_path / "k.json")},
        "upstreams": [
            {
                "name": "s",
                "url": "https://api.test",
                "auth_broker": {
                    "provider": "shopify",
                    "client_id": "cid",
                    "client_secret": "test-secret-not-real",
                    "redirect_uri": "https://app.test/callback",
                    "connection_params": {"shop": {"pattern": "^(acme|globex)$"}},
                },
            }
        ],
    }
    auth = load_config(document, environ={}, base_dir=tmp_path).upstreams[0].auth_broker
    assert auth.connection_patterns() == {"shop": "^(acme|globex)$"}
    assert auth.connection_fields["shop"].param == "shop"  # the preset's, kept


def test_fields_read_from_a_token_answer_are_plain_bounded_and_never_a_token() -> None:
    import json

    from broker.providers.shaping import parse_answer

    answer = {
        "access_token": "at-value",
        "refresh_token": "rt-value",
        "token_type": "Bearer",
        "instance_url": "https://acme.my.salesforce.com",
        "team": {"id": "T01", "name": "Acme"},
        "count": 7,
        "flag": True,
        "copy": "at-value",  # the access token under another name
        "refresh_copy": "rt-value",
        "nested": {"a": [1, 2]},
        "huge": "x" * 3000,
        "control": "a\u0000b",
    }
    paths = {
        name: name
        for name in ("instance_url", "count", "flag", "copy", "refresh_copy", "nested", "huge", "control")
    }
    token = parse_answer(
        200, json.dumps(answer).encode(), fields={**paths, "team_id": "team.id", "absent": "no.such"}
    )
    assert dict(token.fields) == {
        "instance_url": "https://acme.my.salesforce.com",
        "count": "7",
        "flag": "true",
        "team_id": "T01",
    }
