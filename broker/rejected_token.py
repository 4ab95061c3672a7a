"""``ResolveRequest.rejected_access_token``: an app reports that the upstream refused a token.

Only a report naming the token the broker holds counts, compared in constant time, and a
credential refreshed (or connected) less than ``min_refresh_interval_seconds`` ago is not
refreshed again: an app that keeps reporting a token the upstream keeps refusing cannot turn
the broker into a refresh loop. The reported value is never logged, stored or echoed.
"""

from __future__ import annotations

import hashlib
import hmac


def is_stored_token(reported: str, stored: str) -> bool:
    """True when ``reported`` is exactly the stored access token. Both sides are hashed first,
    so the comparison takes the same time whatever the lengths and wherever they differ."""
    if not reported or not stored:
        return False
    return hmac.compare_digest(_digest(reported), _digest(stored))


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
