"""Keyring files: written atomically without following planted links, and refused when others can
read them (at ``serve``, ``keys`` and ``config check``), with the ``chmod`` that fixes it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from broker.config import load_config_file
from broker.crypto import keyfile
from broker.crypto.keyring import FileKeySource, Keyring, generate_keyring_file, new_key_entry
from broker.errors import KeyringError
from broker.store import open_store
from tests.brokerproc import run_cli
from tests.conftest import Broker

# Names a writer might once have used for its temporary file next to the keyring.
PREDICTABLE = ("keyring.json.tmp", ".keyring.json.tmp", "keyring.json.new", "keyring.json~", ".keyring.json")


def _config(tmp_path: Path, keyring: Path) -> Path:
    """A config on a store that exists (``keys`` commands work only on an existing store)."""
    path = tmp_path / "broker.yaml"
    document = {
        "listen": ["127.0.0.1:0"],
        "store": {"path": str(tmp_path / "data" / "broker.db")},
        "keyring": {"file": str(keyring)},
    }
    path.write_text(yaml.safe_dump(document))
    (tmp_path / "data").mkdir(exist_ok=True)
    open_store(load_config_file(path, environ={}).store).close()
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_keys_add_does_not_follow_links_planted_at_predictable_names(tmp_path: Path) -> None:
    keyring = tmp_path / "keyring.json"
    generate_keyring_file(keyring)
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch\n")
    victim_mode = _mode(victim)
    absent = tmp_path / "created-by-a-followed-link"
    for index, name in enumerate(PREDICTABLE):
        # One link to an existing file, the others dangling (a followed O_CREAT would create them).
        target = victim if index == 0 else absent.with_suffix(f".{index}")
        (tmp_path / name).symlink_to(target)
    config = _config(tmp_path, keyring)

    added = run_cli("keys", "add", "--config", str(config)).stdout.strip()
    run_cli("keys", "promote", added, "--config", str(config))

    assert victim.read_text() == "do not touch\n" and _mode(victim) == victim_mode
    assert not list(tmp_path.glob(absent.name + "*"))
    for name in PREDICTABLE:
        assert (tmp_path / name).is_symlink()  # left exactly as planted
    assert not keyring.is_symlink() and _mode(keyring) == 0o600
    loaded = FileKeySource(keyring).load()
    assert loaded.primary_id == added and len(loaded.ids()) == 2
    leftovers = {p.name for p in tmp_path.iterdir()} - {*PREDICTABLE, "keyring.json", "victim.txt"}
    assert leftovers <= {"broker.yaml", "data"}  # no temporary file left behind


def test_a_link_at_the_temporary_name_is_never_followed_even_when_guessed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Randomness faked: the first temporary names are exactly where links were planted."""
    keyring = tmp_path / "keyring.json"
    generate_keyring_file(keyring)
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch\n")
    names = iter(["guess1", "guess2", "fresh"])
    monkeypatch.setattr(keyfile, "_random_suffix", lambda: next(names))
    (tmp_path / ".keyring.json.guess1.tmp").symlink_to(victim)
    (tmp_path / ".keyring.json.guess2.tmp").symlink_to(tmp_path / "dangling")
    source = FileKeySource(keyring)
    source.save(Keyring([*source.load().entries, new_key_entry("active")]))
    assert victim.read_text() == "do not touch\n"
    assert not (tmp_path / "dangling").exists()
    assert len(FileKeySource(keyring).load().ids()) == 2 and _mode(keyring) == 0o600


def test_write_gives_up_after_many_taken_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "keyring.json"
    target.write_bytes(b"old")
    monkeypatch.setattr(keyfile, "_random_suffix", lambda: "same")
    (tmp_path / ".keyring.json.same.tmp").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        keyfile.write_private_file(target, b"new")
    assert target.read_bytes() == b"old" and not (tmp_path / "elsewhere").exists()


def test_generate_never_overwrites_and_writes_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "keyring.json"
    generate_keyring_file(path)
    assert _mode(path) == 0o600
    before = path.read_bytes()
    with pytest.raises(KeyringError, match="refusing to overwrite"):
        generate_keyring_file(path)
    assert path.read_bytes() == before
    link = tmp_path / "linked.json"
    link.symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(KeyringError, match="refusing to overwrite"):
        generate_keyring_file(link)  # a dangling link is not a free name
    assert not (tmp_path / "nowhere.json").exists()
    assert [p.name for p in path.parent.iterdir()] == ["keyring.json"]


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_a_keyring_others_can_read_is_refused_everywhere(tmp_path: Path, mode: int) -> None:
    keyring = tmp_path / "keyring.json"
    generate_keyring_file(keyring)
    config = _config(tmp_path, keyring)
    keyring.chmod(mode)
    for args in (
        ("config", "check", "--config", str(config)),
        ("keys", "status", "--config", str(config)),
        ("keys", "add", "--config", str(config)),
        ("serve", "--config", str(config)),  # last: on failure it would serve until the timeout
    ):
        done = run_cli(*args, check=False)
        assert done.returncode == 2, args
        assert done.stdout == "", args
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, (args, done.stderr)
        assert f"chmod 600 {keyring}" in lines[0] and f"{mode:04o}" in lines[0], lines[0]
    assert len(json.loads(keyring.read_text())["keys"]) == 1  # `keys add` changed nothing
    keyring.chmod(0o600)
    assert "config OK" in run_cli("config", "check", "--config", str(config)).stdout
    assert run_cli("keys", "status", "--config", str(config)).returncode == 0


def test_a_keyring_behind_a_link_is_judged_by_the_file_it_names(tmp_path: Path) -> None:
    """A Kubernetes Secret volume presents keyring.json as a link into ..data/."""
    real = tmp_path / "..data" / "keyring.json"
    generate_keyring_file(real)
    link = tmp_path / "keyring.json"
    link.symlink_to(real)
    assert FileKeySource(link).load().ids()
    real.chmod(0o644)
    with pytest.raises(KeyringError, match="chmod 600"):
        FileKeySource(link).load()


@pytest.mark.parametrize(
    ("mode", "owner", "me", "allowed"),
    [
        (0o600, 1000, 1000, True),
        (0o400, 1000, 1000, True),
        (0o640, 1000, 1000, False),  # ours: like ssh, nobody else may read it
        (0o604, 1000, 1000, False),
        (0o640, 0, 0, False),  # root's own file when running as root: the same rule
        (0o640, 0, 1000, True),  # root-owned, shared with our group (a Secret volume with fsGroup)
        (0o440, 0, 1000, True),
        (0o660, 0, 1000, False),  # the group may write it
        (0o644, 0, 1000, False),  # everyone may read it
        (0o640, 2000, 1000, False),  # another user's file readable by a group
    ],
)
def test_privacy_rule(mode: int, owner: int, me: int, allowed: bool) -> None:
    problem = keyfile.exposure(stat.S_IFREG | mode, owner, me)
    assert (problem is None) == allowed, problem


async def test_serving_broker_keeps_its_keys_when_the_file_turns_readable(broker: Broker) -> None:
    await broker.connect("alice")
    path = broker.app.config.keyring.file
    source = FileKeySource(path)
    source.save(Keyring([*source.load().entries, new_key_entry("active")]))
    path.chmod(0o644)
    assert (await broker.resolve("alice")).access_token  # the reload is refused, the keys kept
    assert (await broker.start_flow("bob")).state
