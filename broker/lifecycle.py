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
#: The longest wait a server's Retry-After can impose: a hostile or broken server cannot park a
#: credential for years.
RETRY_AFTER_CAP_SECONDS = 3600.0
#: A honoured Retry-After is stretched by up to this fraction, so the credentials a server
#: rate-limited together do not all come back in the same second and trip the limit again.
RETRY_AFTER_SPREAD = 0.1


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
        if text.startswith("certificate not trusted"):
            return "certificate_not_trusted"
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


def retry_wait(error: BrokerError, consecutive_failures: int, rng: random.Random | None = None) -> float:
    """How long a transient refresh failure waits before the next attempt: the backoff, but at
    least what the server's Retry-After asked for (a 429 or 503; RFC 9110 section 10.2.3),
    stretched by up to RETRY_AFTER_SPREAD and capped at RETRY_AFTER_CAP_SECONDS."""
    wait = backoff_seconds(consecutive_failures, rng)
    asked = getattr(error, "retry_after", None)
    if isinstance(asked, float | int) and asked > 0:
        spread = asked * (rng or _RNG).uniform(1.0, 1.0 + RETRY_AFTER_SPREAD)
        wait = max(wait, min(spread, RETRY_AFTER_CAP_SECONDS))
    return wait


_RNG = random.Random()  # noqa: S311 - jitter, not a secret
