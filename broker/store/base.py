"""The store contract every backend implements, and its row types."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from broker.errors import DecryptionError


@dataclass(frozen=True, slots=True)
class CredentialRow:
    """One credential as stored: clear metadata and the sealed secrets."""

    user_id: str
    upstream_key: str
    token_type: str
    scopes: tuple[str, ...]
    expires_at: float | None
    obtained_via: str
    status: str
    generation: int
    kek_id: str
    sealed: bytes
    created_at: float
    updated_at: float
    last_refresh_at: float | None = None
    last_error: str | None = None
    failure_count: int = 0
    next_attempt_at: float | None = None
    # Connection health (migration 6): when the refresh token stops working, when known; the
    # last Resolve (written at most once a minute, broker/usage.py). Clear metadata, no secret.
    refresh_token_expires_at: float | None = None
    last_used_at: float | None = None

    def __repr__(self) -> str:
        return (
            f"CredentialRow(user_id={self.user_id!r}, upstream_key={self.upstream_key!r}, "
            f"generation={self.generation}, status={self.status!r})"
        )


@dataclass(frozen=True, slots=True)
class DueCredential:
    """A credential the background refresher found due: clear metadata only, no ciphertext."""

    user_id: str
    upstream_key: str
    expires_at: float | None
    last_refresh_at: float | None


@dataclass(frozen=True, slots=True)
class ConnectionEventRow:
    """A change to a connection (broker/events.py), written in the transaction of the change.
    ``sequence`` is assigned by the store (0 in a row about to be written). Never a secret."""

    user_id: str
    upstream_key: str
    kind: str
    status: str
    last_error: str | None
    at: float
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class PendingFlowRow:
    """A started connect flow. The state is stored only as its hash; the verifier sealed.

    Hosted connect: ``start_hash`` is the hash of the flow's one-time /start reference (cleared
    when a browser opens it), ``browser_hash`` the hash of the cookie secret of that browser."""

    state_hash: str
    user_id: str
    upstream_key: str
    created_at: float
    expires_at: float
    kek_id: str
    sealed: bytes
    start_hash: str | None = None
    browser_hash: str | None = None

    def __repr__(self) -> str:
        return f"PendingFlowRow(user_id={self.user_id!r}, upstream_key={self.upstream_key!r})"


@dataclass(frozen=True, slots=True)
class SealedRecord:
    """A sealed record seen by key rotation: where it lives, which KEK wraps it, its bytes.

    ``table`` is "credentials" or "pending_flows"; ``record_key`` the upstream key or the flow's
    state hash; ``generation`` is 0 for flows. ``position`` is the backend's stable scan order
    (the rowid in SQLite, a sequence column elsewhere): rotation pages through it.
    ``upstream_key``: the record's upstream (a flow's ciphertext is bound to it)."""

    table: str
    user_id: str
    record_key: str
    kek_id: str
    generation: int
    sealed: bytes
    position: int
    upstream_key: str = ""

    def __repr__(self) -> str:
        return f"SealedRecord(table={self.table!r}, position={self.position}, kek_id={self.kek_id!r})"


# The columns both backends read and write, in the order the row parsers below expect.
CRED_COLUMNS = (
    "user_id, upstream_key, token_type, scopes, expires_at, obtained_via, status, generation, "
    "kek_id, sealed, created_at, updated_at, last_refresh_at, last_error, failure_count"
)
# Read with next_attempt_at (migration 2); a save writes CRED_COLUMNS only, which resets the
# backoff and releases the refresh lease.
CRED_SELECT = CRED_COLUMNS + ", next_attempt_at, refresh_token_expires_at, last_used_at"
FLOW_COLUMNS = (
    "state_hash, user_id, upstream_key, created_at, expires_at, kek_id, sealed, start_hash, browser_hash"
)


def credential_from_row(row: Sequence[Any]) -> CredentialRow:
    """A CredentialRow from a CRED_SELECT (or CRED_COLUMNS) row. A clear column that does not
    parse (a hand edit, a corrupt file) fails closed with the one DecryptionError, as a record
    whose ciphertext does not open."""
    try:
        return _credential_fields(row)
    except (ValueError, TypeError, OverflowError):
        raise DecryptionError() from None


def _credential_fields(row: Sequence[Any]) -> CredentialRow:
    (user, key, token_type, scopes, expires, via, status, gen, kid, sealed, created, updated,
     last_refresh, last_error, failures, *rest) = row  # fmt: skip
    next_attempt = rest[0] if rest else None
    refresh_expires, last_used = (rest[1], rest[2]) if len(rest) >= 3 else (None, None)
    scope_list = json.loads(str(scopes))
    if not isinstance(scope_list, list) or not all(isinstance(s, str) for s in scope_list):
        raise ValueError("scopes")
    return CredentialRow(
        user_id=str(user),
        upstream_key=str(key),
        token_type=str(token_type),
        scopes=tuple(scope_list),
        expires_at=None if expires is None else float(expires),
        obtained_via=str(via),
        status=str(status),
        generation=int(gen),
        kek_id=str(kid),
        sealed=bytes(sealed),
        created_at=float(created),
        updated_at=float(updated),
        last_refresh_at=None if last_refresh is None else float(last_refresh),
        last_error=None if last_error is None else str(last_error),
        failure_count=int(failures or 0),
        next_attempt_at=None if next_attempt is None else float(next_attempt),
        refresh_token_expires_at=None if refresh_expires is None else float(refresh_expires),
        last_used_at=None if last_used is None else float(last_used),
    )


def flow_from_row(row: Sequence[Any]) -> PendingFlowRow:
    """A PendingFlowRow from a FLOW_COLUMNS row."""
    state_hash, user, key, created, expires, kid, sealed, start_hash, browser_hash = row
    return PendingFlowRow(
        str(state_hash),
        str(user),
        str(key),
        float(created),
        float(expires),
        str(kid),
        bytes(sealed),
        None if start_hash is None else str(start_hash),
        None if browser_hash is None else str(browser_hash),
    )


class CredentialStore(Protocol):
    """What the service needs from a backend. Every method is synchronous and atomic."""

    schema_version: int

    def get_credential(self, user_id: str, upstream_key: str) -> CredentialRow | None: ...

    def save_credential(
        self, row: CredentialRow, expected_generation: int | None, event: ConnectionEventRow | None = None
    ) -> int | None:
        """Write ``row``. With ``expected_generation`` set, only if the stored row still has that
        generation (compare-and-swap); returns the new generation, or None when the swap lost.
        ``event`` is appended in the same transaction, only when the row was written."""

    def record_failure(
        self,
        user_id: str,
        upstream_key: str,
        status: str,
        error_class: str,
        generation: int,
        next_attempt_at: float | None = None,
        event: ConnectionEventRow | None = None,
    ) -> None:
        """Mark a credential's status after a failed refresh, if still at ``generation``: count one
        more consecutive failure, keep the error class, set when to try again and release the
        refresh lease. Never deletes anything. ``event``: appended in the same transaction, only
        when the row was updated."""

    def delete_credential(
        self, user_id: str, upstream_key: str, event: ConnectionEventRow | None = None
    ) -> bool:
        """Delete; ``event`` is appended in the same transaction when a row was deleted."""

    def events_after(
        self, after_sequence: int, limit: int, user_id: str | None = None
    ) -> list[ConnectionEventRow]:
        """Up to ``limit`` events with sequence > ``after_sequence`` (of ``user_id`` only, when
        given), in sequence order. Sequences are in commit order: a reader that has seen
        sequence n has seen every committed event before it."""

    def last_event_sequence(self) -> int:
        """The highest committed event sequence (0 when there is none)."""

    def due_for_refresh(
        self, upstream_key: str, expires_before: float, now: float, limit: int
    ) -> list[DueCredential]:
        """Up to ``limit`` credentials of ``upstream_key`` (soonest first) expiring before
        ``expires_before`` and not in a backoff at ``now``, never needs_reauth ones; an index
        range scan (no full scan)."""

    def defer_refresh(self, user_id: str, upstream_key: str, generation: int, until: float) -> None:
        """Keep a credential that cannot be refreshed out of the refresher's scans until
        ``until``, if still at ``generation`` (sets next_attempt_at; a save clears it)."""

    def idle_for_refresh(
        self, upstream_key: str, refreshed_before: float, now: float, limit: int
    ) -> list[DueCredential]:
        """Up to ``limit`` credentials of ``upstream_key`` (longest idle first) last refreshed
        before ``refreshed_before`` and not in a backoff at ``now``, never needs_reauth ones."""

    def count_credentials(self, now: float) -> dict[str, int]:
        """Credentials by status; "connected" ones whose expiry has passed count as "expired"."""

    def add_pending_flow(
        self, row: PendingFlowRow, max_per_user: int, now: float, max_total: int | None = None
    ) -> bool:
        """Insert a flow, drop expired ones, and keep at most ``max_per_user`` live flows for
        (user, upstream), dropping the oldest. With ``max_total``, refuse (return False, write
        nothing) when that many live flows of all users are already stored: flows are never
        evicted for another user's. True when inserted."""

    def take_pending_flow(self, state_hash: str) -> PendingFlowRow | None:
        """Remove and return the flow (consumed on first use, whatever happens next)."""

    def newest_pending_flow(self, user_id: str, upstream_key: str, now: float) -> PendingFlowRow | None:
        """The most recently started flow of (user, upstream) that has not expired at ``now``."""

    def get_pending_flow(self, state_hash: str) -> PendingFlowRow | None:
        """The flow of ``state_hash``, expired or not, without consuming it (hosted connect)."""

    def bind_pending_flow(self, start_hash: str, browser_hash: str, now: float) -> PendingFlowRow | None:
        """Hosted connect /start, atomically: the live flow whose one-time reference hashes to
        ``start_hash`` and that no browser holds yet gets ``browser_hash`` and loses its
        reference (so a second /start finds nothing). The flow as bound, or None."""

    def take_bound_flow(self, state_hash: str, browser_hash: str) -> PendingFlowRow | None:
        """Remove and return the flow of ``state_hash`` only if bound to ``browser_hash``."""

    def purge_expired_flows(self, now: float, batch_size: int = 1000) -> int:
        """Delete every flow expired at ``now``, ``batch_size`` rows per transaction; how many."""

    def reclaim_space(self) -> None:
        """Give freed space back to the file system where the backend needs telling (SQLite's
        incremental vacuum); a no-op where the database does it itself."""

    def sample_key_ids(self, limit: int) -> list[tuple[str, int]]:
        """(kek_id, record count) over every sealed record, most used first."""

    def sample_records(self, kek_id: str, limit: int) -> list[CredentialRow | PendingFlowRow]: ...

    def claim_refresh(
        self,
        user_id: str,
        upstream_key: str,
        generation: int,
        owner: str,
        now: float,
        lease_seconds: float,
        failure_count: int | None = None,
    ) -> bool:
        """Take the refresh lease of a credential, atomically: only if it is still at
        ``generation`` (and, when given, still at ``failure_count``: no failure recorded since
        the claimer read it) and nobody else holds an unexpired lease. Sets status "refreshing".
        True when ``owner`` now holds it. A later ``save_credential`` or ``record_failure``
        releases it; a crashed holder's lease simply expires. The lease runs ``lease_seconds``
        from ``now`` (SQLite), or from the database's own clock (PostgreSQL, which ignores
        ``now``, so replicas whose clocks disagree still agree on when a lease ends)."""

    def sealed_records(self, after_position: int, limit: int, skip_kek_id: str) -> list[SealedRecord]:
        """Up to ``limit`` sealed records (both tables) with position > ``after_position`` whose
        KEK is not ``skip_kek_id``, in position order."""

    def replace_sealed(self, updates: list[tuple[SealedRecord, str, bytes]]) -> int:
        """For each (record, new kek_id, new sealed): write them if the stored record still has the
        record's kek_id and generation (and, for a flow, the same bytes); the generation is not
        changed. One atomic batch; returns how many were written."""

    def key_checks(self) -> dict[str, bytes]:
        """The per-key check values (broker/crypto/keycheck.py) by key id."""

    def add_key_check(self, kek_id: str, check_value: bytes, now: float) -> bool:
        """Store ``kek_id``'s check value unless it has one already; True when written."""

    def replace_key_check(self, kek_id: str, expected: bytes, check_value: bytes, now: float) -> bool:
        """Replace ``kek_id``'s check value if it is still ``expected``; True when written."""

    def delete_key_check(self, kek_id: str) -> None: ...

    def sealed_records_under(self, kek_id: str, after_position: int, limit: int) -> list[SealedRecord]:
        """Up to ``limit`` sealed records (both tables) under ``kek_id`` with position >
        ``after_position``, in position order (as ``sealed_records``)."""

    # -- upkeep (broker/store/upkeep.py: usage stamps, retention) ---------------------------

    def touch_last_used(self, user_id: str, upstream_key: str, now: float, not_since: float) -> bool:
        """Set the credential's last_used_at to ``now`` unless it is already after
        ``not_since`` (one conditional UPDATE; never changes the generation). True when written."""

    def needs_reauth_before(self, cutoff: float, limit: int) -> list[tuple[str, str, float]]:
        """Up to ``limit`` (user_id, upstream_key, needs_reauth_at) of credentials that have
        needed reconnecting since ``cutoff`` or earlier, oldest first (an index range scan)."""

    def delete_needs_reauth(
        self, user_id: str, upstream_key: str, cutoff: float, event: ConnectionEventRow | None = None
    ) -> bool:
        """Delete the credential only if it still needs reconnecting since ``cutoff`` or earlier
        (a reconnect meanwhile keeps it); ``event`` in the same transaction. True when deleted."""

    def events_to_trim(self, before: float, keep: int) -> tuple[int, int]:
        """(the highest sequence retention would delete, how many events that is): every event
        at or before ``before``, and all but the newest ``keep``. (0, 0) when none."""

    def trim_events(self, through_sequence: int, batch_size: int = 1000) -> int:
        """Delete the events with sequence <= ``through_sequence`` in batches, raising the
        trimmed-through mark with each batch in its transaction; how many were deleted."""

    def events_trimmed_through(self) -> int:
        """The highest sequence retention ever deleted (0: none): a watcher resuming below it
        may have missed events."""

    def close(self) -> None: ...
