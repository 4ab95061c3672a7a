"""The cache's race rules, driven directly in the order a slow RPC and the watch stream can
interleave (the network paths around them are in test_python_cache.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from credential_broker_client.cache import CredentialCache
from credential_broker_client.models import ConnectionEvent, Credential


def _credential(token: str) -> Credential:
    expires = datetime.now(UTC) + timedelta(hours=1)
    return Credential(token, "Bearer", "Authorization", f"Bearer {token}", expires, (), "connect", {})


def _event(kind: str, user: str) -> ConnectionEvent:
    return ConnectionEvent(1, user, "github", kind, "connected", "", None)


def test_an_eviction_does_not_revive_an_answer_an_event_made_stale() -> None:
    """A resolve in flight (its ticket taken) is overtaken by REFRESHED and a newer answer; the
    key is then evicted by other traffic. The slow answer must still be refused."""
    cache = CredentialCache(max_entries=1, settle_seconds=0)
    cache.set_live(True)
    alice, bob = ("alice", "github"), ("bob", "github")
    slow = cache.ticket(alice)  # R1 sent; the broker answers with the old token, slowly
    cache.apply(_event("REFRESHED", "alice"))
    assert cache.put(alice, _credential("new"), cache.ticket(alice))
    assert cache.put(bob, _credential("bob"), cache.ticket(bob))  # evicts alice
    assert not cache.put(alice, _credential("old"), slow)
    assert cache.get(alice, 0, ()) is None
