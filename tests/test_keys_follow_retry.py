"""A running broker follows its keyring file (``keys add``/``promote`` by another process or
replica). A reload that fails for a passing reason must be tried again: the KMS briefly down when
the file changed (a real local-kms, stopped and started), or a keyring file replaced with too open
a mode and then fixed with ``chmod 600`` (which changes neither inode, size nor mtime). Before, the
follower remembered the new file as seen even though it had not loaded it, so this process never
learnt the new key: every record another replica sealed under it failed for its user here
(RECONNECT_REQUIRED) until a restart. Retries are spaced (a fake clock here), so a source that
stays down is not asked on every seal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from broker.crypto.envelope import EnvelopeCipher, RecordContext
from broker.crypto.keyfile import write_private_file
from broker.crypto.keyring import FileKeySource, KeyEntry, Keyring, new_key_entry
from broker.crypto.wrapped import WrappedKeyringFile
from broker.errors import DecryptionError
from broker.keys import KeyringFollower
from tests.rootkeys import ALIAS, REGION, LocalKms

CONTEXT = RecordContext(1, "credentials", "alice", "github_0123456789abcdef")


def _promoted(keyring: Keyring, key: KeyEntry) -> Keyring:
    """``keys add`` then ``keys promote``: ``key`` is the new primary, the old one stays active."""
    old = [KeyEntry(e.id, "active", e.created_at, e.material) for e in keyring.entries]
    return Keyring([*old, KeyEntry(key.id, "primary", key.created_at, key.material)])


def test_a_keyring_fixed_with_chmod_after_a_refused_reload_is_followed(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    source = FileKeySource(path)
    source.save(Keyring([new_key_entry("primary")]))
    now = [0.0]
    follower = KeyringFollower(source, source.load(), monotonic=lambda: now[0])
    mine = EnvelopeCipher(follower(), reload=follower)  # type: ignore[arg-type]

    # Another replica adds and promotes a key; the file arrives world-readable (cp, umask 022).
    newer = _promoted(source.load(), new_key_entry("active"))
    write_private_file(path, (json.dumps(newer.to_document()) + "\n").encode())
    os.chmod(path, 0o644)
    theirs = EnvelopeCipher(newer).seal(b"alice's token", CONTEXT)
    with pytest.raises(DecryptionError):
        mine.open(theirs, CONTEXT)  # refused: others can read the file

    os.chmod(path, 0o600)  # the operator fixes the mode, as the warning says
    now[0] += 60
    assert mine.open(theirs, CONTEXT) == b"alice's token"
    assert follower.reloads == 1


def test_a_key_added_while_the_kms_was_down_is_followed_once_it_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.crypto.sources.aws_kms import AwsKmsRootKey

    kms = LocalKms(tmp_path, monkeypatch)
    try:
        path = tmp_path / "keyring.json"
        WrappedKeyringFile(path, AwsKmsRootKey(ALIAS, REGION, kms.endpoint)).save(
            Keyring([new_key_entry("primary")])
        )
        source = WrappedKeyringFile(path, AwsKmsRootKey(ALIAS, REGION, kms.endpoint), 0)
        now = [0.0]
        follower = KeyringFollower(source, source.load(), monotonic=lambda: now[0])
        mine = EnvelopeCipher(follower(), reload=follower)  # type: ignore[arg-type]

        # Another replica (its own KMS client) adds and promotes a key and seals under it ...
        replica = WrappedKeyringFile(path, AwsKmsRootKey(ALIAS, REGION, kms.endpoint), 0)
        newer = _promoted(replica.load(), new_key_entry("active"))
        replica.save(newer)
        theirs = EnvelopeCipher(newer).seal(b"alice's token", CONTEXT)

        # ... while this process cannot reach the KMS: the record fails closed, nothing else.
        kms.stop()
        with pytest.raises(DecryptionError):
            mine.open(theirs, CONTEXT)
        now[0] += 1  # within the retry spacing: the KMS is not asked again
        with pytest.raises(DecryptionError):
            mine.open(theirs, CONTEXT)

        kms.start()
        now[0] += 60
        assert mine.open(theirs, CONTEXT) == b"alice's token"
        assert mine.primary_key_id == newer.primary_id
    finally:
        kms.stop()
