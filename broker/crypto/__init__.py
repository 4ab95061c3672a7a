"""Envelope encryption of stored secrets and the keyring of key-encryption keys."""

from broker.crypto.envelope import EnvelopeCipher, RecordContext
from broker.crypto.keyring import FileKeySource, Keyring, KeySource, generate_keyring_file

__all__ = [
    "EnvelopeCipher",
    "FileKeySource",
    "KeySource",
    "Keyring",
    "RecordContext",
    "generate_keyring_file",
]
