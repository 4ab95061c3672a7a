"""The broker's error tree. Every error has a stable ``code`` and a message safe to show callers.

Messages never contain a token, code, state, verifier, client secret, key or an authorization
server's ``error_description``. Foreign exceptions (httpx, sqlite3, cryptography) are
translated into this tree once, at their boundary, with ``raise ... from exc``.

    BrokerError
    ├── InvalidArgument            INVALID_ARGUMENT     a field is malformed or too large
    │   └── IssuerMismatch             the callback's iss is missing or not the issuer (RFC 9207)
    ├── Unauthenticated            UNAUTHENTICATED      no user id (or, later, no valid user token)
    │   ├── SubjectTokenRequired       an exchange upstream with no subject token and no usable credential
    │   ├── UserTokenInvalid           the user's token failed verification (reason in metadata)
    │   ├── MissingRequestHeader       no x-credential-broker-request: true (SSRF guard)
    │   └── CallerUnauthenticated      no or wrong caller token / certificate
    ├── PermissionDenied           PERMISSION_DENIED    the caller may not act for that user
    │   ├── UserMismatch               user_id names someone other than the verified token's user
    │   ├── PolicyDenied               the Resolve policy refused (the rule's reason)
    │   └── CallerNotPermitted         the caller's rules exclude this RPC or upstream
    ├── UnknownUpstream            NOT_FOUND            no upstream of that name is configured
    ├── FlowNotFound               FAILED_PRECONDITION  state unknown, expired or already used
    ├── TooManyPendingFlows        RESOURCE_EXHAUSTED   max_pending_flows_total flows are pending
    ├── WatcherTooSlow             RESOURCE_EXHAUSTED   a WatchConnections stream fell too far behind
    ├── WatchResyncRequired        OUT_OF_RANGE         after_sequence is below the retained events
    ├── ConnectRequired            FAILED_PRECONDITION  carries a ready authorization URL
    │   ├── NotConnected               the user never connected this upstream
    │   ├── ReconnectRequired          the stored credential can no longer be refreshed
    │   └── InsufficientScope          the grant lacks required_scopes (broker/scopes.py)
    ├── TokenRequestRejected       FAILED_PRECONDITION  the token endpoint refused (4xx)
    ├── UpstreamUnavailable        UNAVAILABLE          unreachable, timed out, 5xx, or junk answer
    │   ├── IdentityProviderUnavailable  the JWKS or discovery document could not be fetched
    │   ├── UnsupportedTokenType         the token endpoint issued a type the broker can't send
    │   └── ClientAssertionUnavailable   client_assertion_file is missing, empty or not a JWT
    ├── NotImplementedMode         UNIMPLEMENTED        an auth mode this build cannot run yet
    ├── ConfigError                (start-up only)      names the offending config field
    ├── KeyringError               (start-up only)      missing or unreadable keyring
    │   ├── RootKeyUnavailable         the root key source (KMS, HSM) could not be reached
    │   └── RootKeyRefused             the root key does not unwrap a KEK (wrong key, tampered file)
    ├── KeyRotationRefused         (CLI only)           a `keys` step that would strand records
    ├── DecryptionError            INTERNAL             one uninformative error for any bad record
    └── StoreError                 UNAVAILABLE          the store could not be read or written
"""

from __future__ import annotations

from collections.abc import Mapping


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""

    code = "INTERNAL"

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(BrokerError):
    code = "INVALID_ARGUMENT"


class Unauthenticated(BrokerError):
    code = "UNAUTHENTICATED"


class SubjectTokenRequired(Unauthenticated):
    code = "SUBJECT_TOKEN_REQUIRED"


class UserTokenInvalid(Unauthenticated):
    """The user's token did not verify. ``problem`` is a short stable word; never the token."""

    code = "USER_TOKEN_INVALID"

    def __init__(self, problem: str, message: str) -> None:
        super().__init__(f"the user token is not valid: {message}", metadata={"problem": problem})
        self.problem = problem


class PermissionDenied(BrokerError):
    code = "PERMISSION_DENIED"


class UserMismatch(PermissionDenied):
    code = "USER_MISMATCH"


class PolicyDenied(PermissionDenied):
    code = "POLICY_DENIED"


class UnknownUpstream(BrokerError):
    code = "UPSTREAM_NOT_FOUND"


class FlowNotFound(BrokerError):
    code = "FLOW_NOT_FOUND"


class ConnectRequired(BrokerError):
    """The user must (re)connect: the error carries the upstream and an authorization URL."""

    code = "CONNECT_REQUIRED"

    def __init__(self, message: str, *, upstream: str, authorization_url: str) -> None:
        # No URL when the upstream needs connection params the broker does not know yet.
        url = {"authorization_url": authorization_url} if authorization_url else {}
        super().__init__(message, metadata={"upstream": upstream, **url})


class NotConnected(ConnectRequired):
    code = "NOT_CONNECTED"


class ReconnectRequired(ConnectRequired):
    code = "RECONNECT_REQUIRED"


class TokenRequestRejected(BrokerError):
    """The token endpoint answered 4xx. Only the status and an allow-listed error code survive."""

    code = "TOKEN_REQUEST_REJECTED"

    def __init__(self, status: int, oauth_error: str | None, *, reconnect: bool = False) -> None:
        detail = f", error {oauth_error}" if oauth_error else ""
        super().__init__(
            f"the token endpoint refused the request (HTTP {status}{detail})",
            metadata={
                "http_status": str(status),
                **({"oauth_error": oauth_error} if oauth_error else {}),
            },
        )
        self.status = status
        self.oauth_error = oauth_error
        #: The provider's code says the grant is dead (an upstream's ``reconnect_errors``).
        self.reconnect = reconnect

    #: Seconds a 429's ``Retry-After`` header asked the client to wait (RFC 9110 section
    #: 10.2.3), set by the token client; the refresh backoff honours it. Never in the message
    #: or metadata: the gRPC answer is the same with or without it.
    retry_after: float | None = None


class UpstreamUnavailable(BrokerError):
    code = "UPSTREAM_UNAVAILABLE"

    #: Seconds a 503's ``Retry-After`` header asked the client to wait, as for
    #: TokenRequestRejected.retry_after.
    retry_after: float | None = None


class IdentityProviderUnavailable(UpstreamUnavailable):
    code = "IDENTITY_PROVIDER_UNAVAILABLE"


class NotImplementedMode(BrokerError):
    code = "MODE_NOT_IMPLEMENTED"


class ConfigError(BrokerError):
    code = "CONFIG_INVALID"


class KeyringError(BrokerError):
    code = "KEYRING_INVALID"


class RootKeyUnavailable(KeyringError):
    """The root key source of a wrapped keyring (KMS, HSM) could not be reached: worth a retry."""

    code = "ROOT_KEY_UNAVAILABLE"


class RootKeyRefused(KeyringError):
    """The root key does not unwrap a wrapped KEK: another root key, or a changed file."""

    code = "ROOT_KEY_REFUSED"


class KeyRotationRefused(BrokerError):
    """A ``keys`` command refused a step that would leave records no key can open."""

    code = "KEY_ROTATION_REFUSED"


class DecryptionError(BrokerError):
    """Any record that fails to open. Deliberately says nothing about why."""

    code = "DECRYPTION_FAILED"

    def __init__(self) -> None:
        super().__init__("a stored record could not be decrypted")


class StoreError(BrokerError):
    code = "STORE_UNAVAILABLE"


class IssuerMismatch(InvalidArgument):
    code = "ISSUER_MISMATCH"


class MissingRequestHeader(Unauthenticated):
    code = "MISSING_REQUEST_HEADER"


class CallerUnauthenticated(Unauthenticated):
    code = "CALLER_UNAUTHENTICATED"


class CallerNotPermitted(PermissionDenied):
    code = "CALLER_NOT_PERMITTED"


class UnsupportedTokenType(UpstreamUnavailable):
    """The token endpoint issued a token of a type the broker cannot use (RFC 6749 section 7.1):
    it only ever sends tokens as Bearer (RFC 6750), so a DPoP or MAC token is refused, never sent."""

    code = "UNSUPPORTED_TOKEN_TYPE"


class ClientAssertionUnavailable(UpstreamUnavailable):
    """The JWT an upstream's ``client_assertion_file`` should hold (a projected service account
    token) could not be used for this request: the file is missing, empty, unreadable or not a
    JWT. Nothing is sent; the next request reads the file again. The file's content is never shown."""

    code = "CLIENT_ASSERTION_UNAVAILABLE"


class TooManyPendingFlows(BrokerError):
    """A new connect flow was refused: ``max_pending_flows_total`` flows (all users) are pending."""

    code = "TOO_MANY_PENDING_FLOWS"


class WatcherTooSlow(BrokerError):
    """A WatchConnections stream was cut off: its reader fell so far behind that the events
    waiting for it reached the per-watcher bound. Reconnect with the last sequence seen."""

    code = "WATCH_TOO_SLOW"


class WatchResyncRequired(BrokerError):
    """A WatchConnections request asked to resume after a sequence older than the events still
    kept (``events.retention_seconds`` / ``max_events``): some it missed are gone. The watcher
    must read the current state with ListConnections and watch again without after_sequence."""

    code = "WATCH_RESYNC_REQUIRED"
