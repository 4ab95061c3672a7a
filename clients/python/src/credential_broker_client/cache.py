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
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

from credential_broker_client.models import ConnectionEvent, Credential

#: The floor on how long a cached credential must stay valid to be served.
MIN_VALID_SECONDS = 30
#: Event kinds that leave a cached token alone (the old one still works).
KEEP_ON = frozenset({"REFRESH_FAILED"})
DEFAULT_MAX_ENTRIES = 10_000

Key = tuple[str, str]


@dataclass(frozen=True)
class Ticket:
    """Where the cache stood when an RPC was sent."""

    epoch: int
    generation: int


class CredentialCache:
    """A bounded LRU of credentials by (user, upstream), safe to share between threads."""

    def __init__(
        self, max_entries: int = DEFAULT_MAX_ENTRIES, clock: Callable[[], float] = time.time
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._clock = clock
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
            self._entries[key] = (credential, expires)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                evicted, _ = self._entries.popitem(last=False)
                self._generations.pop(evicted, None)
            return True

    def invalidate(self, key: Key) -> None:
        """Drop one (user, upstream) and make tickets taken before now stale."""
        with self._lock:
            self._entries.pop(key, None)
            self._generations[key] = self._generations.get(key, 0) + 1
            if len(self._generations) > 4 * self._max:
                # Forget old generations; bumping the epoch keeps outstanding tickets stale.
                self._generations.clear()
                self._epoch += 1

    def apply(self, event: ConnectionEvent) -> None:
        """A WatchConnections event: drop the entry when the event can change its token."""
        if event.kind not in KEEP_ON:
            self.invalidate((event.user_id, event.upstream))

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
