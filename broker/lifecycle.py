"""Credential lifecycle policy: which refresh failures are terminal, and when to try again.

    connected ──refresh claimed──> refreshing ──success──> connected
                                     │ transient (timeout, 5xx, refused, junk answer)
                                     ├──────────> error         (kept; retried with backoff)
                                     │ terminal (invalid_grant after the race check, invalid_client)
                                     └──────────> needs_reauth  (kept until the user reconnects)

Nothing is ever deleted because of an error: a reconnect overwrites the record.
"""

from __future__ import annotations

import random

from broker.errors import BrokerError, ClientAssertionUnavailable, TokenRequestRejected, UpstreamUnavailable

#: OAuth error codes after which the stored refresh token can never work again.
TERMINAL_OAUTH_ERRORS = frozenset({"invalid_grant", "invalid_client"})

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 300.0


def is_terminal(error: BrokerError) -> bool:
    """True when the user must reconnect (after the caller's own race check)."""
    return isinstance(error, TokenRequestRejected) and (
        error.oauth_error in TERMINAL_OAUTH_ERRORS or error.reconnect
    )


def error_class(error: BrokerError) -> str:
    """A short, secret-free class for the credential's ``last_error``."""
    if isinstance(error, TokenRequestRejected):
        return error.oauth_error or f"http_{error.status}"
    if isinstance(error, ClientAssertionUnavailable):
        return "client_assertion_unavailable"
    if isinstance(error, UpstreamUnavailable):
        text = error.message
        if "timed out" in text:
            return "timeout"
        if "HTTP 5" in text:
            return "http_5xx"
        if "could not reach" in text:
            return "unreachable"
        return "invalid_response"
    return error.code.lower()


def backoff_seconds(consecutive_failures: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: the n-th consecutive failure waits between half and all of
    min(cap, base * 2**(n-1)), so brokers that failed together do not retry together."""
    n = max(1, consecutive_failures)
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * float(1 << min(n - 1, 30)))
    return ceiling * (rng or _RNG).uniform(0.5, 1.0)


_RNG = random.Random()  # noqa: S311 - jitter, not a secret
