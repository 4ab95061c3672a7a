"""Persistence of sealed records. The store sees ciphertext and clear metadata, never plaintext."""

from broker.store.base import CredentialRow, CredentialStore, PendingFlowRow
from broker.store.sqlite import SCHEMA_VERSION, SqliteStore

__all__ = ["SCHEMA_VERSION", "CredentialRow", "CredentialStore", "PendingFlowRow", "SqliteStore"]
