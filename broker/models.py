"""Value objects shared by the service, the store and the RPC layer."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from enum import StrEnum


@functools.lru_cache(maxsize=4096)
def upstream_key(name: str, url: str) -> str:
    """The store key of an upstream: ``name + "_" + sha256(name|url)[:16]``.

    Matches the reference implementation's server key so its records line up.
    """
    digest = hashlib.sha256(f"{name}|{url}".encode()).hexdigest()
    return f"{name}_{digest[:16]}"


class CredentialStatus(StrEnum):
    """Lifecycle state of a stored credential."""

    CONNECTED = "connected"
    REFRESHING = "refreshing"
    NEEDS_REAUTH = "needs_reauth"
    ERROR = "error"


class ObtainedVia(StrEnum):
    CONNECT_FLOW = "connect_flow"
    TOKEN_EXCHANGE = "token_exchange"
    ENTRA_OBO = "entra_obo"


@dataclass(frozen=True, slots=True)
class Secrets:
    """The secret part of a credential: sealed in the store, never logged."""

    access_token: str
    refresh_token: str | None = field(default=None)
    # The connection's declared fields and its connection params (sealed with the tokens:
    # they name the customer's shop or account), as sorted (name, value) pairs.
    fields: tuple[tuple[str, str], ...] = ()
    params: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:  # never let a token reach a log through repr()
        return "Secrets(<redacted>)"


@dataclass(frozen=True, slots=True)
class Credential:
    """A stored credential: clear metadata plus its secrets."""

    user_id: str
    upstream_key: str
    secrets: Secrets
    token_type: str
    scopes: tuple[str, ...]
    expires_at: float | None
    obtained_via: str
    updated_at: float
    status: CredentialStatus = CredentialStatus.CONNECTED
    generation: int = 0
    # Lifecycle (clear metadata, never secret): see docs/data-safety.md.
    last_refresh_at: float | None = None
    last_error: str | None = None
    failure_count: int = 0
    next_attempt_at: float | None = None
    # When the refresh token stops working, when the provider said (clear metadata).
    refresh_token_expires_at: float | None = None

    def valid_for(self, now: float, seconds: float) -> bool:
        """True when the access token is usable and stays so for ``seconds`` more."""
        if self.status is CredentialStatus.NEEDS_REAUTH:
            return False
        return self.expires_at is None or self.expires_at - now > seconds

    def refreshed_within(self, now: float, seconds: float) -> bool:
        """True when the credential was refreshed (or connected) less than ``seconds`` ago."""
        return self.last_refresh_at is not None and now - self.last_refresh_at < seconds


@dataclass(frozen=True, slots=True)
class CredentialInfo:
    """Metadata about a credential for callers: never a token."""

    user_id: str
    upstream: str
    token_type: str
    scopes: tuple[str, ...]
    expires_at: float | None
    obtained_via: str
    updated_at: float


@dataclass(slots=True)  # not frozen: built on every call, and frozen costs more
class ResolvedCredential:
    """What Resolve hands out: the access token and how to send it."""

    access_token: str
    token_type: str
    expires_at: float | None
    scopes: tuple[str, ...]
    obtained_via: str
    header_name: str
    header_value: str
    connection_fields: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:
        return f"ResolvedCredential(<redacted>, expires_at={self.expires_at!r})"


@dataclass(frozen=True, slots=True)
class PendingFlow:
    """A started connect flow waiting for its callback. ``state_hash`` is sha256(state).

    ``state`` (sealed with the verifier, never in a clear column) lets a later NOT_CONNECTED or
    RECONNECT_REQUIRED answer send the user to this same flow; empty when not known.

    Hosted connect (broker/connect/): ``start_ref`` is the one-time reference of the flow's
    ``/start`` link (sealed; the store keeps its hash), and ``bound`` says a browser has opened
    that link, so the flow now belongs to that browser's cookie."""

    state_hash: str
    user_id: str
    upstream_key: str
    verifier: str
    created_at: float
    expires_at: float
    state: str = ""
    # The connect request's connection params (sealed with the verifier).
    params: tuple[tuple[str, str], ...] = ()
    start_ref: str = ""
    bound: bool = False
    #: The scopes the flow asks for (sealed with the verifier); empty: the upstream's configured
    #: ones. Set by an incremental-scopes answer (broker/scopes.py).
    scopes: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"PendingFlow(user_id={self.user_id!r}, upstream_key={self.upstream_key!r})"


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """The answer to BuildAuthorizationURL."""

    authorization_url: str
    state: str
    expires_at: float

    def __repr__(self) -> str:
        return f"AuthorizationRequest(<redacted>, expires_at={self.expires_at!r})"
