"""Persistence of sealed records. The store sees ciphertext and clear metadata, never plaintext."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.store.base import CredentialRow, CredentialStore, PendingFlowRow, SealedRecord
from broker.store.sqlite import SCHEMA_VERSION, SqliteStore

if TYPE_CHECKING:
    from broker.config import StoreConfig

__all__ = [
    "SCHEMA_VERSION",
    "CredentialRow",
    "CredentialStore",
    "PendingFlowRow",
    "SealedRecord",
    "SqliteStore",
    "open_store",
]


def open_store(config: StoreConfig) -> CredentialStore:
    """The configured backend, migrated and ready. Raises StoreError.

    The PostgreSQL driver is imported only when that backend is configured."""
    if config.backend == "postgres":
        from broker.store.postgres import PostgresStore

        assert config.dsn is not None  # load_config resolved dsn / dsn_file / dsn_env
        return PostgresStore(config.dsn.get_secret_value(), pool_size=config.pool_size)
    return SqliteStore(config.path)
