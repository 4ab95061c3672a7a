"""A wrapped keyring file: every KEK wrapped by a root key that never leaves its KMS or HSM.

File (JSON, mode 0600, written atomically by broker/crypto/keyfile.py)::

    {"format": "credential-broker-wrapped-keyring/v1", "wrapped_by": "aws_kms",
     "keys": [{"id": "k1a2b3c4d", "state": "primary", "created_at": 1800000000,
               "wrapped": "<base64url of the source's blob, bound to the id>"}]}

The file alone opens nothing. :class:`WrappedKeyringFile` is a KeySource like the plain file:
``load`` unwraps every KEK once (retrying an unreachable source with backoff until
``keyring.unwrap_timeout_seconds``), the broker then holds the keys in memory and never asks the
source per request. ``save`` wraps only keys it has not wrapped before (``keys add``), so
``promote`` and ``retire`` need no KMS call. A KEK the root key does not unwrap (another root key,
a changed file) is refused at once with one generic message naming the key ids.

``wrap_keyring``, ``unwrap_keyring`` and ``rewrap_root`` convert a file in place (``keys wrap``,
``keys unwrap``, ``keys rewrap-root``); each checks its result opens before the one atomic write.
Stored records are never touched: their data keys stay wrapped by the same KEKs.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from broker.crypto.keyfile import read_private_file, write_private_file
from broker.crypto.keyring import FORMAT, WRAPPED_FORMAT, FileKeySource, KeyEntry, Keyring, entry_fields
from broker.crypto.sources.base import RootKey
from broker.errors import KeyringError, RootKeyRefused, RootKeyUnavailable
from broker.logs import fields, get_logger

T = TypeVar("T")
_FIRST_DELAY = 0.2
_MAX_DELAY = 5.0
_MAX_BLOB = 4096


@dataclass(frozen=True)
class _Wrapped:
    id: str
    state: str
    created_at: float
    blob: bytes


@dataclass
class WrappedKeyringFile:
    """A wrapped keyring file and the root key that opens it."""

    path: Path
    root: RootKey
    unwrap_timeout_seconds: float = 30.0
    logger: logging.Logger = field(default_factory=get_logger)
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic
    # (id, blob) -> material and (id, material) -> blob: each KEK goes to the source once.
    _opened: dict[tuple[str, bytes], bytes] = field(default_factory=dict, repr=False)
    _sealed: dict[tuple[str, bytes], bytes] = field(default_factory=dict, repr=False)

    def load(self) -> Keyring:
        """Unwrap every KEK; an unreachable source is retried until the timeout."""
        return self.retrying(lambda: self._open(self._read()))

    def reload(self) -> Keyring:
        """One attempt (a serving broker following the file must not block on an outage)."""
        return self._open(self._read())

    def fingerprint(self) -> object | None:
        return FileKeySource(self.path).fingerprint()

    def save(self, keyring: Keyring) -> None:
        """Write ``keyring`` wrapped, atomically; only new KEKs are sent to the source."""
        wrapped = self.retrying(lambda: [self._wrap(entry) for entry in keyring.entries])
        write_private_file(self.path, document_bytes(self.root.kind, wrapped))

    def retrying(self, operation: Callable[[], T]) -> T:
        """``operation``, retried with backoff while the root key source cannot be reached."""
        deadline = self.monotonic() + self.unwrap_timeout_seconds
        delay = _FIRST_DELAY
        warned = False
        while True:
            try:
                return operation()
            except RootKeyUnavailable:
                left = deadline - self.monotonic()
                if left <= 0:
                    raise RootKeyUnavailable(
                        f"cannot reach the root key ({self.root.describe()}) of the keyring {self.path} "
                        f"within keyring.unwrap_timeout_seconds ({self.unwrap_timeout_seconds:g} s); "
                        f"check that the {self.root.kind} source is reachable from here, then start again"
                    ) from None
                if not warned:
                    warned = True
                    self.logger.warning(
                        "root key source unreachable; retrying",
                        extra=fields(source=self.root.kind, timeout_seconds=self.unwrap_timeout_seconds),
                    )
                self.sleep(min(delay, left))
                delay = min(delay * 2, _MAX_DELAY)

    def _wrap(self, entry: KeyEntry) -> _Wrapped:
        blob = self._sealed.get((entry.id, entry.material))
        if blob is None:
            blob = self.root.wrap(entry.id, entry.material)
            self._remember(entry.id, blob, entry.material)
        return _Wrapped(entry.id, entry.state, entry.created_at, blob)

    def _remember(self, kek_id: str, blob: bytes, material: bytes) -> None:
        self._opened[(kek_id, blob)] = material
        self._sealed[(kek_id, material)] = blob

    def _open(self, wrapped: list[_Wrapped]) -> Keyring:
        entries: list[KeyEntry] = []
        refused: list[str] = []
        for item in wrapped:
            material = self._opened.get((item.id, item.blob))
            if material is None:
                try:
                    material = self.root.unwrap(item.id, item.blob)
                except RootKeyRefused:
                    refused.append(item.id)
                    continue
                self._remember(item.id, item.blob, material)
            entries.append(KeyEntry(item.id, item.state, item.created_at, material))
        if refused:
            raise refusal(self.root, self.path, refused)
        return Keyring(entries, where=str(self.path))

    def _read(self) -> list[_Wrapped]:
        return read_wrapped(self.path)


def refusal(root: RootKey, path: Path, key_ids: list[str]) -> RootKeyRefused:
    """The one message for any KEK the root key does not unwrap, whatever the reason."""
    return RootKeyRefused(
        f"the root key ({root.describe()}) does not unwrap the keys {', '.join(key_ids)} of the "
        f"keyring {path}: it was wrapped by another root key, or the file was changed. Point "
        "keyring.wrapped_by at the root key that wrapped it (after rotating the root key in the "
        "KMS, run `credential-broker keys rewrap-root`), or restore the file from a backup"
    )


def read_wrapped(path: Path) -> list[_Wrapped]:
    """The entries of a wrapped keyring file; KeyringError (what to do) for anything else."""
    try:
        text = read_private_file(path).decode("utf-8", "replace")
    except FileNotFoundError:
        raise KeyringError(
            f"no keyring at {path}; create one with `credential-broker keys generate --output {path}` "
            "and wrap it with `credential-broker keys wrap --config CONFIG`"
        ) from None
    except OSError as exc:
        raise KeyringError(f"cannot read the keyring {path} ({exc.strerror})") from None
    try:
        document = json.loads(text)
    except ValueError:
        raise KeyringError(f"{path}: not a credential-broker keyring (not JSON)") from None
    if isinstance(document, dict) and document.get("format") == FORMAT:
        raise KeyringError(
            f"{path}: a plain keyring, but keyring.wrapped_by is set; wrap it with "
            "`credential-broker keys wrap --config CONFIG` (or remove keyring.wrapped_by)"
        )
    if not isinstance(document, dict) or document.get("format") != WRAPPED_FORMAT:
        raise KeyringError(f"{path}: not a credential-broker wrapped keyring ({WRAPPED_FORMAT})")
    raw_keys = document.get("keys")
    if not isinstance(raw_keys, list) or not raw_keys:
        raise KeyringError(f"{path}: the keyring has no keys")
    found = []
    for index, raw in enumerate(raw_keys):
        where = f"{path}: keys[{index}]"
        kid, state, created = entry_fields(raw, where)
        assert isinstance(raw, dict)
        text_blob = raw.get("wrapped")
        if not isinstance(text_blob, str) or not 0 < len(text_blob) <= _MAX_BLOB:
            raise KeyringError(f"{where}.wrapped: must be a base64url string")
        try:
            blob = base64.urlsafe_b64decode(text_blob + "=" * (-len(text_blob) % 4))
        except ValueError:
            raise KeyringError(f"{where}.wrapped: not valid base64url") from None
        found.append(_Wrapped(kid, state, created, blob))
    return found


def document_bytes(kind: str, wrapped: list[_Wrapped]) -> bytes:
    document: dict[str, Any] = {
        "format": WRAPPED_FORMAT,
        "wrapped_by": kind,
        "keys": [
            {
                "id": w.id,
                "state": w.state,
                "created_at": w.created_at,
                "wrapped": base64.urlsafe_b64encode(w.blob).decode().rstrip("="),
            }
            for w in wrapped
        ],
    }
    return (json.dumps(document, indent=2) + "\n").encode()


def wrap_keyring(target: WrappedKeyringFile) -> Keyring:
    """``keys wrap``: the plain file at ``target.path`` becomes a wrapped one (the same KEKs).

    Every new blob is unwrapped again and compared before the file is replaced, so a root key
    that cannot open what it wrapped never costs the KEKs."""
    keyring = FileKeySource(target.path).load()

    def wrap_and_check() -> list[_Wrapped]:
        wrapped = [target._wrap(entry) for entry in keyring.entries]
        for entry, item in zip(keyring.entries, wrapped, strict=True):
            opened = target.root.unwrap(item.id, item.blob)
            if not hmac.compare_digest(opened, entry.material):
                raise KeyringError(
                    f"the root key ({target.root.describe()}) did not give back key {entry.id}"
                )
        return wrapped

    wrapped = target.retrying(wrap_and_check)
    write_private_file(target.path, document_bytes(target.root.kind, wrapped))
    return keyring


def unwrap_keyring(target: WrappedKeyringFile) -> Keyring:
    """``keys unwrap``: the wrapped file becomes a plain keyring again (for leaving a KMS)."""
    keyring = target.load()
    FileKeySource(target.path).save(keyring)
    return keyring


def rewrap_root(target: WrappedKeyringFile) -> int:
    """``keys rewrap-root``: every KEK re-wrapped under the configured root key's current version.

    Each KEK is read with whichever of the source's keys wrapped it, re-wrapped, and the new
    blob must give back the same KEK through the configured key before the file is replaced."""
    items = read_wrapped(target.path)

    def rewrap_all() -> list[_Wrapped]:
        refused: list[str] = []
        done: list[_Wrapped] = []
        for item in items:
            try:
                before = target.root.unwrap(item.id, item.blob, any_version=True)
                blob = target.root.rewrap(item.id, item.blob)
                after = target.root.unwrap(item.id, blob)
            except RootKeyRefused:
                refused.append(item.id)
                continue
            if not hmac.compare_digest(before, after):
                refused.append(item.id)
                continue
            done.append(_Wrapped(item.id, item.state, item.created_at, blob))
        if refused:
            raise refusal(target.root, target.path, refused)
        return done

    rewrapped = target.retrying(rewrap_all)
    write_private_file(target.path, document_bytes(target.root.kind, rewrapped))
    return len(rewrapped)
