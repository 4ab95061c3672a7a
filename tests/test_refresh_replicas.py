"""Two ``broker serve`` replicas on one PostgreSQL store, 500 credentials due at once, and a
provider that revokes the whole grant when a rotated-out refresh token comes back: the background
refreshers of both replicas refresh every credential, each refresh token presented exactly once
(issue 14)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from pathlib import Path

import pytest

from broker.models import Credential, Secrets
from tests.brokerproc import ServerProcess, write_config
from tests.conftest import Broker

USERS = 500
pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def store_backend() -> str:
    return "postgres"


class _Replica(ServerProcess):
    """A replica given longer to start: two start at once on a loaded 2-core machine."""

    def _wait_serving(self, timeout: float = 60.0) -> str:
        return super()._wait_serving(timeout)


def _load_due(broker: Broker, count: int) -> dict[str, str]:
    """``count`` connected users whose tokens the authorization server really issued, all due
    now (the token expires in 30 s and was obtained an hour ago); refresh token -> user."""
    upstream = broker.app.config.upstreams[0]
    now = time.time()
    rows, tokens = [], {}
    for n in range(count):
        user = f"user{n:03d}"
        access, refresh = broker.auth.issue_grant(user, broker.client, "repo")
        credential = Credential(
            user, upstream.key, Secrets(access, refresh), "Bearer", ("repo",), now + 30, "connect_flow", now
        )
        row = broker.app.vault.seal_credential(credential, now - 3600)
        rows.append(dataclasses.replace(row, last_refresh_at=now - 3600))
        tokens[refresh] = user
    broker.app.store.bulk_insert_credentials(rows)  # type: ignore[attr-defined]
    return tokens


async def test_two_replicas_refresh_500_due_credentials_each_token_once(
    broker: Broker, tmp_path: Path
) -> None:
    auth = broker.auth
    assert auth.rotate_refresh_tokens and auth.revoke_grant_on_reuse  # a reuse would revoke the grant
    config = write_config(
        broker.document,
        tmp_path / "replicas.yaml",
        background_refresh={"enabled": True, "ahead_seconds": 60, "interval_seconds": 0.2},
    )
    servers = list(
        await asyncio.gather(
            *(asyncio.to_thread(_Replica, config, tmp_path / f"replica{n}.log") for n in range(2))
        )
    )
    try:
        seeded = await asyncio.to_thread(_load_due, broker, USERS)  # all due at once, both running
        deadline = time.monotonic() + 120
        while len(auth.token_requests("refresh_token")) < USERS:
            assert time.monotonic() < deadline, f"only {len(auth.token_requests('refresh_token'))} refreshed"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # five more ticks on each replica: nothing is refreshed twice
        presented = Counter(r.form["refresh_token"][0] for r in auth.token_requests("refresh_token"))
        assert len(presented) == USERS and set(presented) == set(seeded)
        assert max(presented.values()) == 1  # each refresh token exactly once
        done = time.time()
        rows = broker.rows("SELECT user_id, status, expires_at, generation FROM credentials")
        assert len(rows) == USERS
        assert all(r["status"] == "connected" for r in rows)
        assert all(r["expires_at"] > done + 3000 for r in rows)  # every one holds a new token
        for token in seeded:
            assert not auth.refresh_token_live(token)  # rotated out at the provider
    finally:
        for server in servers:
            server.stop()
    by_replica = [s.log_path.read_text(errors="replace").count(" refreshed user_id=") for s in servers]
    assert sum(by_replica) == USERS  # each one by a replica's background refresher
