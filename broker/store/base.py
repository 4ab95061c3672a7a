"""The store contract every backend implements, and its row types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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

    def __repr__(self) -> str:
        return (
            f"CredentialRow(user_id={self.user_id!r}, upstream_key={self.upstream_key!r}, "
            f"generation={self.generation}, status={self.status!r})"
        )


@dataclass(frozen=True, slots=True)
class PendingFlowRow:
    """A started connect flow. The state is stored only as its hash; the verifier sealed."""

    state_hash: str
    user_id: str
    upstream_key: str
    created_at: float
    expires_at: float
    kek_id: str
    sealed: bytes

    def __repr__(self) -> str:
        return f"PendingFlowRow(user_id={self.user_id!r}, upstream_key={self.upstream_key!r})"


class RefreshLock(Protocol):
    """A held cross-process lock on one credential's refresh; release it exactly once."""

    def release(self) -> None: ...


class CredentialStore(Protocol):
    """What the service needs from a backend. Every method is synchronous and atomic."""

    schema_version: int

    def get_credential(self, user_id: str, upstream_key: str) -> CredentialRow | None: ...

    def save_credential(self, row: CredentialRow, expected_generation: int | None) -> int | None:
        """Write ``row``. With ``expected_generation`` set, only if the stored row still has that
        generation (compare-and-swap); returns the new generation, or None when the swap lost."""

    def record_failure(
        self, user_id: str, upstream_key: str, status: str, error_class: str, generation: int
    ) -> None:
        """Mark a credential's status after a failed refresh, if still at ``generation``."""

    def delete_credential(self, user_id: str, upstream_key: str) -> bool: ...

    def add_pending_flow(self, row: PendingFlowRow, max_per_user: int, now: float) -> None:
        """Insert a flow, drop expired ones, and keep at most ``max_per_user`` live flows for
        (user, upstream), dropping the oldest."""

    def take_pending_flow(self, state_hash: str) -> PendingFlowRow | None:
        """Remove and return the flow (consumed on first use, whatever happens next)."""

    def sample_key_ids(self, limit: int) -> list[tuple[str, int]]:
        """(kek_id, record count) over every sealed record, most used first."""

    def sample_records(self, kek_id: str, limit: int) -> list[CredentialRow | PendingFlowRow]: ...

    def lock_refresh(self, user_id: str, upstream_key: str, timeout: float) -> RefreshLock | None:
        """Wait up to ``timeout`` seconds for the exclusive right to refresh (user, upstream)
        across every process sharing this store; None when the wait timed out. Held while the
        token request runs, so one refresh token is never presented twice."""

    def close(self) -> None: ...
