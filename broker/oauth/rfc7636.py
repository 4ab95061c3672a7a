"""RFC 7636, Proof Key for Code Exchange (PKCE), S256 method only."""

from __future__ import annotations

import base64
import hashlib
import secrets


def b64url(raw: bytes) -> str:
    """base64url without padding (RFC 7636 Appendix A)."""
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def new_verifier() -> str:
    """A code_verifier from 32 random bytes: 43 characters of [A-Za-z0-9-_] (section 4.1)."""
    return b64url(secrets.token_bytes(32))


def new_state() -> str:
    """An opaque, unguessable state value (RFC 6749 section 10.12), 32 random bytes."""
    return b64url(secrets.token_bytes(32))


def challenge_s256(verifier: str) -> str:
    """code_challenge = BASE64URL(SHA256(ASCII(code_verifier))) (section 4.2)."""
    return b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def state_hash(state: str) -> str:
    """What the store keeps of a state: its SHA-256, hex. The state itself is never stored."""
    return hashlib.sha256(state.encode()).hexdigest()
