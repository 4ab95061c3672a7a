"""A running broker follows its keyring file, but a file that gives a key id it already holds
different key material is not a rotation (``keys`` never does that): it is a hand edit gone wrong
or another deployment's keyring with a colliding id. Adopting it would seal new records under key
material the store's check value does not know (silently unreadable once the file is fixed) and
stop this process from opening every record already under that id, for every user. The follower
refuses such a file, keeps serving with the keys it holds and says so in one log line that names
the key id and never the material."""

from __future__ import annotations

import base64
import json
import logging
import secrets
from pathlib import Path

import pytest

from broker.crypto.envelope import EnvelopeCipher, RecordContext
from broker.crypto.keyfile import write_private_file
from broker.crypto.keyring import FileKeySource, Keyring, new_key_entry
from broker.keys import KeyringFollower
from tests import leakcheck

CONTEXT = RecordContext(1, "credentials", "alice", "github_0123456789abcdef")


def test_a_key_id_whose_material_changed_is_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keyring.json"
    source = FileKeySource(path)
    source.save(Keyring([new_key_entry("primary")]))
    original = source.load()
    follower = KeyringFollower(source, original)
    cipher = EnvelopeCipher(original, reload=follower)
    before = cipher.seal(b"alice's old token", CONTEXT)

    # A hand edit gives the primary's id other material (still 32 bytes of valid base64url).
    other = secrets.token_bytes(32)
    leakcheck.add_secret(other, base64.urlsafe_b64encode(other).decode().rstrip("="))
    document = original.to_document()
    document["keys"][0]["material"] = base64.urlsafe_b64encode(other).decode().rstrip("=")
    write_private_file(path, (json.dumps(document) + "\n").encode())

    with caplog.at_level(logging.WARNING):
        after = cipher.seal(b"alice's new token", CONTEXT)
    # Nothing was sealed under the wrong material; every record still opens with the real key.
    assert EnvelopeCipher(original).open(after, CONTEXT) == b"alice's new token"
    assert cipher.open(before, CONTEXT) == b"alice's old token"
    assert follower.reloads == 0
    text = " ".join(f"{r.getMessage()} {getattr(r, 'fields', {})}" for r in caplog.records)
    assert original.primary_id in text and "material" in text
    assert document["keys"][0]["material"] not in text
