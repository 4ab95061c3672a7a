"""The browser binding of hosted connect: a random secret in a cookie, its hash with the flow.

One browser may have several flows open at once (two tabs, two upstreams), so the cookie holds
the secrets of up to :data:`MAX_SECRETS` flows, newest last, joined by ``.``; the callback of a
flow looks for the one secret whose hash the flow stores, and removes it.
"""

from __future__ import annotations

import re
import secrets

from broker.vault import reference_hash

#: Secrets (flows started in this browser and not yet called back) kept in the cookie.
MAX_SECRETS = 4
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")
_REFERENCE = re.compile(r"[A-Za-z0-9_-]{43}")


def new_secret() -> str:
    """32 random bytes, base64url (43 characters)."""
    return secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    """What the store keeps of a browser's secret."""
    return reference_hash(secret)


def is_reference(value: str) -> bool:
    """Whether ``value`` has the shape of a /start reference (checked before any lookup)."""
    return bool(_REFERENCE.fullmatch(value))


def cookie_secrets(value: str | None) -> list[str]:
    """The well-formed secrets of a cookie value, newest last, at most MAX_SECRETS."""
    if not value or len(value) > 64 * MAX_SECRETS:
        return []
    return [part for part in value.split(".") if _SECRET.fullmatch(part)][-MAX_SECRETS:]


def cookie_value(secrets_: list[str]) -> str:
    return ".".join(secrets_[-MAX_SECRETS:])
