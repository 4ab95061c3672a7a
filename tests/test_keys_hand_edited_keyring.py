"""A keyring file edited by hand and got wrong: two primaries, none, or one key id twice. Start-up
(here ``config check``, which opens the keyring as ``serve`` does) stops with one line, no
traceback, that names the file and the key ids concerned and says what to change; the material
never appears."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from broker.crypto.keyring import generate_keyring_file
from tests.brokerproc import run_cli


def _config(tmp_path: Path, keys: list[dict[str, Any]]) -> Path:
    keyring = tmp_path / "keyring.json"
    document = {"format": "credential-broker-keyring/v1", "keys": keys}
    keyring.write_text(json.dumps(document))
    keyring.chmod(0o600)
    config = tmp_path / "broker.yaml"
    config.write_text(
        f"store: {{path: {tmp_path / 'broker.db'}}}\nkeyring: {{file: {keyring}}}\nupstreams: []\n"
    )
    return config


def _key(tmp_path: Path, name: str) -> dict[str, Any]:
    path = tmp_path / name / "keyring.json"
    generate_keyring_file(path)
    key: dict[str, Any] = json.loads(path.read_text())["keys"][0]
    return key


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("two primaries", ["exactly one primary key (it has 2:", "kfirst", "ksecond", '"state": "primary"']),
        ("no primary", ["exactly one primary key (it has 0)", '"state": "primary"']),
        ("same id twice", ["twice: kfirst", "remove one"]),
    ],
)
def test_a_badly_edited_keyring_is_one_line_naming_file_and_ids(
    tmp_path: Path, shape: str, expected: list[str]
) -> None:
    first = dict(_key(tmp_path, "a"), id="kfirst")
    second = dict(_key(tmp_path, "b"), id="ksecond")
    keys = {
        "two primaries": [first, dict(second, state="primary")],
        "no primary": [dict(first, state="active"), dict(second, state="active")],
        "same id twice": [first, dict(second, id="kfirst", state="active")],
    }[shape]
    done = run_cli("config", "check", "--config", str(_config(tmp_path, keys)), check=False)
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert str(tmp_path / "keyring.json") in line
    for part in expected:
        assert part in line
    assert first["material"] not in line and second["material"] not in line
