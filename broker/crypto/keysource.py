"""The key source a config names: a plain keyring file, or one wrapped by a KMS or HSM root key."""

from __future__ import annotations

from collections.abc import Mapping

from broker.config import KeyringConfig
from broker.crypto.keyring import FileKeySource
from broker.crypto.sources import root_key_for
from broker.crypto.wrapped import WrappedKeyringFile


def key_source_for(keyring: KeyringConfig, environ: Mapping[str, str]) -> FileKeySource | WrappedKeyringFile:
    """``keyring.file`` as it is, or wrapped by ``keyring.wrapped_by`` (nothing contacted yet)."""
    if keyring.wrapped_by is None:
        return FileKeySource(keyring.file)
    return wrapped_source_for(keyring, environ)


def wrapped_source_for(keyring: KeyringConfig, environ: Mapping[str, str]) -> WrappedKeyringFile:
    """The wrapped keyring file; KeyringError when the config sets no ``keyring.wrapped_by``."""
    from broker.errors import KeyringError

    if keyring.wrapped_by is None:
        raise KeyringError(
            "keyring.wrapped_by: not set; name the root key that wraps (or wrapped) the keyring"
        )
    return WrappedKeyringFile(
        keyring.file, root_key_for(keyring.wrapped_by, environ), keyring.unwrap_timeout_seconds
    )
