"""RFC 7523 section 2.2: client authentication with a JWT (``private_key_jwt`` in OpenID
Connect Core 1.0 section 9), signed by the broker or read from a file someone else keeps fresh.

The request carries ``client_assertion_type`` (section 2.2) and ``client_assertion``. A signed
assertion's claims (section 3; OIDC Core section 9): ``iss`` and ``sub`` are the client id, ``aud``
the token endpoint URL (what Entra requires and every server accepts), a random ``jti``, ``iat``
and ``nbf`` now, and ``exp`` two minutes on, so a copy is useless soon after. An assertion file
(a Kubernetes projected service account token, for workload identity federation) is read on
every request, so the kubelet's rotation is followed without a restart.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

from joserfc import jwt

from broker.crypto.signing_key import SigningKey
from broker.errors import ClientAssertionUnavailable

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME_SECONDS = 120
MAX_ASSERTION_BYTES = 64 * 1024
# A JWS in compact serialization (RFC 7515 section 7.1): three base64url parts.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def signed_assertion(
    key: SigningKey, client_id: str, audience: str, *, now: float | None = None, jti: str | None = None
) -> str:
    """A fresh client assertion signed with ``key``."""
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": jti or secrets.token_urlsafe(24),
        "iat": issued,
        "nbf": issued,
        "exp": issued + ASSERTION_LIFETIME_SECONDS,
    }
    header: dict[str, str] = {"alg": key.alg, "typ": "JWT"}
    if key.kid:
        header["kid"] = key.kid
    if key.x5t and key.x5t_s256:
        header["x5t"], header["x5t#S256"] = key.x5t, key.x5t_s256
    return jwt.encode(header, claims, key.key, algorithms=[key.alg])


def file_assertion(path: Path) -> str:
    """The JWT in ``path`` now; ClientAssertionUnavailable (naming the setting, never the
    content) when it is missing, unreadable, empty or not a compact JWS."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_ASSERTION_BYTES + 1)
    except FileNotFoundError:
        raise ClientAssertionUnavailable("client_assertion_file: the file does not exist") from None
    except OSError as exc:
        raise ClientAssertionUnavailable(
            f"client_assertion_file: cannot read the file ({exc.strerror or type(exc).__name__})"
        ) from None
    text = data.strip().decode("ascii", errors="replace")
    if not text:
        raise ClientAssertionUnavailable("client_assertion_file: the file is empty")
    if len(data) > MAX_ASSERTION_BYTES or not _COMPACT_JWS.fullmatch(text):
        raise ClientAssertionUnavailable("client_assertion_file: the file does not hold a JWT")
    return text
