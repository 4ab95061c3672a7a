"""Per-key check values: a small authenticated record per KEK whose only job is to prove that a
keyring's key with that id is the very key the store was written with.

A store keeps one check value per key id (see broker/key_checks.py). A key that opens its check
value is the right key, whatever state the store's records are in; a key that does not is the
wrong key, whatever a sample of records would have said. So a wrong keyring is told apart from
damaged records without trying records at all. (Any key source, a KMS one too, is judged the
same way: it only has to produce the key material.)

Check value format, version 1 (pinned by tests/test_key_checks.py)::

    offset  size  field
    0       2     magic b"CK"
    2       1     format version, 0x01
    3       12    nonce
    15      43    AES-256-GCM(KEK, CHECK_PLAINTEXT, aad)  (27 bytes || 16-byte tag)

    aad = b"credential-broker/key-check/v1" || lp(KEK id)     (lp as in envelope.py)

The associated data binds the value to its key id and to this purpose: no record, wrapped data
key or other ciphertext of the broker can pass for a check value, nor the reverse.
"""

from __future__ import annotations

import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.crypto.envelope import NONCE_LEN, TAG_LEN
from broker.crypto.keyring import KeyEntry

MAGIC = b"CK"
FORMAT_VERSION = 1
CHECK_PLAINTEXT = b"credential-broker key check"
_LABEL = b"credential-broker/key-check/v1"
_HEADER = MAGIC + bytes((FORMAT_VERSION,))
CHECK_VALUE_LEN = len(_HEADER) + NONCE_LEN + len(CHECK_PLAINTEXT) + TAG_LEN


def _aad(key_id: str) -> bytes:
    raw = key_id.encode()
    return _LABEL + struct.pack(">I", len(raw)) + raw


def make_check_value(key: KeyEntry) -> bytes:
    """A new check value for ``key`` (a fresh random nonce each time)."""
    nonce = os.urandom(NONCE_LEN)
    return _HEADER + nonce + AESGCM(key.material).encrypt(nonce, CHECK_PLAINTEXT, _aad(key.id))


def verify_check_value(key: KeyEntry, value: bytes) -> bool:
    """True when ``value`` is a check value made with this very key (material and id)."""
    if len(value) != CHECK_VALUE_LEN or not value.startswith(_HEADER):
        return False
    nonce = value[len(_HEADER) : len(_HEADER) + NONCE_LEN]
    try:
        plain = AESGCM(key.material).decrypt(nonce, value[len(_HEADER) + NONCE_LEN :], _aad(key.id))
    except InvalidTag:
        return False
    return hmac.compare_digest(plain, CHECK_PLAINTEXT)
