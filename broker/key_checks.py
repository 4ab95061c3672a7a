"""The store's per-key check values: is this keyring the one the store was written with?

Each key id the store has seen gets one check value (broker/crypto/keycheck.py) in the store's
``key_checks`` table: written when ``keys add`` creates the key, or when a broker first uses a
key that has none (an empty store, a key added by hand). :meth:`StoreKeyCheck.verify` runs at
start-up and before every ``keys`` change:

- a key whose check value opens is right, whatever state the records under it are in, so damaged
  records never stop the broker: each fails closed for its own user when it is read;
- a key whose check value does not open, or a key id that genuine records use but the keyring
  lacks, means a wrong keyring: refused with one line naming the keyring, the key ids the store
  expects and what to do.

A store written before check values existed (or whose check value row itself was damaged) is
judged once by today's record trial: the key is right if it opens any record under its id (up to
``TRIAL_RECORDS`` of them, so damaged ones do not decide); its check value is then written and
the trial is never needed again. A key with records under it that opens none is refused, and
nothing is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from broker.crypto.envelope import EnvelopeCipher, RecordContext, key_id_of
from broker.crypto.keycheck import make_check_value, verify_check_value
from broker.crypto.keyring import KeyEntry, Keyring
from broker.errors import DecryptionError, KeyringError
from broker.logs import fields, get_logger
from broker.store.base import CredentialStore, SealedRecord
from broker.vault import record_context, sealed_record_context

#: Records tried per key id by the one-time trial before a key is judged wrong.
TRIAL_RECORDS = 1000
_BATCH = 200
_MAX_KEY_IDS = 10_000


@dataclass(frozen=True)
class KeyCheckReport:
    """What one verification did: key ids confirmed by their check value, and key ids whose
    check value was written now (``by_trial``: after the one-time record trial)."""

    confirmed: tuple[str, ...]
    written: tuple[str, ...]
    by_trial: tuple[str, ...]


class StoreKeyCheck:
    """Verifies a keyring against one store's check values, writing the ones still missing.

    ``keyring_name`` (the keyring file, or the variable it came from) and ``store_name`` only
    shape the refusal message."""

    def __init__(
        self,
        store: CredentialStore,
        keyring_name: str,
        store_name: str,
        *,
        now: float = 0.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self._store = store
        self._keyring_name = keyring_name
        self._store_name = store_name
        self._now = now
        self._log = logger or get_logger()

    def verify(self, keyring: Keyring) -> KeyCheckReport:
        """Raise KeyringError unless ``keyring`` is the store's; record check values it lacks."""
        stored = self._store.key_checks()
        used = dict(self._store.sample_key_ids(_MAX_KEY_IDS))
        problems: list[str] = []
        missing = [(kid, n) for kid, n in used.items() if kid not in keyring.ids() and self._genuine(kid)]
        if missing:
            listed = ", ".join(f"{kid} ({n} records)" for kid, n in missing)
            problems.append(f"records are wrapped under key ids not in the keyring: {listed}")
        confirmed: list[str] = []
        to_add: list[KeyEntry] = []
        to_repair: list[tuple[KeyEntry, bytes]] = []
        tried: list[str] = []
        cipher: EnvelopeCipher | None = None
        for entry in keyring.entries:
            value = stored.get(entry.id)
            if value is not None and verify_check_value(entry, value):
                confirmed.append(entry.id)
                continue
            if entry.id not in used:
                if value is None:
                    to_add.append(entry)  # first use of a key no record has used yet
                else:
                    problems.append(f"key {entry.id} does not open its check value")
                continue
            cipher = cipher or EnvelopeCipher(keyring)
            if self._opens_a_record(cipher, entry.id):
                tried.append(entry.id)
                if value is None:
                    to_add.append(entry)
                else:
                    to_repair.append((entry, value))
            elif value is not None:
                problems.append(f"key {entry.id} does not open its check value")
            else:
                problems.append(f"key {entry.id} opens none of the store's records under its id")
        if problems:
            raise self._refusal(keyring, stored, used, problems)
        for entry in to_add:
            self._store.add_key_check(entry.id, make_check_value(entry), self._now)
        for entry, old in to_repair:
            self._log.warning(
                "a key's check value did not open but its records do; check value rewritten",
                extra=fields(key_id=entry.id),
            )
            self._store.replace_key_check(entry.id, old, make_check_value(entry), self._now)
        written = [e.id for e in to_add] + [e.id for e, _ in to_repair]
        if written:
            # Another process may have written a check value for the same id meanwhile: the one
            # stored is what counts.
            after = self._store.key_checks()
            for entry in keyring.entries:
                if entry.id in written and not verify_check_value(entry, after.get(entry.id, b"")):
                    problems.append(f"key {entry.id} does not open its check value")
            if problems:
                raise self._refusal(keyring, after, used, problems)
        return KeyCheckReport(tuple(confirmed), tuple(written), tuple(tried))

    def record(self, entry: KeyEntry) -> None:
        """Store a new key's check value (``keys add``), before any record can use it."""
        self._store.add_key_check(entry.id, make_check_value(entry), self._now)

    def forget(self, key_id: str) -> None:
        """Drop a retired key's check value."""
        self._store.delete_key_check(key_id)

    def _genuine(self, kid: str) -> bool:
        """Whether records under ``kid`` were sealed under it, rather than carry a damaged key id
        column: a genuine record's ciphertext names the same key id as its column."""
        for record in self._store.sealed_records_under(kid, 0, _BATCH):
            try:
                if key_id_of(record.sealed) == kid:
                    return True
            except DecryptionError:
                continue
        return False

    def _opens_a_record(self, cipher: EnvelopeCipher, kid: str) -> bool:
        """The one-time trial: does the keyring's key ``kid`` open any record under that id?"""
        position, tried = 0, 0
        while tried < TRIAL_RECORDS:
            batch = self._store.sealed_records_under(kid, position, min(_BATCH, TRIAL_RECORDS - tried))
            if not batch:
                return False
            for record in batch:
                tried += 1
                if any(_opens(cipher, record.sealed, context) for context in _contexts(record)):
                    return True
            position = batch[-1].position
        return False

    def _refusal(
        self, keyring: Keyring, stored: dict[str, bytes], used: dict[str, int], problems: list[str]
    ) -> KeyringError:
        """One line: what is wrong, the key ids the store expects, and what to do."""
        expected = sorted(set(stored) | {kid for kid in used if kid in stored or self._genuine(kid)})
        return KeyringError(
            f"the keyring {self._keyring_name} is not the keyring the store was written with: "
            f"{'; '.join(problems)}; the store ({self._store_name}) expects key ids "
            f"{', '.join(expected)}, this keyring has {', '.join(keyring.ids())}. Point keyring.file "
            "at the store's keyring, or restore that file from a backup (a new keyring cannot open "
            "the existing records)"
        )


def _contexts(record: SealedRecord) -> list[RecordContext]:
    """The associated data a record may have been sealed with. A flow sealed before flows were
    bound to their upstream cannot be used any more, but opening it still proves the key."""
    contexts = [sealed_record_context(record)]
    if record.table == "pending_flows":
        contexts.append(record_context(record.table, record.user_id, record.record_key))
    return contexts


def _opens(cipher: EnvelopeCipher, sealed: bytes, context: RecordContext) -> bool:
    try:
        cipher.open(sealed, context)
    except DecryptionError:
        return False
    return True
