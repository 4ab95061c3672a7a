"""Start-up failures are one clear line (item 13), through the real CLI.

Each failure is tried with ``serve`` and with ``config check`` (which binds each address and
closes it again, and looks at the keyring and the socket folders without serving): stderr is
exactly one line naming the config entry and the problem, the exit status is 2, and there is
no traceback.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.crypto import generate_keyring_file
from tests.brokerproc import run_cli

COMMANDS = [["config", "check"], ["serve"]]


def _config(tmp: Path, *, keyring: bool = True, **settings: Any) -> Path:
    path = tmp / "keyring.json"
    if keyring and not path.exists():
        generate_keyring_file(path)
    document = {
        "listen": ["127.0.0.1:0"],
        "store": {"path": str(tmp / "data" / "broker.db")},
        "keyring": {"file": str(path)},
        **settings,
    }
    config = tmp / "broker.yaml"
    config.write_text(yaml.safe_dump(document))
    return config


def _one_line_failure(command: list[str], config: Path) -> str:
    done = run_cli(*command, "--config", str(config), check=False)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("credential-broker: ")
    return lines[0]


@pytest.fixture
def busy_port() -> Any:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield holder.getsockname()[1]
    holder.close()


@pytest.mark.parametrize("command", COMMANDS)
def test_port_in_use(tmp_path: Path, busy_port: int, command: list[str]) -> None:
    config = _config(tmp_path, listen=["127.0.0.1:0", f"127.0.0.1:{busy_port}"])
    line = _one_line_failure(command, config)
    assert line == f"credential-broker: listen[1]: 127.0.0.1:{busy_port} is already in use"
    if command == ["serve"]:
        assert not (tmp_path / "data").exists()  # refused before the store was created


@pytest.mark.parametrize("command", COMMANDS)
def test_health_and_metrics_ports_in_use(tmp_path: Path, busy_port: int, command: list[str]) -> None:
    line = _one_line_failure(command, _config(tmp_path, health_listen=f"127.0.0.1:{busy_port}"))
    assert line == f"credential-broker: health_listen: 127.0.0.1:{busy_port} is already in use"
    line = _one_line_failure(command, _config(tmp_path, metrics={"listen": f"127.0.0.1:{busy_port}"}))
    assert line == f"credential-broker: metrics.listen: 127.0.0.1:{busy_port} is already in use"


@pytest.mark.parametrize("command", COMMANDS)
def test_socket_under_a_file(tmp_path: Path, command: list[str]) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    address = f"unix://{blocker}/run/broker.sock"
    line = _one_line_failure(command, _config(tmp_path, listen=[address]))
    assert line == f"credential-broker: listen[0]: {address}: {blocker} is not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
@pytest.mark.parametrize("command", COMMANDS)
def test_socket_folder_not_writable(tmp_path: Path, command: list[str]) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        address = f"unix://{folder}/broker.sock"
        line = _one_line_failure(command, _config(tmp_path, listen=[address]))
        assert line == f"credential-broker: listen[0]: {address}: {folder} is not writable"
    finally:
        folder.chmod(0o700)


def test_address_not_on_this_host(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never an address of this machine.
    line = _one_line_failure(["config", "check"], _config(tmp_path, metrics={"listen": "192.0.2.1:0"}))
    assert line == "credential-broker: metrics.listen: 192.0.2.1:0 is not an address of this machine"


def test_config_check_needs_the_keyring(tmp_path: Path) -> None:
    config = _config(tmp_path, keyring=False)
    line = _one_line_failure(["config", "check"], config)
    assert f"no keyring at {tmp_path / 'keyring.json'}" in line
    assert "credential-broker keys generate --output" in line
    (tmp_path / "keyring.json").write_text("{not json")
    (tmp_path / "keyring.json").chmod(0o600)
    line = _one_line_failure(["config", "check"], config)
    assert "not a credential-broker keyring" in line
    assert not (tmp_path / "data").exists()


def test_config_check_names_what_it_did_not_check(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        store={"backend": "postgres", "dsn": "host=127.0.0.1 dbname=nothing-here"},
        upstreams=[
            {
                "name": "found",
                "url": "https://api.example",
                "auth_broker": {
                    "mode": "oauth_connect",
                    "issuer": "https://issuer.example",
                    "client_id": "cid",
                    "token_endpoint_auth_method": "none",
                    "redirect_uri": "https://app.example/cb",
                },
            }
        ],
    )
    done = run_cli("config", "check", "--config", str(config))
    assert done.stdout.startswith("config OK")
    assert "not checked: the PostgreSQL store (not contacted)" in done.stdout
    assert "not checked: discovery for upstream found (https://issuer.example not contacted)" in done.stdout
    ok = run_cli("config", "check", "--config", str(_config(tmp_path, store={"path": "data/b.db"})))
    assert f"checked: the keyring {tmp_path / 'keyring.json'} opens (1 key)" in ok.stdout
    assert "not checked" not in ok.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_tls_files_are_read_and_must_match(tmp_path: Path, command: list[str]) -> None:
    from tests.pki import TestCA

    ca = TestCA()
    cert, _ = ca.issue("broker", dns=["localhost"], server=True).write(tmp_path, "server")
    _, other_key = ca.issue("other", dns=["localhost"], server=True).write(tmp_path, "other")
    tls = {"cert_file": str(cert), "key_file": str(other_key)}
    line = _one_line_failure(command, _config(tmp_path, tls=tls))
    assert line == f"credential-broker: tls.key_file: {other_key} is not the key of tls.cert_file {cert}"
    line = _one_line_failure(command, _config(tmp_path, tls={**tls, "cert_file": str(tmp_path / "gone.crt")}))
    assert line.startswith(f"credential-broker: tls.cert_file: cannot read {tmp_path / 'gone.crt'} (")
    assert not (tmp_path / "data").exists()


def test_workers_port_in_use(tmp_path: Path, busy_port: int) -> None:
    config = _config(tmp_path, listen=[f"127.0.0.1:{busy_port}"])
    done = run_cli("serve", "--config", str(config), "--workers", "2", check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"credential-broker: listen[0]: 127.0.0.1:{busy_port} is already in use"


async def test_server_bind_failure_is_named_and_leaves_no_socket(tmp_path: Path, busy_port: int) -> None:
    """Past the pre-flight (a port taken in between): the server names it and removes its socket."""
    from broker.app import build_app
    from broker.config import load_config_file
    from broker.errors import ConfigError

    sock = tmp_path / "run" / "broker.sock"
    config = load_config_file(
        _config(tmp_path, listen=[f"unix://{sock}", f"127.0.0.1:{busy_port}"]), environ={}
    )
    with pytest.raises(ConfigError) as info:
        build_app(config)
    assert info.value.message == f"listen[1]: 127.0.0.1:{busy_port} is already in use"
    assert list((tmp_path / "run").iterdir()) == []
