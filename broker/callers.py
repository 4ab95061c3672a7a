"""Who is calling and what it may do: pure rules, no gRPC.

A call arrives with a transport kind (unix socket or TCP), its metadata and, on mutual TLS,
the identities in the client certificate. ``CallerPolicy`` turns that into a ``Caller`` or
one of the caller errors (MissingRequestHeader, CallerUnauthenticated, CallerNotPermitted).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import itertools
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from broker import validation
from broker.config import BrokerConfig, CallerConfig
from broker.errors import CallerNotPermitted, CallerUnauthenticated, ConfigError, MissingRequestHeader

REQUEST_HEADER = "x-credential-broker-request"
CALLER_TOKEN_HEADER = "x-credential-broker-caller-token"
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128
ANONYMOUS = "anonymous"


def token_hash(token: str) -> str:
    """The form a caller token is kept in the config: lowercase hex SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(slots=True)  # not frozen: built on every call, and frozen costs more
class Caller:
    """An identified caller and its rules (None: no rules, everything allowed)."""

    name: str
    rules: CallerConfig | None = None

    def may_call(self, method: str) -> bool:
        return self.rules is None or "*" in self.rules.methods or method in self.rules.methods

    def may_use(self, upstream: str) -> bool:
        return self.rules is None or "*" in self.rules.upstreams or upstream in self.rules.upstreams


@dataclass(slots=True)  # not frozen: built on every call, and frozen costs more
class CallContext:
    """What the audit trail knows about the call in progress."""

    request_id: str
    caller: str
    method: str
    who: Caller | None = None


current_call: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "credential_broker_call", default=None
)


_ANONYMOUS = Caller(ANONYMOUS)

# Generated request ids: a random per-process prefix and a counter. They need to be unique, not
# secret, and a counter costs nothing on every call.
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count(1)


def request_id(metadata: Mapping[str, str]) -> str:
    """The caller's x-request-id when it is sane printable text, else a fresh unique id."""
    given = metadata.get(REQUEST_ID_HEADER, "")
    if given and len(given) <= MAX_REQUEST_ID and given.isascii() and given.isprintable():
        return given
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


class CallerPolicy:
    """The configured caller rules.

    - ``require_request_header``: "tcp" (default), "always" or "never".
    - With no ``callers`` configured every caller is allowed (as ``anonymous``, or by its
      certificate identity on mutual TLS).
    - With callers configured a call must carry a known token or a known certificate identity.
    """

    def __init__(self, config: BrokerConfig, known_methods: Iterable[str]) -> None:
        self._header = config.require_request_header
        self._callers = config.callers
        self._by_identity = {i: c for c in config.callers for i in c.cert_identities}
        self._by_token = [(c.token_sha256, c) for c in config.callers if c.token_sha256 is not None]
        known = set(known_methods)
        for index, caller in enumerate(config.callers):
            for method in caller.methods:
                if method != "*" and method not in known:
                    raise ConfigError(f"callers[{index}].methods: {method!r} is not an RPC of the service")

    def identify(
        self,
        *,
        over_tcp: Callable[[], bool],
        metadata: Mapping[str, str],
        cert_identities: Sequence[str],
        needs_header: bool = True,
    ) -> Caller:
        """The caller of a call, or raise MissingRequestHeader / CallerUnauthenticated /
        CallerNotPermitted (a valid certificate that is no configured caller).

        ``over_tcp`` says whether the call came over TCP; asked only when the request header
        is missing and the rule depends on the transport."""
        if (
            needs_header
            and metadata.get(REQUEST_HEADER, "").lower() != "true"
            and (self._header == "always" or (self._header == "tcp" and over_tcp()))
        ):
            raise MissingRequestHeader(
                f"metadata {REQUEST_HEADER}: true is required on this listener (an SSRF guard); "
                f"e.g. grpcurl -H '{REQUEST_HEADER}: true'"
            )
        token = metadata.get(CALLER_TOKEN_HEADER) or None
        if token is not None and self._by_token:
            digest = token_hash(token)
            for expected, caller in self._by_token:
                if hmac.compare_digest(digest, expected):
                    return Caller(caller.name, caller)
            raise CallerUnauthenticated("the caller token is not valid")
        for identity in cert_identities:
            found = self._by_identity.get(identity)
            if found is not None:
                return Caller(found.name, found)
        if not self._callers:
            return Caller(cert_identities[0]) if cert_identities else _ANONYMOUS
        if cert_identities:
            raise CallerNotPermitted("the client certificate's identity is not an allowed caller")
        raise CallerUnauthenticated(
            f"a caller token (metadata {CALLER_TOKEN_HEADER}) or client certificate is required"
        )

    @staticmethod
    def authorize(caller: Caller, method: str, upstream: str | None) -> None:
        """Raise CallerNotPermitted when the caller's rules exclude the RPC or the upstream
        (InvalidArgument when ``upstream`` is not an upstream name at all)."""
        if not caller.may_call(method):
            raise CallerNotPermitted(f"caller {caller.name!r} may not call {method}")
        if upstream and not caller.may_use(upstream):
            # Checked before the rules run and before the service validates the request, so a
            # value that is no upstream name (a megabyte, a control character, a pasted token)
            # is INVALID_ARGUMENT naming the field, never echoed in the refusal.
            validation.upstream(upstream)
            raise CallerNotPermitted(f"caller {caller.name!r} may not use upstream {upstream!r}")
