"""Config errors help (item 14): every error at once, in plain words, with a suggestion for a typo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import load_config, load_config_file
from broker.errors import ConfigError
from tests.brokerproc import run_cli


def _upstream(name: str, **auth: Any) -> dict[str, Any]:
    base = {
        "mode": "oauth_connect",
        "authorization_endpoint": "https://as.example/authorize",
        "token_endpoint": "https://as.example/token",
        "client_id": "cid",
        "token_endpoint_auth_method": "none",
        "redirect_uri": "https://app.example/callback",
    }
    base.update(auth)
    return {"name": name, "url": f"https://{name}.example", "auth_broker": base}


def _errors(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config({"keyring": {"file": "k.json"}, **document}, environ={}, base_dir=Path("/srv"))
    return str(info.value).splitlines()


def test_three_shape_errors_are_all_listed() -> None:
    lines = _errors(
        {
            "flow_ttl_seconds": "soon",
            "upstreams": [_upstream("a", scopes="read", token_endpont="https://as.example/token")],
        }
    )
    assert lines[0] == "3 errors in the config:"
    assert lines[1:] == [
        "  flow_ttl_seconds: must be a whole number (got 'soon')",
        "  upstreams[0].auth_broker.scopes: must be a list of strings",
        "  upstreams[0].auth_broker.token_endpont: unknown key; did you mean token_endpoint?",
    ]


def test_three_rule_errors_are_all_listed() -> None:
    """Errors found after the shape check (per upstream, per caller) are collected too."""
    missing_redirect = _upstream("a")
    del missing_redirect["auth_broker"]["redirect_uri"]
    lines = _errors(
        {
            "upstreams": [missing_redirect, _upstream("b", mode="entra_obo")],
            "callers": [{"name": "app"}],
        }
    )
    assert lines[0] == "3 errors in the config:"
    assert "  upstreams[0].auth_broker.redirect_uri: required for mode oauth_connect" in lines
    assert any(
        line.startswith("  upstreams[1].auth_broker.scopes: required for mode entra_obo") for line in lines
    )
    assert "  callers[0]: set token_sha256 or cert_identities" in lines


def test_one_error_is_one_line() -> None:
    assert _errors({"listn": ["127.0.0.1:1"]}) == ["listn: unknown key; did you mean listen?"]


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {"upstreams": [_upstream("a", scopes="read")]},
            "upstreams[0].auth_broker.scopes: must be a list of strings",
        ),
        ({"upstreams": [_upstream("a", scopes=[1])]}, "upstreams[0].auth_broker.scopes[0]: must be a string"),
        ({"upstreams": "a"}, "upstreams: must be a list"),
        ({"log": "json"}, "log: must be a mapping (key: value)"),
        ({"workers": 0}, "workers: must be at least 1"),
        ({"workers": 2.5}, "workers: must be a whole number"),
        ({"read_cache_seconds": "x"}, "read_cache_seconds: must be a number"),
        ({"store": {"backend": "mysql"}}, "store.backend: must be one of 'sqlite', 'postgres'"),
        ({"event_loop": "libev"}, "event_loop: must be one of 'uvloop', 'asyncio'"),
        ({"http": {"timeout_seconds": 0}}, "http.timeout_seconds: must be more than 0"),
        ({"upstreams": [_upstream("a", mode="magic")]}, "upstreams[0].auth_broker.mode: must be one of"),
        (
            {"upstreams": [{**_upstream("a"), "name": "no spaces"}]},
            "upstreams[0].name: must be 1 to 64 letters",
        ),
        (
            {"upstreams": [_upstream("a", resource=5)]},
            "upstreams[0].auth_broker.resource: must be a string or a list of strings",
        ),
        ({"listen": [5]}, "listen[0]: must be a string or a mapping (key: value)"),
        ({"keyring": None}, "keyring: must be a mapping (key: value)"),
    ],
)
def test_plain_words(document: dict[str, Any], expected: str) -> None:
    (line,) = _errors(document)
    assert line.startswith(expected), line
    assert "Input should" not in line and "valid tuple" not in line


def test_a_bad_item_in_a_string_or_list_field_is_named_alone() -> None:
    assert _errors({"upstreams": [_upstream("a", resource=["https://r.example", 1])]}) == [
        "upstreams[0].auth_broker.resource[1]: must be a string"
    ]
    assert _errors({"upstreams": [_upstream("a", client_id=["x"])]}) == [
        "upstreams[0].auth_broker.client_id: must be a string"
    ]


def test_unknown_keys_suggest_the_closest_known_key() -> None:
    (line,) = _errors({"upstreams": [_upstream("a", token_endpont="https://as.example/token")]})
    assert line == "upstreams[0].auth_broker.token_endpont: unknown key; did you mean token_endpoint?"
    (line,) = _errors({"store": {"pth": "x.db"}})
    assert line == "store.pth: unknown key; did you mean path?"
    lines = _errors({"listen": [{"adress": "127.0.0.1:1"}]})
    assert lines[1:] == [
        "  listen[0].address: required",
        "  listen[0].adress: unknown key; did you mean address?",
    ]
    (line,) = _errors({"zzzzzz": 1})
    assert line == "zzzzzz: unknown key"


def test_yaml_syntax_error_gives_line_column_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text('keyring:\n  file: k.json\nlisten: ["127.0.0.1:1"\nlog: {}\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(bad, environ={})
    message = str(info.value)
    assert message.startswith(f"{bad}: not valid YAML at line 4, column 1: ")
    assert "expected ',' or ']'" in message
    bad.write_text("keyring:\n\tfile: k.json\n")
    with pytest.raises(ConfigError, match=r"at line 2, column 1: found character '\\t'"):
        load_config_file(bad, environ={})


def test_cli_prints_every_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("keyring: {file: k.json}\nlisten: 5\nworkers: none\nlgo: {}\n")
    done = run_cli("config", "check", "--config", str(config), check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "credential-broker: 3 errors in the config:",
        "  listen: must be a list",
        "  workers: must be a whole number (got 'none')",
        "  lgo: unknown key; did you mean log?",
    ]
