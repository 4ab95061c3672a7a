"""Key rotation: add, promote, re-wrap, retire and count KEKs; and a running broker following them.

Rotation never touches a record's payload: ``rewrap`` re-wraps each record's data key under the
primary KEK (:meth:`EnvelopeCipher.rewrap`). It pages through the store by scan position in
short batches, and each write is a compare-and-swap on the record's KEK id and generation, so a
refresh that rewrites a record meanwhile wins and the re-wrap of that record is skipped (the
refresh sealed it under the primary already). Re-running it resumes: it only sees records not
yet under the primary.

A running broker follows the keyring file through :class:`KeyringFollower`: before each seal,
and when a record names a key id it does not hold, it compares the file's fingerprint and
reloads on change; a reload that fails is tried again every ``RELOAD_RETRY_SECONDS``. Keys it held
before are kept in memory (as active), so a reload never makes a record unreadable to a process
that could read it.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from broker.crypto.envelope import EnvelopeCipher, key_id_of
from broker.crypto.keyring import (
    FileKeySource,
    KeyEntry,
    Keyring,
    KeySource,
    new_key_entry,
    source_fingerprint,
)
from broker.crypto.wrapped import WrappedKeyringFile
from broker.errors import DecryptionError, KeyringError, KeyRotationRefused
from broker.key_checks import StoreKeyCheck
from broker.logs import fields, get_logger
from broker.store.base import CredentialStore, SealedRecord
from broker.vault import sealed_record_context

DEFAULT_BATCH = 200
#: A changed keyring file that failed to load (root key source down, mode too open) is tried
#: again at most this often, while the keys in memory go on serving.
RELOAD_RETRY_SECONDS = 5.0


class KeyringFollower:
    """The ``reload`` hook of a serving broker's :class:`EnvelopeCipher`.

    Returns the current keyring, reloaded from the source when its fingerprint changed; cheap
    (one ``stat``) when nothing changed. A source that cannot change is never re-read."""

    def __init__(
        self,
        source: KeySource,
        keyring: Keyring,
        logger: logging.Logger | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._monotonic = monotonic
        self._keyring = keyring
        self._fingerprint = source_fingerprint(source)
        # The fingerprint of a file that failed to load, and when to try it again.
        self._failed: object | None = None
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._log = logger or get_logger()
        self.reloads = 0

    def __call__(self) -> Keyring | None:
        seen = source_fingerprint(self._source)
        if seen is None or seen == self._fingerprint:
            return self._keyring
        if seen == self._failed and self._monotonic() < self._retry_at:
            return self._keyring  # this very file failed a moment ago: do not ask on every seal
        with self._lock:
            if seen == self._fingerprint:
                return self._keyring
            if seen == self._failed and self._monotonic() < self._retry_at:
                return self._keyring
            try:
                # One attempt: a wrapped keyring's root key source may be down while we serve.
                newer = getattr(self._source, "reload", self._source.load)()
                self._refuse_changed_material(newer)
            except KeyringError as exc:
                # Keep serving with the keys in memory, and try this file again later: the KMS
                # may come back, the mode may be fixed (chmod changes no fingerprint).
                if seen != self._failed:
                    # The message names the file, not a key.
                    self._log.warning(
                        "keyring reload failed; keeping the loaded keys, retrying",
                        extra=fields(error=exc.message, retry_seconds=RELOAD_RETRY_SECONDS),
                    )
                self._failed = seen
                self._retry_at = self._monotonic() + RELOAD_RETRY_SECONDS
                return self._keyring
            self._fingerprint = seen
            self._failed = None
            known = set(newer.ids())
            kept = [
                KeyEntry(e.id, "active", e.created_at, e.material)
                for e in self._keyring.entries
                if e.id not in known
            ]
            self._keyring = Keyring(newer.entries + kept)
            self.reloads += 1
            self._log.info(
                "keyring reloaded",
                extra=fields(primary=self._keyring.primary_id, keys=",".join(self._keyring.ids())),
            )
            return self._keyring

    def _refuse_changed_material(self, newer: Keyring) -> None:
        """KeyringError when ``newer`` gives a key id this process holds other material: never a
        rotation (``keys`` never changes a key), but a bad hand edit or another keyring."""
        held = self._keyring.materials()
        changed = [
            e.id for e in newer.entries if e.id in held and not hmac.compare_digest(held[e.id], e.material)
        ]
        if changed:
            raise KeyringError(
                f"the keyring file gives the key ids {', '.join(changed)} other key material than "
                "the keys this process holds under those ids; not followed. Restore the file (a "
                "key's material never changes: rotate with `credential-broker keys add`)"
            )


@dataclass
class RewrapReport:
    """What one ``keys rewrap`` run did."""

    primary: str
    scanned: int = 0
    rewrapped: int = 0
    skipped: int = 0  # rewritten by someone else meanwhile (already under the primary)
    failed: int = 0  # would not open: tampered, corrupt or under an unknown key
    batches: int = 0
    remaining: dict[str, int] = field(default_factory=dict)


class KeyRotation:
    """The ``credential-broker keys`` operations on a keyring file and a store.

    Each change first proves the keyring is the store's (its per-key check values, see
    broker/key_checks.py), so a wrong keyring file is refused rather than extended or used."""

    def __init__(
        self,
        source: FileKeySource | WrappedKeyringFile,
        store: CredentialStore,
        store_name: str = "configured",
    ) -> None:
        self._source = source
        self._store = store
        self._checks = StoreKeyCheck(store, str(source.path), store_name, now=time.time())

    def _verified(self) -> Keyring:
        keyring = self._source.load()
        self._checks.verify(keyring)
        return keyring

    def add(self) -> str:
        """A new, non-primary key; returns its id. Running brokers pick it up on their own.

        Its check value is stored before the keyring file names it, so no record can be sealed
        under a key the store cannot check."""
        keyring = self._verified()
        entry = new_key_entry("active")
        while entry.id in keyring.ids():  # pragma: no cover - 32-bit random ids
            entry = new_key_entry("active")
        self._checks.record(entry)
        self._source.save(Keyring([*keyring.entries, entry]))
        return entry.id

    def promote(self, key_id: str) -> None:
        """Make ``key_id`` the primary: new records are wrapped under it; the old primary stays."""
        keyring = self._source.load()
        if key_id not in keyring.ids():
            raise KeyRotationRefused(f"key {key_id!r} is not in the keyring {self._source.path}")
        self._checks.verify(keyring)
        entries = [
            KeyEntry(e.id, "primary" if e.id == key_id else "active", e.created_at, e.material)
            for e in keyring.entries
        ]
        self._source.save(Keyring(entries))

    def rewrap(self, batch_size: int = DEFAULT_BATCH) -> RewrapReport:
        """Re-wrap every record's data key under the primary; payloads untouched."""
        if batch_size < 1:
            raise KeyRotationRefused("batch size must be at least 1")
        cipher = EnvelopeCipher(self._verified())
        report = RewrapReport(primary=cipher.primary_key_id)
        position = 0
        while True:
            batch = self._store.sealed_records(position, batch_size, report.primary)
            if not batch:
                break
            updates: list[tuple[SealedRecord, str, bytes]] = []
            for record in batch:
                report.scanned += 1
                try:
                    if key_id_of(record.sealed) != record.kek_id:
                        raise DecryptionError()
                    context = sealed_record_context(record)
                    updates.append((record, report.primary, cipher.rewrap(record.sealed, context)))
                except DecryptionError:
                    report.failed += 1
            written = self._store.replace_sealed(updates) if updates else 0
            report.rewrapped += written
            report.skipped += len(updates) - written
            report.batches += 1
            position = batch[-1].position
        report.remaining = {kid: n for kid, n in self.usage().items() if kid != report.primary}
        return report

    def retire(self, key_id: str) -> None:
        """Remove ``key_id`` from the keyring; refused while it is primary or any record uses it."""
        keyring = self._source.load()
        if key_id not in keyring.ids():
            raise KeyRotationRefused(f"key {key_id!r} is not in the keyring {self._source.path}")
        if key_id == keyring.primary_id:
            raise KeyRotationRefused(f"key {key_id!r} is the primary; promote another key first")
        self._refuse_if_used(key_id)
        self._checks.verify(keyring)
        self._source.save(Keyring([e for e in keyring.entries if e.id != key_id]))
        try:
            # A writer that sealed under the key just before the file changed: put it back.
            self._refuse_if_used(key_id)
        except KeyRotationRefused:
            self._source.save(keyring)
            raise
        self._checks.forget(key_id)

    def _refuse_if_used(self, key_id: str) -> None:
        count = self.usage().get(key_id, 0)
        if count:
            raise KeyRotationRefused(
                f"key {key_id!r} still wraps {count} record(s); run `credential-broker keys rewrap` first"
            )

    def usage(self) -> dict[str, int]:
        """Records per KEK id, over every table."""
        return dict(self._store.sample_key_ids(1_000_000))

    def status(self) -> list[tuple[str, str, int]]:
        """(key id, state, records) for each key in the keyring, then ids the store uses that the
        keyring does not have (state "missing")."""
        keyring = self._source.load()
        usage = self.usage()
        rows = [(e.id, e.state, usage.get(e.id, 0)) for e in keyring.entries]
        rows += [(kid, "missing", n) for kid, n in usage.items() if kid not in keyring.ids()]
        return rows
