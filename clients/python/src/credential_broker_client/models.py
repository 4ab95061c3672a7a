"""The answers: plain frozen dataclasses, never protobuf messages. A token is never part of a
repr, so logging an answer does not log its secret."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from credential_broker_client._proto.credentialbroker.v1 import broker_pb2 as pb

EVENT_KINDS = {
    pb.CONNECTION_EVENT_KIND_CONNECTED: "CONNECTED",
    pb.CONNECTION_EVENT_KIND_REFRESHED: "REFRESHED",
    pb.CONNECTION_EVENT_KIND_REFRESH_FAILED: "REFRESH_FAILED",
    pb.CONNECTION_EVENT_KIND_NEEDS_REAUTH: "NEEDS_REAUTH",
    pb.CONNECTION_EVENT_KIND_RECOVERED: "RECOVERED",
    pb.CONNECTION_EVENT_KIND_DISCONNECTED: "DISCONNECTED",
    pb.CONNECTION_EVENT_KIND_SCOPES_CHANGED: "SCOPES_CHANGED",
}


@dataclass(frozen=True)
class Credential:
    """A Resolve answer: send ``header_name: header_value`` to the upstream."""

    access_token: str = field(repr=False)
    token_type: str
    header_name: str
    header_value: str = field(repr=False)
    expires_at: datetime | None
    scopes: tuple[str, ...]
    obtained_via: str
    connection_fields: Mapping[str, str]


@dataclass(frozen=True)
class AuthorizationRequest:
    """A started connect flow: send the user's browser to ``authorization_url`` (it carries the
    flow's state, so neither is part of the repr)."""

    authorization_url: str = field(repr=False)
    state: str = field(repr=False)
    expires_at: datetime | None


@dataclass(frozen=True)
class CredentialInfo:
    """A stored credential's description (never a token)."""

    user_id: str
    upstream: str
    token_type: str
    scopes: tuple[str, ...]
    expires_at: datetime | None
    obtained_via: str
    updated_at: datetime | None


@dataclass(frozen=True)
class Connection:
    """One user's connection to one upstream (never a token)."""

    upstream: str
    status: str
    mode: str
    scopes: tuple[str, ...]
    expires_at: datetime | None
    obtained_via: str
    updated_at: datetime | None
    last_error: str
    connection_fields: Mapping[str, str]
    refresh_token_expires_at: datetime | None
    last_refreshed_at: datetime | None
    last_used_at: datetime | None
    consecutive_failures: int
    next_retry_at: datetime | None


@dataclass(frozen=True)
class TokenRevocation:
    """The outcome of revoking one token (RFC 7009)."""

    token_type_hint: str
    outcome: str
    reason: str


@dataclass(frozen=True)
class Disconnection:
    """A Disconnect answer: whether a credential existed, and each revocation's outcome."""

    deleted: bool
    revocations: tuple[TokenRevocation, ...]


@dataclass(frozen=True)
class UpstreamDisconnection:
    """One upstream's outcome in a DisconnectAll answer."""

    upstream: str
    deleted: bool
    revocations: tuple[TokenRevocation, ...]


@dataclass(frozen=True)
class ConnectionEvent:
    """One committed change to a connection. ``kind`` is e.g. ``"REFRESHED"``."""

    sequence: int
    user_id: str
    upstream: str
    kind: str
    status: str
    last_error: str
    at: datetime | None


def _time(message: Any, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    stamp = getattr(message, name)
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, timezone.utc)


def credential(resp: pb.ResolveResponse) -> Credential:
    return Credential(
        access_token=resp.access_token,
        token_type=resp.token_type,
        header_name=resp.header_name,
        header_value=resp.header_value,
        expires_at=_time(resp, "expires_at"),
        scopes=tuple(resp.scopes),
        obtained_via=resp.obtained_via,
        connection_fields=dict(resp.connection_fields),
    )


def authorization_request(resp: pb.BuildAuthorizationURLResponse) -> AuthorizationRequest:
    return AuthorizationRequest(resp.authorization_url, resp.state, _time(resp, "expires_at"))


def credential_info(info: pb.CredentialInfo) -> CredentialInfo:
    return CredentialInfo(
        user_id=info.user_id,
        upstream=info.upstream,
        token_type=info.token_type,
        scopes=tuple(info.scopes),
        expires_at=_time(info, "expires_at"),
        obtained_via=info.obtained_via,
        updated_at=_time(info, "updated_at"),
    )


def connection(c: pb.Connection) -> Connection:
    return Connection(
        upstream=c.upstream,
        status=c.status,
        mode=c.mode,
        scopes=tuple(c.scopes),
        expires_at=_time(c, "expires_at"),
        obtained_via=c.obtained_via,
        updated_at=_time(c, "updated_at"),
        last_error=c.last_error,
        connection_fields=dict(c.connection_fields),
        refresh_token_expires_at=_time(c, "refresh_token_expires_at"),
        last_refreshed_at=_time(c, "last_refreshed_at"),
        last_used_at=_time(c, "last_used_at"),
        consecutive_failures=c.consecutive_failures,
        next_retry_at=_time(c, "next_retry_at"),
    )


def _revocations(items: Any) -> tuple[TokenRevocation, ...]:
    return tuple(TokenRevocation(r.token_type_hint, r.outcome, r.reason) for r in items)


def disconnection(resp: pb.DisconnectResponse) -> Disconnection:
    return Disconnection(resp.deleted, _revocations(resp.revocations))


def upstream_disconnections(resp: pb.DisconnectAllResponse) -> tuple[UpstreamDisconnection, ...]:
    return tuple(
        UpstreamDisconnection(r.upstream, r.deleted, _revocations(r.revocations)) for r in resp.results
    )


def event(e: pb.ConnectionEvent) -> ConnectionEvent:
    return ConnectionEvent(
        sequence=e.sequence,
        user_id=e.user_id,
        upstream=e.upstream,
        kind=EVENT_KINDS.get(e.kind, "UNSPECIFIED"),
        status=e.status,
        last_error=e.last_error,
        at=_time(e, "at"),
    )
