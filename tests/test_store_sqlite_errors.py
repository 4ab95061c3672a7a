"""SQLite failures reach callers as StoreError (STORE_UNAVAILABLE, retryable), never as a raw
sqlite3 exception (an INTERNAL error), whichever statement or connection step fails; and the
store recovers once the file can be opened again.

Each worker thread opens its own connection on first use, so a connection is opened long after
start (a new worker thread under load): that step must fail as cleanly as a statement."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from broker.errors import StoreError
from broker.store.base import CredentialRow
from broker.store.sqlite import SqliteStore

KEY = "gh_0011223344556677"


def _row(user: str) -> CredentialRow:
    return CredentialRow(
        user, KEY, "Bearer", ("repo",), 2e9, "connect_flow", "connected", 0, "k1", b"sealed", 1e9, 1e9
    )


def _in_new_thread(call: object) -> object:
    """``call()`` in a thread of its own (so on a connection opened now): its result or error."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())  # type: ignore[operator]
        except BaseException as exc:  # the test inspects whatever came out
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    return outcome[0]


@pytest.mark.parametrize("call", ["write", "read"])
def test_a_connection_that_cannot_be_opened_is_a_store_error(tmp_path: Path, call: str) -> None:
    store = SqliteStore(tmp_path / "data" / "broker.db")
    try:
        store.save_credential(_row("alice"), None)
        # The file cannot be opened any more (its volume went away, the process is out of file
        # descriptors): connections already open still work, a new one fails.
        os.rename(tmp_path / "data", tmp_path / "gone")

        def act() -> object:
            if call == "write":
                return store.save_credential(_row("bob"), None)
            return store.get_credential("alice", KEY)

        failed = _in_new_thread(act)
        assert isinstance(failed, StoreError), repr(failed)
        os.rename(tmp_path / "gone", tmp_path / "data")
        # Back: a new thread opens its connection and is answered.
        answered = _in_new_thread(act)
        assert not isinstance(answered, BaseException), repr(answered)
    finally:
        store.close()
