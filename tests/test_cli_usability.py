"""The command line for a first-time user (item 17), through the real CLI in a temp folder."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from broker.cli import _parser
from tests import leakcheck


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "broker", *args], capture_output=True, text=True, cwd=cwd, timeout=30
    )
    leakcheck.observe_text(done.stdout + done.stderr, "cli output")
    return done


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_version(tmp_path: Path) -> None:
    done = _run("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == f"credential-broker {version('credential-broker')}"


def test_top_level_help_is_plain_text(tmp_path: Path) -> None:
    done = _run("--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "``" not in done.stdout
    assert not re.search(r":[a-z]+:`", done.stdout)
    for command in ("serve", "keys", "config", "--version"):
        assert command in done.stdout


def _actions(parser: argparse.ArgumentParser, where: str) -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions}
            for name, sub in action.choices.items():
                assert name in helped, f"{where} {name}: no help text"
                found += _actions(sub, f"{where} {name}")
        elif not isinstance(action, argparse._HelpAction):
            found.append((where, action))
    return found


def test_every_argument_has_help_text() -> None:
    actions = _actions(_parser(), "credential-broker")
    assert len(actions) > 10
    missing = [f"{where} {a.option_strings or a.dest}" for where, a in actions if not a.help]
    assert missing == []


@pytest.mark.parametrize("command", ["add", "promote", "rewrap", "retire", "status"])
def test_keys_commands_need_config_and_leave_no_files(tmp_path: Path, command: str) -> None:
    args = ["keys", command] + (["0123abcd"] if command in ("promote", "retire") else [])
    done = _run(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert "--config" in done.stderr and "Traceback" not in done.stderr
    assert _files(tmp_path) == []


@pytest.mark.parametrize("command", ["add", "status", "rewrap"])
def test_keys_commands_with_a_missing_keyring_or_store_create_nothing(tmp_path: Path, command: str) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump({"keyring": {"file": "keyring.json"}, "store": {"path": "data/broker.db"}})
    )
    done = _run("keys", command, "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"no keyring at {tmp_path / 'keyring.json'}" in done.stderr
    assert _files(tmp_path) == ["broker.yaml"]
    assert _run("keys", "generate", "--output", "keyring.json", cwd=tmp_path).returncode == 0
    before = (tmp_path / "keyring.json").read_text()
    done = _run("keys", command, "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"credential-broker: no store at {tmp_path / 'data' / 'broker.db'}; keys commands work on an "
        "existing store: start the broker once (serve creates it), or check store.path"
    )
    assert _files(tmp_path) == ["broker.yaml", "keyring.json"]
    assert (tmp_path / "keyring.json").read_text() == before


def test_keys_status_on_an_existing_store(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump({"keyring": {"file": "keyring.json"}, "store": {"path": "broker.db"}}))
    assert _run("keys", "generate", "--output", "keyring.json", cwd=tmp_path).returncode == 0
    from broker.store import SqliteStore

    SqliteStore(tmp_path / "broker.db").close()  # as a first `serve` leaves it
    done = _run("keys", "status", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "\tprimary\t0" in done.stdout


def test_config_check_leaves_no_files(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump({"keyring": {"file": "keyring.json"}, "store": {"path": "data/b.db"}}))
    assert _run("keys", "generate", "--output", "keyring.json", cwd=tmp_path).returncode == 0
    done = _run("config", "check", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert _files(tmp_path) == ["broker.yaml", "keyring.json"]
