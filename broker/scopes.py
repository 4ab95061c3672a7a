"""Incremental scopes: a Resolve may name the scopes it needs (``required_scopes``).

When the stored grant lacks some of them, the answer is :class:`InsufficientScope`
(FAILED_PRECONDITION, reason ``INSUFFICIENT_SCOPE``) carrying ``missing_scopes`` (space
separated) and an ``authorization_url`` whose flow asks for the union of the granted and the
required scopes. The flow is found or started exactly as for NOT_CONNECTED (reused while it has
half its lifetime left; see ``BrokerService._flow_for_answer``), keyed also by the scope set it
asks for, which is sealed with its verifier. Completing it replaces the credential.

Which event a completed flow writes (:func:`completion_event`): one event per change, so when a
connect flow replaces a stored credential whose scope set differs from the new grant's, the
event is SCOPES_CHANGED (status ``connected``) *instead of* CONNECTED; otherwise CONNECTED. A
watcher treats SCOPES_CHANGED as "connected, with other scopes than before".

The caller names the scopes, so any scope may be asked for (the provider decides what it
grants), but each must be an RFC 6749 section 3.3 scope-token (printable ASCII without space,
``"`` or ``\\``), must not hold the upstream's ``scope_separator``, and there are at most
:data:`MAX_REQUIRED_SCOPES` of at most :data:`MAX_SCOPE_LENGTH` characters: anything else is
INVALID_ARGUMENT before anything is read or stored. Scope comparison is exact (section 3.3:
case-sensitive strings, order irrelevant).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence

from broker.errors import ConnectRequired, InvalidArgument
from broker.events import EventKind
from broker.store.base import ConnectionEventRow

MAX_REQUIRED_SCOPES = 64
MAX_SCOPE_LENGTH = 256
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


class InsufficientScope(ConnectRequired):
    """The stored grant lacks scopes the caller requires: send the user to the URL, whose flow
    asks for the granted and the required scopes together."""

    code = "INSUFFICIENT_SCOPE"

    def __init__(self, upstream: str, authorization_url: str, missing: Sequence[str]) -> None:
        super().__init__(
            f"the credential for upstream {upstream!r} lacks {len(missing)} required scope(s) "
            "(missing_scopes); send the user to the authorization_url to grant them",
            upstream=upstream,
            authorization_url=authorization_url,
        )
        self.metadata["missing_scopes"] = " ".join(missing)
        self.missing = tuple(missing)


def check_required(scopes: Sequence[str], separator: str = " ") -> tuple[str, ...]:
    """The required scopes, checked, without repeats (first occurrence order)."""
    if len(scopes) > MAX_REQUIRED_SCOPES:
        raise InvalidArgument(f"required_scopes: at most {MAX_REQUIRED_SCOPES} scopes")
    out: dict[str, None] = {}
    for scope in scopes:
        if len(scope) > MAX_SCOPE_LENGTH:
            raise InvalidArgument(f"required_scopes: each scope at most {MAX_SCOPE_LENGTH} characters")
        if not _SCOPE_TOKEN.fullmatch(scope):
            raise InvalidArgument(
                "required_scopes: each scope must be non-empty printable ASCII without space, "
                "double quote or backslash (RFC 6749 section 3.3)"
            )
        if separator != " " and separator in scope:
            raise InvalidArgument(
                f"required_scopes: a scope may not contain this upstream's scope separator {separator!r}"
            )
        out[scope] = None
    return tuple(out)


def missing(granted: Collection[str], required: Iterable[str]) -> tuple[str, ...]:
    """The required scopes not in ``granted``, in the order they were required."""
    have = set(granted)
    return tuple(s for s in required if s not in have)


def flow_scopes(
    configured: Sequence[str], granted: Sequence[str], required: Sequence[str]
) -> tuple[str, ...]:
    """The scopes a flow asks for: ``granted`` (the configured ones when nothing is granted yet)
    plus ``required``. Empty when that is exactly the configured set, so the flow is the plain
    one a NOT_CONNECTED answer would start (and either can reuse the other)."""
    base = granted or configured
    union = tuple(dict.fromkeys([*base, *required]))
    return () if set(union) == set(configured) else union


def completion_event(
    user_id: str,
    upstream_key: str,
    previous_scopes: Sequence[str] | None,
    scopes: Sequence[str],
    now: float,
) -> ConnectionEventRow:
    """The event a completed connect flow writes: SCOPES_CHANGED when it replaced a stored
    credential (``previous_scopes`` not None) with another scope set, else CONNECTED."""
    changed = previous_scopes is not None and set(previous_scopes) != set(scopes)
    kind = EventKind.SCOPES_CHANGED if changed else EventKind.CONNECTED
    return ConnectionEventRow(user_id, upstream_key, kind.value, "connected", None, now)
