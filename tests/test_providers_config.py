"""Provider presets (issue 13): `provider: NAME`, overrides, providers_file, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import load_config, provider_catalogue
from broker.errors import ConfigError
from tests import leakcheck


def _doc(tmp_path: Path, auth: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "keyring": {"file": str(tmp_path / "keyring.json")},
        "upstreams": [{"name": "gh", "url": "https://api.github.com", "auth_broker": auth}],
        **top,
    }


def _client(**more: Any) -> dict[str, Any]:
    return {
        "client_id": "cid",
        "client_secret": "test-secret-not-real",
        "redirect_uri": "https://app.test/callback",
        **more,
    }


def test_provider_preset_fills_the_upstream(tmp_path: Path) -> None:
    config = load_config(_doc(tmp_path, {"provider": "github", **_client()}), environ={}, base_dir=tmp_path)
    auth = config.upstreams[0].auth_broker
    assert auth.provider == "github"
    assert auth.authorization_endpoint == "https://github.com/login/oauth/authorize"
    assert auth.token_endpoint == "https://github.com/login/oauth/access_token"
    assert auth.reconnect_errors == ("bad_verification_code", "bad_refresh_token")
    assert auth.client_id == "cid"  # the config's own keys are kept


def test_every_preset_key_can_be_overridden(tmp_path: Path) -> None:
    """GitHub Enterprise Server: the github preset with its endpoints overridden."""
    ghes = "https://github.example.com"
    auth = {
        "provider": "google",
        "authorization_endpoint": f"{ghes}/login/oauth/authorize",
        "token_endpoint": f"{ghes}/login/oauth/access_token",
        "token_endpoint_auth_method": "client_secret_basic",
        # mapping knobs merge key by key; null drops a preset key
        "authorization_params": {"prompt": None, "hd": "example.com"},
        **_client(),
    }
    config = load_config(_doc(tmp_path, auth), environ={}, base_dir=tmp_path)
    got = config.upstreams[0].auth_broker
    assert got.authorization_endpoint == f"{ghes}/login/oauth/authorize"
    assert got.token_endpoint == f"{ghes}/login/oauth/access_token"
    assert got.token_endpoint_auth_method.value == "client_secret_basic"
    assert got.authorization_params == {"access_type": "offline", "hd": "example.com"}
    assert got.revocation_endpoint == "https://oauth2.googleapis.com/revoke"  # not overridden


def test_unknown_provider_is_a_clear_error_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_doc(tmp_path, {"provider": "githb", **_client()}), environ={}, base_dir=tmp_path)
    assert info.value.message == (
        "upstreams[0].auth_broker.provider: unknown provider 'githb'; did you mean github? "
        "(credential-broker providers list)"
    )


def test_providers_file_adds_and_replaces_entries(tmp_path: Path) -> None:
    (tmp_path / "providers.yaml").write_text(
        yaml.safe_dump(
            {
                "providers": {
                    "acme": {
                        "title": "Acme",
                        "docs": ["https://docs.acme.test/oauth"],
                        "auth_broker": {
                            "mode": "oauth_connect",
                            "authorization_endpoint": "https://acme.test/authorize",
                            "token_endpoint": "https://acme.test/token",
                            "token_request_format": "json",
                        },
                    },
                    "github": {
                        "title": "Our GitHub Enterprise",
                        "docs": ["https://docs.github.com/en/enterprise-server@3.15/apps"],
                        "auth_broker": {
                            "mode": "oauth_connect",
                            "authorization_endpoint": "https://ghe.test/login/oauth/authorize",
                            "token_endpoint": "https://ghe.test/login/oauth/access_token",
                        },
                    },
                }
            }
        )
    )
    doc = _doc(tmp_path, {"provider": "acme", **_client()}, providers_file="providers.yaml")
    doc["upstreams"].append(
        {"name": "gh2", "url": "https://x.test", "auth_broker": {"provider": "github", **_client()}}
    )
    config = load_config(doc, environ={}, base_dir=tmp_path)
    assert config.upstreams[0].auth_broker.token_request_format == "json"
    assert config.upstreams[1].auth_broker.token_endpoint == "https://ghe.test/login/oauth/access_token"
    assert config.upstreams[1].auth_broker.reconnect_errors == ()  # replaced, not merged
    assert config.providers_file == tmp_path / "providers.yaml"  # relative to the config's folder


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {
                "title": "X",
                "docs": ["https://d.test"],
                "auth_broker": {"mode": "oauth_connect", "token_endpont": "https://t.test"},
            },
            "bad.auth_broker.token_endpont: unknown key; did you mean token_endpoint?",
        ),
        (
            {
                "title": "X",
                "docs": ["https://d.test"],
                "auth_broker": {"mode": "oauth_connect", "client_secret": "s"},
            },
            "a preset may not set client_secret",
        ),
        (
            {"title": "X", "docs": ["http://d.test"], "auth_broker": {"mode": "oauth_connect"}},
            "bad.docs: must use https",
        ),
        (
            {
                "title": "X",
                "docs": ["https://d.test"],
                "auth_broker": {"mode": "oauth_connect", "authorization_params": {"state": "fixed"}},
            },
            "'state' is set by the broker and cannot be overridden",
        ),
    ],
)
def test_a_bad_providers_file_entry_names_file_and_entry(
    tmp_path: Path, entry: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"providers": {"bad": entry}}))
    with pytest.raises(ConfigError) as info:
        load_config(
            _doc(tmp_path, {"provider": "github", **_client()}, providers_file=str(path)),
            environ={},
            base_dir=tmp_path,
        )
    assert str(path) in info.value.message
    assert expected in info.value.message


@pytest.mark.parametrize(
    ("knob", "value", "expected"),
    [
        ("authorization_params", {"code_challenge": "x"}, "'code_challenge' is set by the broker"),
        ("token_params", {"grant_type": "password"}, "'grant_type' is set by the broker"),
        ("refresh_params", {"refresh_token": "x"}, "'refresh_token' is set by the broker"),
        ("token_response", {"access_token": "a..b"}, "token_response.access_token"),
        ("reconnect_errors", ["bad code"], "is not an error code"),
        ("pkce", "plain", "pkce"),
        ("token_request_format", "xml", "token_request_format"),
        ("refresh_endpoint", "http://evil.test/refresh", "must use https"),
    ],
)
def test_bad_knob_values_are_refused(tmp_path: Path, knob: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            _doc(tmp_path, {"provider": "github", **_client(), knob: value}), environ={}, base_dir=tmp_path
        )
    assert expected in info.value.message
    assert f"upstreams[0].auth_broker.{knob}" in info.value.message


def test_every_builtin_entry_validates_and_cites_its_documentation() -> None:
    catalogue = provider_catalogue()
    assert len(catalogue) >= 7
    for name, entry in catalogue.items():
        assert entry.docs and all(url.startswith("https://") for url in entry.docs), name
        assert entry.setup, name
        auth = entry.auth_broker
        assert auth.authorization_endpoint and auth.token_endpoint, name
        for url in (
            auth.authorization_endpoint,
            auth.token_endpoint,
            auth.refresh_endpoint,
            auth.revocation_endpoint,
        ):
            assert url is None or url.startswith("https://"), (name, url)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "broker", *args], capture_output=True, text=True, cwd=cwd, timeout=30
    )
    leakcheck.observe_text(done.stdout + done.stderr, "cli output")
    return done


def test_cli_providers_list_and_show(tmp_path: Path) -> None:
    listed = _cli("providers", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names == sorted(provider_catalogue())
    shown = _cli("providers", "show", "figma", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    document = yaml.safe_load(shown.stdout)
    assert document["auth_broker"]["refresh_endpoint"] == "https://api.figma.com/v1/oauth/refresh"
    assert document["docs"][0].startswith("https://")
    unknown = _cli("providers", "show", "slak", cwd=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (
        "credential-broker: unknown provider 'slak'; did you mean slack? (see: credential-broker providers list)"
    )
    assert unknown.stdout == ""


def test_docs_providers_md_lists_every_catalogue_entry() -> None:
    text = (Path(__file__).parent.parent / "docs" / "providers.md").read_text()
    for name, entry in provider_catalogue().items():
        assert f"(`{name}`)" in text, name
        for url in entry.docs:
            assert url in text, (name, url)


def test_a_providers_file_is_checked_even_when_no_upstream_uses_it(tmp_path: Path) -> None:
    doc = _doc(tmp_path, {"mode": "oauth_connect", "token_endpoint": "https://t.test/token", **_client()})
    doc["upstreams"][0]["auth_broker"]["authorization_endpoint"] = "https://t.test/authorize"
    load_config(doc, environ={}, base_dir=tmp_path)  # fine without one
    doc["providers_file"] = "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(doc, environ={}, base_dir=tmp_path)
    assert info.value.message.startswith(f"providers_file: cannot read {tmp_path / 'missing.yaml'}")
