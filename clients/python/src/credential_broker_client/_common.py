"""What the sync and async clients share: the target, the request metadata, request building,
the retry rule and its jittered backoff; and the HTTP auths' origin check. No I/O here."""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
import re
from collections.abc import Collection, Iterator, Mapping
from urllib.parse import urlsplit

from credential_broker_client._proto.credentialbroker.v1 import broker_pb2 as pb
from credential_broker_client.errors import BrokerError, Cancelled, Unavailable

TARGET_ENV = "CREDENTIAL_BROKER_SOCKET"
DEFAULT_TARGET = "127.0.0.1:50051"
REQUEST_HEADER = "x-credential-broker-request"
CALLER_TOKEN_HEADER = "x-credential-broker-caller-token"
DEFAULT_TIMEOUT = 10.0
LOGGER_NAME = "credential_broker_client"

# Reconnect quickly after the broker restarts (gRPC's default first backoff is a full second).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

BACKOFF_BASE = 0.05
BACKOFF_CAP = 1.0
# A backoff step that would end after the deadline is cut short to leave this for a last try.
LAST_TRY_SECONDS = 0.02
WATCH_BACKOFF_CAP = 5.0
# A watch stream that stayed up this long was healthy: its break starts the backoff over (one
# refused right after registering keeps backing off instead of resubscribing at once).
WATCH_HEALTHY_SECONDS = 1.0

DEFAULT_PORTS = {"http": 80, "https": 443}

# RPCs that consume a one-time state: retried only when the broker never answered.
ONE_SHOT = frozenset({"Complete", "Deny"})


def resolve_target(target: str | None, environ: Mapping[str, str] | None = None) -> str:
    """``target``, else $CREDENTIAL_BROKER_SOCKET, else 127.0.0.1:50051. A bare absolute path
    is a unix socket."""
    env = os.environ if environ is None else environ
    chosen = target or env.get(TARGET_ENV) or DEFAULT_TARGET
    if chosen.startswith("/"):
        return "unix://" + chosen
    return chosen


def call_metadata(caller_token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: the SSRF-guard header and the caller token, if any."""
    md = [(REQUEST_HEADER, "true")]
    if caller_token:
        md.append((CALLER_TOKEN_HEADER, caller_token))
    return tuple(md)


# RFC 6750 section 2.1: what may follow "Bearer " (a JWT always fits).
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def with_user_token(
    metadata: tuple[tuple[str, str], ...], user_token: str | None
) -> tuple[tuple[str, str], ...]:
    """``metadata`` plus ``authorization: Bearer <user_token>`` when a token is given (the
    broker's ``identity:`` check). A value that cannot be a bearer token is refused here, before
    gRPC does it with an untyped error; the message never echoes it."""
    if not user_token:
        return metadata
    if not _B64TOKEN.fullmatch(user_token):
        raise ValueError("user_token: not a bearer token (RFC 6750); pass the token alone, without 'Bearer '")
    return (*metadata, ("authorization", "Bearer " + user_token))


# The caller's own metadata for calls made in this thread or task (outgoing_metadata).
_OUTGOING: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "credential_broker_outgoing_metadata", default=()
)
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_SDK_KEYS = frozenset({REQUEST_HEADER, CALLER_TOKEN_HEADER, "authorization"})
MAX_METADATA_VALUE = 8192


@contextlib.contextmanager
def outgoing_metadata(*pairs: tuple[str, str]) -> Iterator[None]:
    """Send ``pairs`` (such as ``("x-request-id", rid)``, which the broker's audit trail records,
    or ``("traceparent", tp)``) with every call any client makes inside the block, in this
    thread or asyncio task (and tasks it starts). Blocks nest and add up. Keys are lowercase
    text header names; the SDK's own headers (the request header, the caller token,
    ``authorization``), ``grpc-`` and binary (``-bin``) keys are refused, as are values that are
    not printable ASCII, with a ValueError that never shows the value."""
    checked = tuple(_checked_pair(key, value) for key, value in pairs)
    token = _OUTGOING.set(_OUTGOING.get() + checked)
    try:
        yield
    finally:
        _OUTGOING.reset(token)


def _checked_pair(key: str, value: str) -> tuple[str, str]:
    if not (isinstance(key, str) and _METADATA_KEY.fullmatch(key)):
        raise ValueError(f"metadata key {key!r}: use a lowercase header name (letters, digits, - _ .)")
    if key in _SDK_KEYS or key.startswith("grpc-") or key.endswith("-bin"):
        raise ValueError(f"metadata key {key!r}: reserved (the SDK's own, gRPC's or binary)")
    if not (
        isinstance(value, str)
        and value.isascii()
        and value.isprintable()
        and len(value) <= MAX_METADATA_VALUE
    ):
        raise ValueError(
            f"metadata {key}: the value must be printable ASCII, at most {MAX_METADATA_VALUE} characters"
        )
    return key, value


def outgoing(metadata: tuple[tuple[str, str], ...], user_token: str | None) -> tuple[tuple[str, str], ...]:
    """What a call sends: the client's ``metadata``, the user token, and the caller's own pairs
    (outgoing_metadata) in this context."""
    return (*with_user_token(metadata, user_token), *_OUTGOING.get())


def backoff(attempt: int, rng: random.Random | None = None) -> float:
    """Jittered exponential backoff: uniform in [c/4, c], c = min(cap, base * 2**attempt).
    The exponent stops growing long after the cap is reached: 2**1024 is no float, and a long
    outage does reach that many attempts."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** min(attempt, 32)))
    return (rng or random).uniform(ceiling / 4, ceiling)


def retry_pause(attempt: int, remaining: float) -> float | None:
    """The pause before retry ``attempt`` with ``remaining`` seconds to the deadline: the
    jittered backoff, cut short so that one last try still fits; None when none fits."""
    if remaining <= LAST_TRY_SECONDS:
        return None
    return min(backoff(attempt), remaining - LAST_TRY_SECONDS)


def closed_error(method: str) -> Cancelled:
    """What a call made on, or interrupted by closing, its client raises."""
    return Cancelled(f"{method}: the client is closed")


def retryable(method: str, error: BrokerError) -> bool:
    """UNAVAILABLE is retried; nothing else. Complete and Deny only when the broker never
    answered (no ErrorInfo): a broker-side failure may already have used the flow."""
    if not isinstance(error, Unavailable):
        return False
    return method not in ONE_SHOT or type(error) is Unavailable


def resolve_request(
    user_id: str,
    upstream: str,
    min_valid_seconds: int,
    required_scopes: Collection[str],
    subject_token: str | None,
    rejected_access_token: str | None,
) -> pb.ResolveRequest:
    return pb.ResolveRequest(
        user_id=user_id,
        upstream=upstream,
        min_valid_seconds=min_valid_seconds,
        required_scopes=list(required_scopes),
        subject_token=subject_token or "",
        rejected_access_token=rejected_access_token or "",
    )


def watch_request(
    user_id: str | None, upstreams: Collection[str], after_sequence: int | None
) -> pb.WatchConnectionsRequest:
    request = pb.WatchConnectionsRequest(user_id=user_id or "", upstreams=list(upstreams))
    if after_sequence is not None:
        request.after_sequence = after_sequence
    return request


def complete_request(
    state: str, code: str, user_id: str, iss: str, callback_params: Mapping[str, str] | None
) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        state=state, code=code, user_id=user_id, iss=iss, callback_params=dict(callback_params or {})
    )


def same_origin(url: str, other: str) -> bool:
    """Whether two URLs share scheme, host and port (RFC 6454); never for one that does not parse."""
    try:
        a, b = urlsplit(url), urlsplit(other)
        a_port, b_port = a.port, b.port
    except ValueError:
        return False
    scheme = a.scheme.lower()
    return (
        scheme == b.scheme.lower()
        and a.hostname == b.hostname
        and (a_port or DEFAULT_PORTS.get(scheme)) == (b_port or DEFAULT_PORTS.get(scheme))
    )
