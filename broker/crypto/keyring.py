"""The keyring: key-encryption keys (KEKs), each with an id and a state; one is primary.

A :class:`KeySource` produces a :class:`Keyring` once at start-up; the key material is then held
in memory only. :class:`FileKeySource` reads a keyring file; :class:`EnvKeySource` reads the same
JSON document from an environment variable (how a Kubernetes Secret is often projected). A KMS
source fits the same contract: unwrap once at start, hold in memory.

Keyring file (JSON, mode 0600)::

    {"format": "credential-broker-keyring/v1",
     "keys": [{"id": "k1a2b3c4d", "state": "primary", "created_at": 1800000000,
               "material": "<base64url of 32 random bytes>"}]}
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from broker.crypto.keyfile import read_private_file, write_private_file
from broker.errors import KeyringError

FORMAT = "credential-broker-keyring/v1"
#: A keyring whose KEKs are wrapped by a KMS or HSM root key (broker/crypto/wrapped.py).
WRAPPED_FORMAT = "credential-broker-wrapped-keyring/v1"
KEY_STATES = ("primary", "active")


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One KEK. ``material`` never appears in repr."""

    id: str
    state: str
    created_at: float
    material: bytes

    def __repr__(self) -> str:
        return f"KeyEntry(id={self.id!r}, state={self.state!r})"


class Keyring:
    """An immutable set of KEKs with exactly one primary."""

    def __init__(self, entries: list[KeyEntry], *, where: str = "") -> None:
        """``where`` (the file) starts each refusal, which names the key ids and what to change."""
        at = f"{where}: " if where else ""
        ids = [e.id for e in entries]
        twice = sorted({kid for kid in ids if ids.count(kid) > 1})
        if twice:
            raise KeyringError(
                f"{at}the keyring has the key id twice: {', '.join(twice)}; remove one of them (or "
                "restore the file from a backup)"
            )
        primaries = [e for e in entries if e.state == "primary"]
        if len(primaries) != 1:
            named = f": {', '.join(e.id for e in primaries)}" if primaries else ""
            raise KeyringError(
                f"{at}the keyring must have exactly one primary key (it has {len(primaries)}{named}); "
                'give exactly one key "state": "primary" and the others "state": "active"'
            )
        self._entries = list(entries)
        self.primary_id = primaries[0].id

    @property
    def entries(self) -> list[KeyEntry]:
        return list(self._entries)

    def materials(self) -> dict[str, bytes]:
        return {e.id: e.material for e in self._entries}

    def ids(self) -> list[str]:
        return [e.id for e in self._entries]

    def to_document(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "keys": [
                {
                    "id": e.id,
                    "state": e.state,
                    "created_at": e.created_at,
                    "material": base64.urlsafe_b64encode(e.material).decode().rstrip("="),
                }
                for e in self._entries
            ],
        }

    @classmethod
    def from_document(cls, document: object, where: str) -> Keyring:
        if isinstance(document, dict) and document.get("format") == WRAPPED_FORMAT:
            raise KeyringError(
                f"{where}: a keyring wrapped by a root key ({str(document.get('wrapped_by'))[:32]}); "
                "set keyring.wrapped_by to that root key (or convert it back with `keys unwrap`)"
            )
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise KeyringError(f"{where}: not a credential-broker keyring ({FORMAT})")
        raw_keys = document.get("keys")
        if not isinstance(raw_keys, list) or not raw_keys:
            raise KeyringError(f"{where}: the keyring has no keys")
        entries = []
        for index, raw in enumerate(raw_keys):
            entries.append(_entry(raw, f"{where}: keys[{index}]"))
        return cls(entries, where=where)


def new_key_entry(state: str) -> KeyEntry:
    """A fresh random 256-bit KEK with a random id."""
    return KeyEntry(
        id="k" + secrets.token_hex(4),
        state=state,
        created_at=float(int(time.time())),
        material=secrets.token_bytes(32),
    )


def entry_fields(raw: object, where: str) -> tuple[str, str, float]:
    """The id, state and created_at of one key object of a keyring document (plain or wrapped)."""
    if not isinstance(raw, dict):
        raise KeyringError(f"{where}: must be an object")
    kid, state = raw.get("id"), raw.get("state")
    if not isinstance(kid, str) or not kid.isascii() or not 1 <= len(kid) <= 64 or not kid.isprintable():
        raise KeyringError(f"{where}.id: must be 1-64 printable ASCII characters")
    if state not in KEY_STATES:
        raise KeyringError(f"{where}.state: must be one of {', '.join(KEY_STATES)}")
    created = raw.get("created_at", 0)
    return kid, str(state), float(created) if isinstance(created, int | float) else 0.0


def _entry(raw: object, where: str) -> KeyEntry:
    kid, state, created = entry_fields(raw, where)
    assert isinstance(raw, dict)
    material = raw.get("material")
    if not isinstance(material, str):
        raise KeyringError(f"{where}.material: must be a base64url string")
    try:
        key = base64.urlsafe_b64decode(material + "=" * (-len(material) % 4))
    except ValueError:
        raise KeyringError(f"{where}.material: not valid base64url") from None
    if len(key) != 32:
        raise KeyringError(f"{where}.material: must decode to 32 bytes")
    return KeyEntry(kid, state, created, key)


class KeySource(Protocol):
    """Where the keyring comes from. Called once at start-up.

    The contract a KMS-backed source keeps too: ``load`` unwraps the key material once and the
    broker holds it in memory; nothing asks the source per request."""

    def load(self) -> Keyring: ...


def source_fingerprint(source: KeySource) -> object | None:
    """Something that changes when the source's keyring may have changed, or None when the
    source cannot change while the broker runs (an environment variable)."""
    probe = getattr(source, "fingerprint", None)
    return probe() if callable(probe) else None


@dataclass(frozen=True)
class FileKeySource:
    """A keyring file on disk (e.g. a mounted Kubernetes Secret)."""

    path: Path

    def load(self) -> Keyring:
        """The keyring in the file; refused (KeyringError) when its group or others can read it."""
        try:
            text = read_private_file(self.path).decode("utf-8", "replace")
        except FileNotFoundError:
            raise KeyringError(
                f"no keyring at {self.path}; create one with "
                f"`credential-broker keys generate --output {self.path}`"
            ) from None
        except OSError as exc:
            raise KeyringError(f"cannot read the keyring {self.path} ({exc.strerror})") from None
        try:
            document = json.loads(text)
        except ValueError:
            raise KeyringError(f"{self.path}: not a credential-broker keyring (not JSON)") from None
        return Keyring.from_document(document, str(self.path))

    def fingerprint(self) -> object | None:
        """Inode, mtime and size: ``save`` replaces the file, so any change shows here."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def save(self, keyring: Keyring) -> None:
        """Replace the file atomically with a new one of mode 0600 (see broker/crypto/keyfile.py)."""
        write_private_file(self.path, _document_bytes(keyring))


@dataclass(frozen=True)
class EnvKeySource:
    """A keyring JSON document in an environment variable."""

    variable: str
    environ: Mapping[str, str]

    def load(self) -> Keyring:
        text = self.environ.get(self.variable)
        if text is None:
            raise KeyringError(f"environment variable {self.variable} is not set")
        try:
            document = json.loads(text)
        except ValueError:
            raise KeyringError(f"{self.variable}: not a credential-broker keyring (not JSON)") from None
        return Keyring.from_document(document, self.variable)


def generate_keyring_file(path: Path) -> Keyring:
    """Write a new keyring (mode 0600) with one primary key. Refuses to overwrite anything at
    ``path``, a link included; the file appears whole or not at all."""
    keyring = Keyring([new_key_entry("primary")])
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_private_file(path, _document_bytes(keyring), replace=False)
    except FileExistsError:
        if not os.path.lexists(path):
            raise  # no free temporary name: someone is planting files in that folder
        raise KeyringError(f"{path} already exists; refusing to overwrite a keyring") from None
    return keyring


def _document_bytes(keyring: Keyring) -> bytes:
    return (json.dumps(keyring.to_document(), indent=2) + "\n").encode()
