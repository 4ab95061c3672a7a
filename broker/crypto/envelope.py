"""Per-record envelope encryption with AES-256-GCM.

Every record's secret payload is sealed under a fresh random 256-bit data key (DEK); the DEK is
wrapped by a key-encryption key (KEK) from the keyring. Both ciphertexts carry associated data
that binds them to their row, so a ciphertext copied to another row, user or table fails to
open. The payload's associated data leaves out the KEK id so that re-wrapping a record under a
new KEK (key rotation) touches only the wrapped DEK; the wrapped DEK's associated data includes
the KEK id.

Record format, version 1 (all lengths in bytes; pinned by tests/test_envelope.py)::

    offset   size  field
    0        2     magic  b"CB"
    2        1     format version, 0x01
    3        1     K = length of the KEK id (1..64)
    4        K     KEK id, ASCII
    4+K      1     W = length of the wrapped DEK, always 60
    5+K      60    wrapped DEK: nonce(12) || AES-GCM(KEK, DEK, aad=wrap_aad)  (32 + 16 tag)
    65+K     12    payload nonce
    77+K     >=16  AES-GCM(DEK, payload, aad=payload_aad)  (ciphertext || 16-byte tag)

    context     = lp(schema version) || lp(table) || lp(user id) || lp(upstream key or flow id)
    wrap_aad    = b"credential-broker/dek/v1"     || lp(KEK id) || context
    payload_aad = b"credential-broker/payload/v1" || context
    lp(x)       = 4-byte big-endian length of x || x   (x UTF-8 encoded)

Any failure to open a record (bad magic, unknown version or key id, truncation, a flipped
bit, a record moved to another row) raises one uninformative :class:`DecryptionError`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.crypto.keyring import Keyring
from broker.errors import DecryptionError

MAGIC = b"CB"
FORMAT_VERSION = 1
NONCE_LEN = 12
KEY_LEN = 32
TAG_LEN = 16
WRAPPED_DEK_LEN = NONCE_LEN + KEY_LEN + TAG_LEN
MAX_KID_LEN = 64
_WRAP_LABEL = b"credential-broker/dek/v1"
_PAYLOAD_LABEL = b"credential-broker/payload/v1"


def _lp(value: str) -> bytes:
    raw = value.encode()
    return struct.pack(">I", len(raw)) + raw


@dataclass(frozen=True, slots=True)
class RecordContext:
    """What a ciphertext is bound to: its row."""

    schema_version: int
    table: str
    user_id: str
    record_key: str

    def encode(self) -> bytes:
        return _lp(str(self.schema_version)) + _lp(self.table) + _lp(self.user_id) + _lp(self.record_key)


@dataclass(frozen=True, slots=True)
class _Parsed:
    kid: str
    wrapped_dek: bytes
    nonce: bytes
    ciphertext: bytes
    payload_offset: int


class EnvelopeCipher:
    """Seals and opens records with the keyring's keys. New records use the primary key.

    ``reload``, when given, is asked for a newer keyring before each seal and when a record names
    a key id this cipher does not hold; it returns None when nothing changed (it must be cheap).
    That is how a running broker follows ``keys add``/``promote`` without a restart."""

    def __init__(self, keyring: Keyring, *, reload: Callable[[], Keyring | None] | None = None) -> None:
        self._state = (keyring, {kid: AESGCM(material) for kid, material in keyring.materials().items()})
        self._reload = reload

    @property
    def _keyring(self) -> Keyring:
        return self._state[0]

    @property
    def primary_key_id(self) -> str:
        return self._state[0].primary_id

    def use_keyring(self, keyring: Keyring) -> None:
        """Switch to ``keyring`` atomically (one attribute assignment)."""
        self._state = (keyring, {kid: AESGCM(material) for kid, material in keyring.materials().items()})

    def _maybe_reload(self) -> None:
        if self._reload is not None:
            newer = self._reload()
            if newer is not None and newer is not self._state[0]:
                self.use_keyring(newer)

    def seal(self, plaintext: bytes, context: RecordContext) -> bytes:
        self._maybe_reload()
        dek = AESGCM.generate_key(bit_length=256)
        ctx = context.encode()
        nonce = os.urandom(NONCE_LEN)
        body = AESGCM(dek).encrypt(nonce, plaintext, _PAYLOAD_LABEL + ctx)
        return self._header(dek, ctx) + nonce + body

    def open(self, record: bytes, context: RecordContext) -> bytes:
        parsed = _parse(record)
        ctx = context.encode()
        dek = self._unwrap(parsed, ctx)
        try:
            return AESGCM(dek).decrypt(parsed.nonce, parsed.ciphertext, _PAYLOAD_LABEL + ctx)
        except InvalidTag:
            raise DecryptionError() from None

    def rewrap(self, record: bytes, context: RecordContext) -> bytes:
        """Re-wrap the record's DEK under the primary key; the payload bytes are unchanged."""
        parsed = _parse(record)
        ctx = context.encode()
        return self._header(self._unwrap(parsed, ctx), ctx) + record[parsed.payload_offset :]

    def _header(self, dek: bytes, ctx: bytes) -> bytes:
        """Magic, version, primary key id and the DEK wrapped under it."""
        keyring, keks = self._state
        kid = keyring.primary_id
        wrap_nonce = os.urandom(NONCE_LEN)
        wrapped = wrap_nonce + keks[kid].encrypt(wrap_nonce, dek, _WRAP_LABEL + _lp(kid) + ctx)
        kid_raw = kid.encode()
        return MAGIC + bytes((FORMAT_VERSION, len(kid_raw))) + kid_raw + bytes((len(wrapped),)) + wrapped

    def _unwrap(self, parsed: _Parsed, ctx: bytes) -> bytes:
        kek = self._state[1].get(parsed.kid)
        if kek is None:
            self._maybe_reload()
            kek = self._state[1].get(parsed.kid)
        if kek is None:
            raise DecryptionError()
        aad = _WRAP_LABEL + _lp(parsed.kid) + ctx
        try:
            return kek.decrypt(parsed.wrapped_dek[:NONCE_LEN], parsed.wrapped_dek[NONCE_LEN:], aad)
        except InvalidTag:
            raise DecryptionError() from None


def key_id_of(record: bytes) -> str:
    """The KEK id a record is wrapped under (raises DecryptionError on a malformed record)."""
    return _parse(record).kid


def _parse(record: bytes) -> _Parsed:
    # Every length is checked before it is used to slice.
    if len(record) < 4 or record[:2] != MAGIC or record[2] != FORMAT_VERSION:
        raise DecryptionError()
    kid_len = record[3]
    if not 1 <= kid_len <= MAX_KID_LEN or len(record) < 5 + kid_len:
        raise DecryptionError()
    try:
        kid = record[4 : 4 + kid_len].decode("ascii")
    except UnicodeDecodeError:
        raise DecryptionError() from None
    offset = 4 + kid_len
    if record[offset] != WRAPPED_DEK_LEN:
        raise DecryptionError()
    offset += 1
    if len(record) < offset + WRAPPED_DEK_LEN + NONCE_LEN + TAG_LEN:
        raise DecryptionError()
    wrapped = record[offset : offset + WRAPPED_DEK_LEN]
    offset += WRAPPED_DEK_LEN
    nonce = record[offset : offset + NONCE_LEN]
    payload_offset = offset
    return _Parsed(kid, wrapped, nonce, record[offset + NONCE_LEN :], payload_offset)
