"""The interface every root key source keeps, and the KEK-id binding they share.

A root key never leaves its KMS or HSM. A source wraps one KEK's 32 bytes into an opaque blob
and unwraps it again; each blob is bound to its KEK id (an AWS encryption context, PKCS#11
AES-GCM associated data or a digest inside the wrapped value), so a blob moved to another id in
the file does not unwrap. Errors: :class:`RootKeyUnavailable` when the source cannot be reached
(the caller retries until ``keyring.unwrap_timeout_seconds``), :class:`RootKeyRefused` when this
root key does not unwrap this blob (wrong key, tampered file: never retried), KeyringError for
anything the operator must fix (a PIN the token refuses, a missing module). No message carries a
credential, a PIN or key material.
"""

from __future__ import annotations

import struct
from typing import Protocol

#: Prefix of every binding: which format, which purpose.
BINDING_LABEL = b"credential-broker/kek-wrap/v1"


def kek_binding(kek_id: str, root_label: str = "") -> bytes:
    """Associated data naming the KEK (and the root key) a blob belongs to."""
    parts = [kek_id.encode(), root_label.encode()]
    return BINDING_LABEL + b"".join(struct.pack(">I", len(p)) + p for p in parts)


class RootKey(Protocol):
    """A root key held by a KMS or an HSM."""

    #: ``keyring.wrapped_by.type``: named in every message about this source.
    kind: str

    def describe(self) -> str:
        """Which key, in words an operator recognises (never a credential)."""
        ...

    def wrap(self, kek_id: str, material: bytes) -> bytes:
        """An opaque blob of ``material`` under the root key's current version, bound to ``kek_id``."""
        ...

    def unwrap(self, kek_id: str, blob: bytes, *, any_version: bool = False) -> bytes:
        """The material in ``blob``, which must be bound to ``kek_id``. Only the configured key
        (its current or older versions) opens it, unless ``any_version``: then whichever of the
        source's keys wrapped it (``keys rewrap-root`` reading blobs from before a rotation)."""
        ...

    def rewrap(self, kek_id: str, blob: bytes) -> bytes:
        """``blob`` wrapped again under the configured key's current version (after a rotation),
        whichever of this source's keys wrapped it before."""
        ...
