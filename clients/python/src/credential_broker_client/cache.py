"""The push-invalidated credential cache behind ``cache=True``.

An entry answers ``resolve(user, upstream)`` while the credential stays valid for at least
``max(min_valid_seconds, MIN_VALID_SECONDS)`` more seconds and holds every required scope. The
client's WatchConnections stream drops entries: one (user, upstream) on an event that can change
its token, everything when the stream breaks. The cache serves nothing while no stream is live
(so a token the broker replaced while nobody was listening is never served).

Races: an answer is admitted only with the ticket taken before its RPC was sent. Any event for
that (user, upstream), or a stream break, in between makes the ticket stale and the answer is
returned to its caller but not kept: the cache never keeps a token older than an invalidation
it has seen.

The broker's own read cache (``read_cache_seconds``, 1 s by default) may still answer with the
old token for a moment after another replica changed it, and the event can arrive first. So an
event also leaves a trace: for ``settle_seconds`` no answer for that (user, upstream) is kept,
and for ``TOMBSTONE_SECONDS`` an answer carrying the token the event replaced is never kept (it
is known by a digest, not kept itself).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

from credential_broker_client.models import ConnectionEvent, Credential

#: The floor on how long a cached credential must stay valid to be served.
MIN_VALID_SECONDS = 30
#: Event kinds that drop the cached entry: the broker now holds another token (or none). A
#: failed refresh (REFRESH_FAILED) leaves the old token, still valid, in place.
DROP_ON = frozenset({"CONNECTED", "REFRESHED", "RECOVERED", "NEEDS_REAUTH", "DISCONNECTED", "SCOPES_CHANGED"})
DEFAULT_MAX_ENTRIES = 10_000
#: After an event, answers for that (user, upstream) are not kept this long (the broker's read
#: cache may still hold the old token; keep it above the broker's ``read_cache_seconds``).
DEFAULT_SETTLE_SECONDS = 2.0
#: How long a replaced token's digest is remembered (the broker's read cache is at most 60 s).
TOMBSTONE_SECONDS = 65.0

Key = tuple[str, str]


@dataclass(frozen=True)
class Ticket:
    """Where the cache stood when an RPC was sent."""

    epoch: int
    generation: int


class CredentialCache:
    """A bounded LRU of credentials by (user, upstream), safe to share between threads."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._clock = clock
        self._settle = settle_seconds
        # (user, upstream) -> monotonic instant before which answers are not kept
        self._settling: dict[Key, float] = {}
        # (user, upstream) -> (digest of a replaced token, monotonic expiry)
        self._tombstones: dict[Key, tuple[bytes, float]] = {}
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, tuple[Credential, float | None]] = OrderedDict()
        self._generations: dict[Key, int] = {}
        self._epoch = 0
        self._live = False
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def live(self) -> bool:
        return self._live

    def get(self, key: Key, min_valid_seconds: int, required_scopes: Collection[str]) -> Credential | None:
        """The cached credential when it satisfies the call, else None."""
        with self._lock:
            found = self._entries.get(key) if self._live else None
            if found is not None:
                credential, expires = found
                floor = max(min_valid_seconds, MIN_VALID_SECONDS)
                if (expires is None or expires - self._clock() >= floor) and (
                    not required_scopes or set(required_scopes).issubset(credential.scopes)
                ):
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return credential
            self.misses += 1
            return None

    def ticket(self, key: Key) -> Ticket:
        with self._lock:
            return Ticket(self._epoch, self._generations.get(key, 0))

    def put(self, key: Key, credential: Credential, ticket: Ticket) -> bool:
        """Keep an answer unless something invalidated ``key`` since ``ticket`` was taken."""
        expires = credential.expires_at.timestamp() if credential.expires_at is not None else None
        with self._lock:
            if (
                not self._live
                or ticket.epoch != self._epoch
                or ticket.generation != self._generations.get(key, 0)
            ):
                return False
            if key in self._settling or key in self._tombstones:
                now = time.monotonic()
                if self._settling.get(key, 0.0) > now:
                    return False
                self._settling.pop(key, None)
                tomb = self._tombstones.get(key)
                if tomb is not None and tomb[1] > now and tomb[0] == _digest(credential.access_token):
                    return False
            self._entries[key] = (credential, expires)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                # Its generation stays: a ticket taken before an event for it must stay stale.
                self._entries.popitem(last=False)
            return True

    def invalidate(self, key: Key, *, settle: bool = False, tombstone: bool = False) -> None:
        """Drop one (user, upstream) and make tickets taken before now stale. The change came
        from elsewhere (an event), so the broker may still answer with the old token for a
        moment: ``settle`` keeps no answer for a while; ``tombstone`` never keeps the token just
        dropped."""
        with self._lock:
            dropped = self._entries.pop(key, None)
            self._generations[key] = self._generations.get(key, 0) + 1
            if len(self._generations) > 4 * self._max:
                # Forget old generations; bumping the epoch keeps outstanding tickets stale.
                self._generations.clear()
                self._epoch += 1
            if settle or tombstone:
                now = time.monotonic()
                if len(self._settling) > 4 * self._max or len(self._tombstones) > 4 * self._max:
                    self._settling = {k: t for k, t in self._settling.items() if t > now}
                    self._tombstones = {k: t for k, t in self._tombstones.items() if t[1] > now}
                if settle:
                    self._settling[key] = now + self._settle
                if dropped is not None:
                    self._tombstones[key] = (_digest(dropped[0].access_token), now + TOMBSTONE_SECONDS)

    def apply(self, event: ConnectionEvent) -> None:
        """A WatchConnections event: drop the entry when the event can change its token."""
        if event.kind in DROP_ON or event.kind == "UNSPECIFIED":
            # A first connection replaced nothing the broker could still be serving.
            settle = event.kind != "CONNECTED"
            self.invalidate((event.user_id, event.upstream), settle=settle, tombstone=True)

    def set_live(self, live: bool) -> None:
        """The stream is (re)established, or it broke: either way everything cached goes."""
        with self._lock:
            self._entries.clear()
            self._generations.clear()
            self._epoch += 1
            self._live = live

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._epoch += 1


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()[:16]
