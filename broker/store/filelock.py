"""Cross-process refresh locks for the SQLite backend: POSIX byte-range locks on a side file.

Every process sharing a SQLite file (``serve --workers N``, or a second broker on the same
volume) opens ``<db>.refresh-lock``; the lock for (user, upstream) is one byte at an offset
derived from a hash of the pair. POSIX record locks belong to the process, so threads of one
process do not exclude each other: within a process the service's single flight already
coalesces refreshes of one credential, and this lock adds the exclusion between processes.
Two pairs whose hashes collide only wait for each other, which is harmless.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from pathlib import Path

from broker.errors import StoreError

_SLOTS = 1 << 30
_POLL_SECONDS = 0.01


def lock_offset(user_id: str, upstream_key: str) -> int:
    digest = hashlib.sha256(f"{user_id}\x00{upstream_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _SLOTS


class _HeldRange:
    def __init__(self, owner: FileRefreshLocks, offset: int) -> None:
        self._owner = owner
        self._offset = offset
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner.unlock(self._offset)


class FileRefreshLocks:
    """One open lock file; ``acquire`` polls a non-blocking lock until a deadline."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        # Counts per offset held by this process: unlocking a range releases it for the whole
        # process, so only the last holder in this process unlocks.
        self._held: dict[int, int] = {}
        self._mutex = threading.Lock()

    def acquire(self, user_id: str, upstream_key: str, timeout: float) -> _HeldRange | None:
        offset = lock_offset(user_id, upstream_key)
        deadline = time.monotonic() + timeout
        while True:
            with self._mutex:
                if self._held.get(offset):
                    self._held[offset] += 1
                    return _HeldRange(self, offset)
                try:
                    fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
                except (BlockingIOError, PermissionError):
                    pass
                except OSError as exc:
                    raise StoreError(f"refresh lock failed: {exc.strerror}") from exc
                else:
                    self._held[offset] = 1
                    return _HeldRange(self, offset)
            if time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_SECONDS)

    def unlock(self, offset: int) -> None:
        with self._mutex:
            count = self._held.get(offset, 0) - 1
            if count > 0:
                self._held[offset] = count
                return
            self._held.pop(offset, None)
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)
            except OSError as exc:
                raise StoreError(f"refresh lock release failed: {exc.strerror}") from exc

    def close(self) -> None:
        os.close(self._fd)
