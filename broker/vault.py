"""Turns credentials and pending flows into sealed store rows and back.

This is the only place that joins the store (ciphertext) with the cipher (keys): the store never
sees plaintext, the cipher never sees SQL. Decrypted secrets of recently used credentials are kept
in a bounded in-memory cache keyed by (user, upstream) and checked against the row's generation
and sealed bytes, so a Resolve of a cached credential reads one row and decrypts nothing; any
write (a refresh, a re-wrap, a tampered byte) misses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from broker.crypto.envelope import EnvelopeCipher, RecordContext, key_id_of
from broker.errors import DecryptionError
from broker.models import Credential, CredentialStatus, PendingFlow, Secrets
from broker.oauth import rfc6749
from broker.store.base import ConnectionEventRow, CredentialRow, CredentialStore, PendingFlowRow, SealedRecord

_CREDENTIALS = "credentials"
_FLOWS = "pending_flows"
# The schema number bound into every record's associated data. Pinned at 1: migrations change
# clear columns, not sealed records, and must not make every existing record unopenable.
CONTEXT_SCHEMA_VERSION = 1


def record_context(table: str, user_id: str, record_key: str) -> RecordContext:
    """The associated data of a record in ``table`` (also used by key rotation)."""
    return RecordContext(CONTEXT_SCHEMA_VERSION, table, user_id, record_key)


def flow_context(user_id: str, state_hash: str, upstream_key: str) -> RecordContext:
    """The associated data of a pending flow: its user, its state hash and its upstream, so a
    row moved to another upstream (or user, or state) does not open and its verifier is never
    sent to that upstream's token endpoint. The pair is JSON-encoded: unambiguous whatever the
    characters. Flows sealed before the upstream was bound (record key = the state hash alone)
    no longer open; they expire within ``flow_ttl_seconds`` anyway."""
    return record_context(_FLOWS, user_id, json.dumps([state_hash, upstream_key], separators=(",", ":")))


def sealed_record_context(record: SealedRecord) -> RecordContext:
    """The associated data of a record key rotation re-wraps, by table."""
    if record.table == _FLOWS:
        return flow_context(record.user_id, record.record_key, record.upstream_key)
    return record_context(record.table, record.user_id, record.record_key)


def _meta(
    token_type: str, scopes: tuple[str, ...], expires_at: float | None, obtained_via: str, updated_at: float
) -> list[object]:
    """The clear columns written with the sealed payload; a copy is sealed so tampering shows."""
    return [token_type, list(scopes), expires_at, obtained_via, updated_at]


# Writes that touch one credential, and where their (user_id, upstream_key) is: the vault then
# drops only that credential's remembered read. Any other write drops them all.
_ONE_CREDENTIAL: dict[str, Callable[[tuple[Any, ...]], tuple[str, str]]] = {
    "save_credential": lambda args: (args[0].user_id, args[0].upstream_key),
    "record_failure": lambda args: (args[0], args[1]),
    "claim_refresh": lambda args: (args[0], args[1]),
    "delete_credential": lambda args: (args[0], args[1]),
    "defer_refresh": lambda args: (args[0], args[1]),
}


class _WriteTracking:
    """The store, with a callback after every call that may write (anything not a known read).

    Lets the vault drop remembered reads whenever this process changes the store, whoever
    (service, connection manager, key rotation) made the change: that credential's for a
    write of one credential (called positionally), every one for any other write."""

    READS = frozenset(
        {
            "get_credential",
            "sample_key_ids",
            "sample_records",
            "sealed_records",
            "count_credentials",
            "events_after",
            "last_event_sequence",
            "due_for_refresh",
            "idle_for_refresh",
            "newest_pending_flow",
            "needs_reauth_before",
            "events_to_trim",
            "events_trimmed_through",
            # A write, but of a column no cached read depends on: Resolve stamps it once a
            # minute per credential, and must not empty the read cache each time.
            "touch_last_used",
            "get_pending_flow",
            "close",
        }
    )

    def __init__(self, store: CredentialStore, on_write: Callable[[tuple[str, str] | None], None]) -> None:
        self._store = store
        self._on_write = on_write
        self.schema_version = store.schema_version

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name in self.READS or name.startswith("_") or not callable(attr):
            return attr
        on_write = self._on_write
        keyed = _ONE_CREDENTIAL.get(name)

        def write(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            finally:
                key = None
                if keyed is not None and not kwargs:
                    with contextlib.suppress(IndexError, AttributeError):
                        key = keyed(args)
                on_write(key)

        setattr(self, name, write)
        return write


# While connection events are followed (:meth:`CredentialVault.followed_through`), a
# remembered read stays usable up to this long: a change another process announces with an event
# drops it as soon as the event is read, and only bookkeeping carries no event (a refresh lease, a
# backoff, a key rewrap, another process's newly exchanged token).
FOLLOWED_READ_SECONDS = 30.0


class CredentialVault:
    """Sealed persistence of credentials and pending flows.

    ``read_cache_seconds`` > 0 lets :meth:`get` with ``recent=True`` (the Resolve fast path)
    answer from memory for that long after a store read, unless this process wrote to the store
    since; a write by another process is seen at the latest that much later.

    While this process follows the connection events (broker/events.py calls :meth:`changed`
    for each event and :meth:`followed_through` after each complete read), a change another
    process made is seen once its event is read, so a remembered read is kept past that window,
    up to ``FOLLOWED_READ_SECONDS``. The bound stays: once the events have not been read for
    ``read_cache_seconds`` (a lost connection), the window applies again."""

    def __init__(
        self,
        store: CredentialStore,
        cipher: EnvelopeCipher,
        cache_size: int = 10_000,
        read_cache_seconds: float = 0.0,
    ):
        self.store = cast(CredentialStore, _WriteTracking(store, self._wrote))
        #: The store's reads go over the network and may wait on a lock (PostgreSQL): the
        #: service then reads in a worker thread, never on the event loop (see must_wait).
        self.reads_may_wait: bool = getattr(store, "READS_MAY_WAIT", False)
        self._cipher = cipher
        self._read_ttl = read_cache_seconds
        # Writes by this process, counted; a remembered read older than the latest write of its
        # credential (``_dirty``), or than the latest write of any other kind (``_floor``), is
        # not used: so a write always wins over a read that raced it.
        self._epoch = 0
        self._floor = 0
        self._dirty: dict[tuple[str, str], int] = {}
        self._epoch_lock = threading.Lock()
        self._recent: dict[tuple[str, str], tuple[int, float, tuple[Credential, CredentialRow] | None]] = {}
        self._cache: OrderedDict[tuple[str, str], tuple[int, bytes, Secrets, list[object] | None]] = (
            OrderedDict()
        )
        self._cache_size = cache_size
        # time.monotonic() when the last complete read of the connection events began.
        self._followed = float("-inf")
        #: Records that failed to open (tampered, corrupt, unknown key), since start.
        self.decryption_failures = 0

    def _context(self, table: str, user_id: str, record_key: str) -> RecordContext:
        return record_context(table, user_id, record_key)

    # -- credentials ---------------------------------------------------------------------

    def _wrote(self, key: tuple[str, str] | None = None) -> None:
        with self._epoch_lock:
            self._epoch += 1
            if key is None or len(self._dirty) >= self._cache_size:
                self._floor = self._epoch
                self._dirty.clear()
                self._recent.clear()
            else:
                self._dirty[key] = self._epoch
                self._recent.pop(key, None)

    @property
    def read_cache_seconds(self) -> float:
        return self._read_ttl

    def changed(self, user_id: str, upstream_key: str) -> None:
        """A connection event says the credential changed (in any process): drop its
        remembered read, and any read racing this call."""
        self._wrote((user_id, upstream_key))

    def followed_through(self, started: float) -> None:
        """Every event committed before ``started`` (time.monotonic()) went to :meth:`changed`."""
        self._followed = max(self._followed, started)

    def get(
        self, user_id: str, upstream_key: str, *, recent: bool = False
    ) -> tuple[Credential, CredentialRow] | None:
        """The stored credential, decrypted. Raises DecryptionError for a record that won't open.

        ``recent``: an answer read within ``read_cache_seconds`` will do, or a longer-remembered
        one while events are followed (see the class doc)."""
        key = (user_id, upstream_key)
        if recent:
            hit = self._remembered(key)
            if hit is not None:
                return hit[2]
        epoch, read_at = self._epoch, time.monotonic()  # taken before the read: a write during it wins
        try:
            row = self.store.get_credential(user_id, upstream_key)
            found = None if row is None else (self.open_row(row), row)
        except DecryptionError:
            self.decryption_failures += 1
            raise
        if self._read_ttl > 0:
            if len(self._recent) >= self._cache_size:
                self._recent.clear()
            self._recent[key] = (epoch, read_at, found)
        return found

    def _remembered(
        self, key: tuple[str, str]
    ) -> tuple[int, float, tuple[Credential, CredentialRow] | None] | None:
        """The remembered read of ``key`` while it may still answer a ``recent`` get, else None."""
        if self._read_ttl <= 0:
            return None
        hit = self._recent.get(key)
        if hit is not None and hit[0] >= self._floor and hit[0] >= self._dirty.get(key, 0):
            now = time.monotonic()
            age = now - hit[1]
            if age < self._read_ttl or (
                age < FOLLOWED_READ_SECONDS and now - self._followed < self._read_ttl
            ):
                return hit
        return None

    def must_wait(self, user_id: str, upstream_key: str, recent: bool = False) -> bool:
        """Whether :meth:`get` may wait on the store: its reads may (PostgreSQL) and no
        remembered read answers. The caller then reads in a worker thread, so that a read
        stuck behind a lock (VACUUM FULL, a migration) or a slow network stalls no other call."""
        return self.reads_may_wait and not (recent and self._remembered((user_id, upstream_key)) is not None)

    def open_row(self, row: CredentialRow) -> Credential:
        """Open a row: the ciphertext, its key id column and its sealed copy of the clear
        columns must all agree, or the one DecryptionError is raised."""
        key = (row.user_id, row.upstream_key)
        if key_id_of(row.sealed) != row.kek_id:
            raise DecryptionError()
        cached = self._cache.get(key)
        # A hit needs the very same sealed bytes, so a record changed on disk is opened again.
        if cached is not None and cached[0] == row.generation and cached[1] == row.sealed:
            with contextlib.suppress(KeyError):  # evicted meanwhile by a read in another thread
                self._cache.move_to_end(key)
            secrets, meta = cached[2], cached[3]
        else:
            plain = self._cipher.open(row.sealed, self._context(_CREDENTIALS, *key))
            secrets, meta = _secrets_from(plain)
            # A record an older version stored from an unchecked answer (a lone surrogate, a
            # control character) fails closed for its user instead of breaking every answer.
            if not rfc6749.well_formed(
                secrets.access_token, secrets.refresh_token, row.token_type, row.scopes
            ):
                raise DecryptionError()
            self._cache[key] = (row.generation, row.sealed, secrets, meta)
            if len(self._cache) > self._cache_size:
                with contextlib.suppress(KeyError):  # emptied meanwhile by another thread
                    self._cache.popitem(last=False)
        clear = _meta(row.token_type, row.scopes, row.expires_at, row.obtained_via, row.updated_at)
        if meta is not None and meta != clear:
            raise DecryptionError()
        try:
            status = CredentialStatus(row.status)
        except ValueError:
            raise DecryptionError() from None
        return Credential(
            user_id=row.user_id,
            upstream_key=row.upstream_key,
            secrets=secrets,
            token_type=row.token_type,
            scopes=row.scopes,
            expires_at=row.expires_at,
            obtained_via=row.obtained_via,
            updated_at=row.updated_at,
            status=status,
            generation=row.generation,
            last_refresh_at=row.last_refresh_at,
            last_error=row.last_error,
            failure_count=row.failure_count,
            next_attempt_at=row.next_attempt_at,
            refresh_token_expires_at=row.refresh_token_expires_at,
        )

    def save(
        self,
        credential: Credential,
        expected_generation: int | None,
        now: float,
        event: ConnectionEventRow | None = None,
    ) -> int | None:
        """Seal and write; with ``expected_generation`` only if nobody wrote since (CAS).
        ``event`` (broker/events.py) is written in the same transaction."""
        row = self.seal_credential(credential, now)
        if event is None:
            return self.store.save_credential(row, expected_generation)
        return self.store.save_credential(row, expected_generation, event)

    def seal_credential(self, credential: Credential, now: float) -> CredentialRow:
        """The store row for ``credential``: its secrets (and a copy of its clear columns) sealed."""
        context = self._context(_CREDENTIALS, credential.user_id, credential.upstream_key)
        payload: dict[str, object] = {"access_token": credential.secrets.access_token}
        if credential.secrets.refresh_token is not None:
            payload["refresh_token"] = credential.secrets.refresh_token
        if credential.secrets.fields:
            payload["fields"] = dict(credential.secrets.fields)
        if credential.secrets.params:
            payload["params"] = dict(credential.secrets.params)
        payload["meta"] = _meta(
            credential.token_type,
            credential.scopes,
            credential.expires_at,
            credential.obtained_via,
            credential.updated_at,
        )
        sealed = self._cipher.seal(json.dumps(payload).encode(), context)
        return CredentialRow(
            user_id=credential.user_id,
            upstream_key=credential.upstream_key,
            token_type=credential.token_type,
            scopes=credential.scopes,
            expires_at=credential.expires_at,
            obtained_via=credential.obtained_via,
            status=credential.status.value,
            generation=0,
            kek_id=key_id_of(sealed),
            sealed=sealed,
            created_at=now,
            updated_at=credential.updated_at,
            last_refresh_at=now,
            refresh_token_expires_at=credential.refresh_token_expires_at,
        )

    def forget(self, user_id: str, upstream_key: str) -> None:
        self._cache.pop((user_id, upstream_key), None)
        self._recent.pop((user_id, upstream_key), None)

    # -- pending flows -------------------------------------------------------------------

    def add_flow(
        self, flow: PendingFlow, max_per_user: int, now: float, max_total: int | None = None
    ) -> bool:
        """Seal the flow's verifier and state (bound to its user, state hash and upstream) and
        store it. False when the store refused it: ``max_total`` live flows already."""
        context = flow_context(flow.user_id, flow.state_hash, flow.upstream_key)
        payload: dict[str, object] = {"verifier": flow.verifier, "state": flow.state}
        if flow.params:
            payload["params"] = dict(flow.params)
        if flow.start_ref:
            payload["start"] = flow.start_ref  # hosted connect: the /start link is rebuilt from it
        if flow.scopes:
            payload["scopes"] = list(flow.scopes)
        sealed = self._cipher.seal(json.dumps(payload).encode(), context)
        row = PendingFlowRow(
            state_hash=flow.state_hash,
            user_id=flow.user_id,
            upstream_key=flow.upstream_key,
            created_at=flow.created_at,
            expires_at=flow.expires_at,
            kek_id=key_id_of(sealed),
            sealed=sealed,
            start_hash=reference_hash(flow.start_ref) if flow.start_ref else None,
        )
        return self.store.add_pending_flow(row, max_per_user, now, max_total)

    def take_flow(self, state_hash: str) -> PendingFlow | None:
        """Remove the flow of ``state_hash`` and open it. Raises DecryptionError for a record
        that does not open (tampered, moved to another row or upstream, or an older format)."""
        row = self.store.take_pending_flow(state_hash)
        return None if row is None else self._open_flow(row)

    def newest_flow(self, user_id: str, upstream_key: str, now: float) -> PendingFlow | None:
        """The newest live flow of (user, upstream), opened (its state included), or None.
        Raises DecryptionError for a record that does not open."""
        row = self.store.newest_pending_flow(user_id, upstream_key, now)
        return None if row is None else self._open_flow(row)

    # -- hosted connect (broker/connect/) -------------------------------------------------

    def bind_flow(self, start_ref: str, browser_hash: str, now: float) -> PendingFlow | None:
        """The live, not yet opened flow of the /start reference ``start_ref``, now bound to the
        browser whose cookie secret hashes to ``browser_hash``; None when there is none (unknown,
        expired or already opened). Raises DecryptionError for a record that does not open."""
        row = self.store.bind_pending_flow(reference_hash(start_ref), browser_hash, now)
        return None if row is None else self._open_flow(row)

    def peek_flow(self, state_hash: str) -> PendingFlowRow | None:
        """The stored flow of ``state_hash`` (clear columns: who, which upstream, until when,
        which browser), expired or not, left in place."""
        return self.store.get_pending_flow(state_hash)

    def take_bound_flow(self, state_hash: str, browser_hash: str) -> PendingFlow | None:
        """Remove and open the flow of ``state_hash`` if bound to ``browser_hash``."""
        row = self.store.take_bound_flow(state_hash, browser_hash)
        return None if row is None else self._open_flow(row)

    def _open_flow(self, row: PendingFlowRow) -> PendingFlow:
        try:
            if key_id_of(row.sealed) != row.kek_id:
                raise DecryptionError()
            context = flow_context(row.user_id, row.state_hash, row.upstream_key)
            plain = self._cipher.open(row.sealed, context)
            try:
                data = json.loads(plain)
                verifier, state = data["verifier"], data.get("state", "")
                params = _pairs(data.get("params"))
                start = data.get("start", "")
                scopes = data.get("scopes", [])
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DecryptionError() from None
            if not all(isinstance(v, str) for v in (verifier, state, start)):
                raise DecryptionError()
            if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
                raise DecryptionError()
        except DecryptionError:
            self.decryption_failures += 1
            raise
        return PendingFlow(
            state_hash=row.state_hash,
            user_id=row.user_id,
            upstream_key=row.upstream_key,
            verifier=verifier,
            created_at=row.created_at,
            expires_at=row.expires_at,
            state=state,
            params=params,
            start_ref=start,
            bound=row.browser_hash is not None,
            scopes=tuple(scopes),
        )


def reference_hash(value: str) -> str:
    """What the store keeps of a hosted connect reference or cookie secret: its SHA-256, hex."""
    return hashlib.sha256(value.encode()).hexdigest()


def _secrets_from(plain: bytes) -> tuple[Secrets, list[object] | None]:
    try:
        data = json.loads(plain)
        access = data["access_token"]
        refresh = data.get("refresh_token")
        meta = data.get("meta")  # absent in records written before it existed
        fields, params = _pairs(data.get("fields")), _pairs(data.get("params"))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DecryptionError() from None
    if not isinstance(access, str) or not (refresh is None or isinstance(refresh, str)):
        raise DecryptionError()
    if meta is not None and not isinstance(meta, list):
        raise DecryptionError()
    return Secrets(access, refresh, fields, params), meta


def _pairs(value: object) -> tuple[tuple[str, str], ...]:
    """A sealed mapping of names to strings (connection fields or params) as sorted pairs;
    absent in records written before they existed. Anything else is a damaged record."""
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("not a mapping of strings")
    return tuple(sorted(value.items()))
