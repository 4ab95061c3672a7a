"""Config validation: every error names its field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import ClientAuthMethod, load_config, load_config_file
from broker.errors import ConfigError
from broker.models import upstream_key


def _doc(**auth: Any) -> dict[str, Any]:
    base = {
        "mode": "oauth_connect",
        "authorization_endpoint": "https://as.example/authorize",
        "token_endpoint": "https://as.example/token",
        "client_id": "cid",
        "client_secret": "s3",
        "redirect_uri": "https://app.example/callback",
    }
    base.update(auth)
    return {
        "keyring": {"file": "k.json"},
        "upstreams": [{"name": "gh", "url": "https://api.gh", "auth_broker": base}],
    }


def _load(doc: dict[str, Any], environ: dict[str, str] | None = None, base: Path = Path("/srv")) -> Any:
    return load_config(doc, environ=environ or {}, base_dir=base)


def test_valid_config_and_defaults() -> None:
    config = _load(_doc())
    up = config.upstreams[0]
    assert config.listen == ("127.0.0.1:50051",)
    assert up.auth_broker.token_endpoint_auth_method is ClientAuthMethod.CLIENT_SECRET_BASIC
    assert up.auth_broker.header == "Authorization" and up.auth_broker.header_format == "Bearer {token}"
    assert config.keyring.file == Path("/srv/k.json")
    assert config.store.path == Path("/srv/credential-broker-data/broker.db")
    assert "s3" not in repr(config)


def test_upstream_key_matches_reference_scheme() -> None:
    # name + "_" + first 16 hex of sha256(name|url)
    import hashlib

    expected = "gh_" + hashlib.sha256(b"gh|https://api.gh").hexdigest()[:16]
    assert upstream_key("gh", "https://api.gh") == expected


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"token_endpoint": None}, "upstreams[0].auth_broker.token_endpoint: required"),
        (
            {"authorization_endpoint": None},
            "upstreams[0].auth_broker.authorization_endpoint: required for mode oauth_connect",
        ),
        ({"redirect_uri": None}, "upstreams[0].auth_broker.redirect_uri: required for mode oauth_connect"),
        ({"client_id": None}, "upstreams[0].auth_broker.client_id: required for mode oauth_connect"),
        ({"mode": "magic"}, "upstreams[0].auth_broker.mode:"),
        (
            {"token_endpoint": "http://as.example/token"},
            "upstreams[0].auth_broker.token_endpoint: must use https",
        ),
        (
            {"token_endpoint": "ftp://x/y"},
            "upstreams[0].auth_broker.token_endpoint: must be an absolute http(s) URL",
        ),
        (
            {"token_endpoint_auth_method": "tls_client_auth"},
            "upstreams[0].auth_broker.token_endpoint_auth_method:",
        ),
        (
            {"client_secret": None},
            "upstreams[0].auth_broker.client_secret: required with token_endpoint_auth_method",
        ),
        ({"header_format": "Bearer"}, "upstreams[0].auth_broker.header_format: must contain {token}"),
        ({"color": "blue"}, "upstreams[0].auth_broker.color: unknown key"),
        ({"client_secret_env": "X"}, "set only one of"),
    ],
)
def test_errors_name_the_field(change: dict[str, Any], message: str) -> None:
    doc = _doc()
    auth = doc["upstreams"][0]["auth_broker"]
    for key, value in change.items():
        if value is None:
            auth.pop(key)
        else:
            auth[key] = value
    with pytest.raises(ConfigError) as info:
        _load(doc)
    assert message in str(info.value)


def test_exchange_modes_accepted_with_reference_rules() -> None:
    for mode in ("token_exchange", "entra_obo"):
        doc = _doc(mode=mode, scopes=["api://x/.default"])
        auth = doc["upstreams"][0]["auth_broker"]
        for key in ("authorization_endpoint", "redirect_uri"):
            auth.pop(key)
        assert _load(doc).upstreams[0].auth_broker.mode.value == mode
        auth.pop("token_endpoint")
        with pytest.raises(ConfigError, match=r"token_endpoint: required"):
            _load(doc)


def test_secret_from_env_and_file(tmp_path: Path) -> None:
    doc = _doc()
    auth = doc["upstreams"][0]["auth_broker"]
    auth.pop("client_secret")
    auth["client_secret_env"] = "GH_SECRET"
    assert (
        _load(doc, {"GH_SECRET": "from-env"}).upstreams[0].auth_broker.client_secret.get_secret_value()
        == "from-env"
    )
    with pytest.raises(ConfigError, match=r"client_secret_env: environment variable GH_SECRET is not set"):
        _load(doc)
    auth.pop("client_secret_env")
    (tmp_path / "secret").write_text("from-file\n")
    auth["client_secret_file"] = "secret"
    assert _load(doc, base=tmp_path).upstreams[0].auth_broker.client_secret.get_secret_value() == "from-file"


def test_duplicate_names_and_listen_addresses() -> None:
    doc = _doc()
    doc["upstreams"].append(dict(doc["upstreams"][0]))
    with pytest.raises(ConfigError, match=r"upstreams\[1\].name: duplicate"):
        _load(doc)
    doc = _doc()
    doc["listen"] = ["unix:///run/b.sock", "127.0.0.1:0", "localhost"]
    with pytest.raises(ConfigError, match=r"listen: 'localhost': expected host:port"):
        _load(doc)


def test_yaml_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("listen: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(bad, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(tmp_path / "missing.yaml", environ={})
