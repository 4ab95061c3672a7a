"""Envelope format: pinned layout, row binding, tamper detection, re-wrap."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.crypto.envelope import EnvelopeCipher, RecordContext, key_id_of
from broker.crypto.keyring import KeyEntry, Keyring, new_key_entry
from broker.errors import DecryptionError

CTX = RecordContext(1, "credentials", "alice", "github_0123456789abcdef")


@pytest.fixture
def keyring() -> Keyring:
    return Keyring([new_key_entry("primary")])


def _lp(s: str) -> bytes:
    raw = s.encode()
    return struct.pack(">I", len(raw)) + raw


def test_round_trip(keyring: Keyring) -> None:
    cipher = EnvelopeCipher(keyring)
    sealed = cipher.seal(b"secret payload", CTX)
    assert cipher.open(sealed, CTX) == b"secret payload"
    assert b"secret payload" not in sealed
    assert key_id_of(sealed) == keyring.primary_id


def test_layout_is_pinned(keyring: Keyring) -> None:
    """The documented byte layout, parsed independently of the implementation."""
    cipher = EnvelopeCipher(keyring)
    payload = b"x" * 10
    sealed = cipher.seal(payload, CTX)
    kid = keyring.primary_id.encode()
    assert sealed[:2] == b"CB" and sealed[2] == 1 and sealed[3] == len(kid)
    assert sealed[4 : 4 + len(kid)] == kid
    assert sealed[4 + len(kid)] == 60
    assert len(sealed) == 4 + len(kid) + 1 + 60 + 12 + len(payload) + 16
    # Open it by hand with the spec's associated data.
    kek = AESGCM(keyring.materials()[keyring.primary_id])
    wrapped = sealed[5 + len(kid) : 65 + len(kid)]
    ctx = _lp("1") + _lp("credentials") + _lp("alice") + _lp("github_0123456789abcdef")
    dek = kek.decrypt(wrapped[:12], wrapped[12:], b"credential-broker/dek/v1" + _lp(kid.decode()) + ctx)
    nonce = sealed[65 + len(kid) : 77 + len(kid)]
    body = sealed[77 + len(kid) :]
    assert AESGCM(dek).decrypt(nonce, body, b"credential-broker/payload/v1" + ctx) == payload


def test_opens_a_record_built_from_the_spec(keyring: Keyring) -> None:
    """A record written by an independent implementation of the format opens."""
    kid = keyring.primary_id
    ctx = _lp("1") + _lp("credentials") + _lp("alice") + _lp("github_0123456789abcdef")
    dek = os.urandom(32)
    wn, pn = os.urandom(12), os.urandom(12)
    kek = AESGCM(keyring.materials()[kid])
    wrapped = wn + kek.encrypt(wn, dek, b"credential-broker/dek/v1" + _lp(kid) + ctx)
    body = AESGCM(dek).encrypt(pn, b"hello", b"credential-broker/payload/v1" + ctx)
    record = b"CB\x01" + bytes([len(kid)]) + kid.encode() + bytes([60]) + wrapped + pn + body
    assert EnvelopeCipher(keyring).open(record, CTX) == b"hello"


@pytest.mark.parametrize(
    "other",
    [
        RecordContext(1, "credentials", "bob", "github_0123456789abcdef"),
        RecordContext(1, "credentials", "alice", "gitlab_0123456789abcdef"),
        RecordContext(2, "credentials", "alice", "github_0123456789abcdef"),
        RecordContext(1, "pending_flows", "alice", "github_0123456789abcdef"),
    ],
)
def test_record_moved_to_another_row_fails(keyring: Keyring, other: RecordContext) -> None:
    cipher = EnvelopeCipher(keyring)
    with pytest.raises(DecryptionError):
        cipher.open(cipher.seal(b"payload", CTX), other)


def test_every_flipped_byte_fails_closed(keyring: Keyring) -> None:
    cipher = EnvelopeCipher(keyring)
    sealed = cipher.seal(b"payload", CTX)
    for index in range(len(sealed)):
        for bit in (0x01, 0x80):
            tampered = bytearray(sealed)
            tampered[index] ^= bit
            with pytest.raises(DecryptionError) as info:
                cipher.open(bytes(tampered), CTX)
            assert str(info.value) == "a stored record could not be decrypted"


def test_every_truncation_fails_closed(keyring: Keyring) -> None:
    cipher = EnvelopeCipher(keyring)
    sealed = cipher.seal(b"payload", CTX)
    for length in range(len(sealed)):
        with pytest.raises(DecryptionError):
            cipher.open(sealed[:length], CTX)


def test_unknown_key_id_and_wrong_key(keyring: Keyring) -> None:
    sealed = EnvelopeCipher(keyring).seal(b"payload", CTX)
    stranger = Keyring([new_key_entry("primary")])
    with pytest.raises(DecryptionError):
        EnvelopeCipher(stranger).open(sealed, CTX)
    same_id_other_key = Keyring([KeyEntry(keyring.primary_id, "primary", 0, os.urandom(32))])
    with pytest.raises(DecryptionError):
        EnvelopeCipher(same_id_other_key).open(sealed, CTX)


def test_rewrap_changes_only_the_wrapped_key(keyring: Keyring) -> None:
    old = EnvelopeCipher(keyring)
    sealed = old.seal(b"payload", CTX)
    entries = keyring.entries
    new = new_key_entry("primary")
    rotated = Keyring([KeyEntry(e.id, "active", e.created_at, e.material) for e in entries] + [new])
    cipher = EnvelopeCipher(rotated)
    rewrapped = cipher.rewrap(sealed, CTX)
    assert key_id_of(rewrapped) == new.id
    assert rewrapped[-(12 + 7 + 16) :] == sealed[-(12 + 7 + 16) :]  # payload bytes untouched
    assert cipher.open(rewrapped, CTX) == b"payload"
    with pytest.raises(DecryptionError):
        old.open(rewrapped, CTX)
