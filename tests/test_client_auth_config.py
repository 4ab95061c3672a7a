"""private_key_jwt and client_assertion_file settings: each misconfiguration is one clear
start-up line naming the key, and no key material ever appears in it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.config import load_config
from broker.crypto import generate_keyring_file
from tests.brokerproc import run_cli
from tests.client_keys import ClientKey
from tests.conftest import REDIRECT_URI

WHERE = "upstreams[0].auth_broker"


def _document(tmp_path: Path, **auth: Any) -> dict[str, Any]:
    ab = {
        "mode": "oauth_connect",
        "authorization_endpoint": "https://login.example.test/authorize",
        "token_endpoint": "https://login.example.test/token",
        "client_id": "app",
        "redirect_uri": REDIRECT_URI,
        "token_endpoint_auth_method": "private_key_jwt",
        **auth,
    }
    return {
        "store": {"path": str(tmp_path / "broker.db")},
        "keyring": {"file": str(tmp_path / "keyring.json")},
        "upstreams": [{"name": "up", "url": "https://api.example.test", "auth_broker": ab}],
    }


def _pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def _start_error(tmp_path: Path, command: str = "check", **auth: Any) -> str:
    """The one line the real CLI stops with (``config check``, or ``serve``)."""
    if not (tmp_path / "keyring.json").exists():
        generate_keyring_file(tmp_path / "keyring.json")
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump({"listen": ["127.0.0.1:0"], **_document(tmp_path, **auth)}))
    args = ["config", "check"] if command == "check" else ["serve"]
    done = run_cli(*args, "--config", str(config), check=False)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "PRIVATE KEY" not in done.stderr and "MII" not in done.stderr
    prefix = "credential-broker: "
    assert lines[0].startswith(prefix)
    return lines[0][len(prefix) :]


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({}, f"{WHERE}.private_key_file: token_endpoint_auth_method private_key_jwt needs exactly one"),
        (
            {"private_key_file": "a.pem", "client_assertion_file": "t.jwt"},
            f"{WHERE}.private_key_file: token_endpoint_auth_method private_key_jwt needs exactly one",
        ),
        (
            {"client_assertion_file": "t.jwt", "client_secret": "s"},
            f"{WHERE}.client_secret: not used with private_key_jwt",
        ),
        (
            {"client_assertion_file": "t.jwt", "key_id": "k1"},
            f"{WHERE}.key_id: only with private_key_file",
        ),
        (
            {
                "token_endpoint_auth_method": "client_secret_post",
                "client_secret": "s",
                "private_key_file": "a",
            },
            f"{WHERE}.private_key_file: set token_endpoint_auth_method: private_key_jwt",
        ),
    ],
)
def test_settings_that_do_not_fit_together(tmp_path: Path, auth: dict[str, Any], expected: str) -> None:
    assert _start_error(tmp_path, **auth).startswith(expected)


def test_unreadable_private_key_file(tmp_path: Path) -> None:
    message = _start_error(tmp_path, private_key_file="absent.pem")
    assert message.startswith(f"{WHERE}.private_key_file: cannot read {tmp_path / 'absent.pem'}")


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"not a key at all\n", id="garbage"),
        pytest.param(lambda: _pem(ed25519.Ed25519PrivateKey.generate()), id="ed25519"),
        pytest.param(lambda: _pem(ec.generate_private_key(ec.SECP384R1())), id="p384"),
        pytest.param(lambda: _pem(rsa.generate_private_key(65537, 1024)), id="rsa1024"),
        pytest.param(
            lambda: (
                ec.generate_private_key(ec.SECP256R1())
                .public_key()
                .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            ),
            id="public-key",
        ),
    ],
)
@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_private_key_file_of_the_wrong_type(tmp_path: Path, content: Any, command: str) -> None:
    path = tmp_path / "client.pem"
    path.write_bytes(content() if callable(content) else content)
    path.chmod(0o600)
    message = _start_error(tmp_path, command, private_key_file="client.pem")
    assert message.startswith(f"{WHERE}.private_key_file: {path} is not")
    assert "RSA (2048 bits or more) or EC P-256" in message


def test_a_private_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    key = ClientKey.generate()
    path = key.write(tmp_path / "client.pem", mode=0o644)
    message = _start_error(tmp_path, private_key_file=str(path))
    assert message.startswith(f"{WHERE}.private_key_file: {path} has mode 0644")
    assert f"chmod 600 {path}" in message


def test_a_good_key_loads_relative_to_the_config(tmp_path: Path) -> None:
    ClientKey.generate("ES256").write(tmp_path / "client.pem")
    config = load_config(_document(tmp_path, private_key_file="client.pem"), environ={}, base_dir=tmp_path)
    assert config.upstreams[0].auth_broker.private_key_file == tmp_path / "client.pem"
    generate_keyring_file(tmp_path / "keyring.json")
    config_file = tmp_path / "broker.yaml"
    config_file.write_text(
        yaml.safe_dump({"listen": ["127.0.0.1:0"], **_document(tmp_path, private_key_file="client.pem")})
    )
    done = run_cli("config", "check", "--config", str(config_file), check=False)
    assert done.returncode == 0, done.stderr


def test_a_certificate_that_is_not_the_keys_is_refused(tmp_path: Path) -> None:
    ClientKey.generate().write(tmp_path / "client.pem")
    ClientKey.generate().certificate(tmp_path / "other.crt")
    message = _start_error(tmp_path, private_key_file="client.pem", certificate_file="other.crt")
    assert message == (
        f"{WHERE}.certificate_file: {tmp_path / 'other.crt'} is not the certificate of private_key_file"
    )


def test_a_certificate_file_needs_a_private_key_file(tmp_path: Path) -> None:
    message = _start_error(tmp_path, client_assertion_file="t.jwt", certificate_file="c.crt")
    assert message.startswith(f"{WHERE}.certificate_file: only with private_key_file")
