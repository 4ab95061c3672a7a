"""PostgreSQL specifics: schema versions, replicas sharing one database, the DSN config keys,
secrets kept out of messages, and surviving a database restart. (The refresh lease across
replicas is in tests/test_refresh_lease.py, on both backends.)"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import yaml

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.config import load_config
from broker.crypto import EnvelopeCipher
from broker.crypto.keyring import Keyring, new_key_entry
from broker.errors import ConfigError, StoreError
from broker.models import Credential, PendingFlow, Secrets
from broker.store.base import CRED_COLUMNS
from broker.store.postgres import SCHEMA_VERSION, PostgresStore
from broker.vault import CredentialVault
from tests.conftest import Broker, BrokerFactory, error_info
from tests.live import free_port
from tests.pgcluster import PgCluster, fresh_schema

KEY = "gh_0011223344556677"


def _cred(user: str = "alice", access: str = "at-1") -> Credential:
    return Credential(user, KEY, Secrets(access, "rt-1"), "Bearer", ("repo",), 2e9, "connect_flow", 1e9)


@pytest.fixture
def stores(pg_dsn: str):
    """Two stores on one database: two replicas."""
    a, b = PostgresStore(pg_dsn, pool_size=4), PostgresStore(pg_dsn, pool_size=4)
    yield a, b
    a.close()
    b.close()


def test_schema_version_table_and_newer_schema_refused(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn, pool_size=2)
    store.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM credential_broker_schema").fetchone() == (SCHEMA_VERSION,)
        kinds = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = 'credentials' AND table_schema = current_schema()"
            ).fetchall()
        )
        assert kinds["sealed"] == "bytea" and "last_refresh_at" in kinds and "failure_count" in kinds
        conn.execute("UPDATE credential_broker_schema SET version = 99")
    with pytest.raises(StoreError, match="newer than this broker"):
        PostgresStore(pg_dsn, pool_size=2)


def test_migration_2_keeps_version_1_records_openable(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows a version-1 broker wrote open after migration 2: the vault binds schema number 1,
    not the store's version, into the associated data (as the SQLite test checks)."""
    from broker.store import postgres as postgres_store

    with monkeypatch.context() as patch:
        patch.setattr(postgres_store, "SCHEMA_VERSION", 1)
        PostgresStore(pg_dsn, pool_size=2).close()  # a version-1 database

    class V1Store(PostgresStore):
        """Writes the way the version-1 broker did (no migration-2 columns)."""

        schema_version = 1

        def _migrate(self) -> None:
            pass

        def save_credential(self, row: Any, expected_generation: int | None) -> int | None:
            with self._write() as conn:
                conn.execute(
                    f"INSERT INTO credentials ({CRED_COLUMNS}) VALUES "
                    "(%s, %s, %s, %s, %s, %s, %s, 1, %s, %s, %s, %s, %s, %s, %s)",
                    (row.user_id, row.upstream_key, row.token_type, '["repo"]', row.expires_at,
                     row.obtained_via, row.status, row.kek_id, row.sealed, row.created_at,
                     row.updated_at, row.last_refresh_at, row.last_error, row.failure_count),
                )  # fmt: skip
            return 1

    cipher = EnvelopeCipher(Keyring([new_key_entry("primary")]))
    old = V1Store(pg_dsn, pool_size=2)
    CredentialVault(old, cipher).save(_cred(), None, 1e9)
    old.close()
    upgraded = PostgresStore(pg_dsn, pool_size=2)
    try:
        found = CredentialVault(upgraded, cipher).get("alice", KEY)
        assert found is not None and found[0].secrets.access_token == "at-1"
        assert found[1].next_attempt_at is None
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            assert conn.execute("SELECT version FROM credential_broker_schema").fetchone() == (
                SCHEMA_VERSION,
            )
    finally:
        upgraded.close()


def test_replicas_see_one_world_and_cas_is_atomic_across_them(stores: tuple[PostgresStore, ...]) -> None:
    cipher = EnvelopeCipher(Keyring([new_key_entry("primary")]))
    vaults = [CredentialVault(s, cipher) for s in stores]
    assert vaults[0].save(_cred(), None, 1e9) == 1
    vaults[0].add_flow(PendingFlow("h1", "alice", KEY, "verifier-1", 1.0, 1e10), 5, 1.0)
    flow = vaults[1].take_flow("h1")  # started through replica A, completed through B
    assert flow is not None and flow.verifier == "verifier-1"
    assert vaults[0].take_flow("h1") is None
    wins: list[int] = []

    def attempt(i: int) -> None:
        if vaults[i % 2].save(_cred(access=f"at-{i}"), 1, 1e9) is not None:
            wins.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    found = vaults[1].get("alice", KEY)
    assert found is not None and found[0].secrets.access_token == f"at-{wins[0]}"
    assert found[1].generation == 2


def test_unreachable_database_is_a_store_error_without_the_password() -> None:
    password = "pw-" + "x9" * 8
    dsn = f"host=127.0.0.1 port={free_port()} user=nobody password={password} connect_timeout=1"
    with pytest.raises(StoreError) as caught:
        PostgresStore(dsn, pool_size=1)
    assert password not in str(caught.value) and "port=" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# -- config ------------------------------------------------------------------------------------

BASE: dict[str, Any] = {"keyring": {"file": "k.json"}}


def test_dsn_from_value_file_env_and_separate_password(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text("host=db.internal dbname=broker user=broker\n")
    (tmp_path / "pw").write_text("s3cret\n")
    by_file = load_config(
        {**BASE, "store": {"backend": "postgres", "dsn_file": "dsn", "password_file": "pw", "pool_size": 7}},
        environ={},
        base_dir=tmp_path,
    )
    assert by_file.store.dsn is not None and by_file.store.pool_size == 7
    assert "password=s3cret" in by_file.store.dsn.get_secret_value()
    assert "s3cret" not in repr(by_file) and "s3cret" not in str(by_file.store)
    by_env = load_config(
        {**BASE, "store": {"backend": "postgres", "dsn_env": "PG_DSN"}},
        environ={"PG_DSN": "postgresql://u@h/db"},
        base_dir=tmp_path,
    )
    assert by_env.store.dsn is not None and by_env.store.dsn.get_secret_value() == "postgresql://u@h/db"


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ({"backend": "postgres"}, "store.dsn: backend postgres needs exactly one of"),
        ({"backend": "postgres", "dsn": "host=a", "dsn_env": "X"}, "exactly one of"),
        ({"backend": "postgres", "dsn_env": "MISSING"}, "store.dsn_env: environment variable MISSING"),
        ({"backend": "postgres", "dsn_file": "nope"}, "store.dsn_file: cannot read"),
        ({"backend": "postgres", "dsn": "host=a password=hush =bad"}, "not a valid PostgreSQL"),
        ({"dsn": "host=a"}, "store.dsn: only for backend postgres"),
        ({"backend": "mysql"}, "store.backend"),
        ({"backend": "postgres", "dsn": "host=a", "pool_size": 0}, "store.pool_size"),
    ],
)
def test_store_config_errors_name_the_field(tmp_path: Path, store: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config({**BASE, "store": store}, environ={}, base_dir=tmp_path)
    assert "hush" not in caught.value.message


def test_kubernetes_postgres_overlay_config_loads(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    document = yaml.safe_load((root / "deploy/kubernetes/overlays/postgres/broker-config.yaml").read_text())
    assert document["store"] == {"backend": "postgres", "dsn_file": "/etc/credential-broker/postgres/dsn"}
    (tmp_path / "dsn").write_text("host=pg dbname=broker")
    document["store"]["dsn_file"] = str(tmp_path / "dsn")
    config = load_config(document, environ={}, base_dir=tmp_path)
    assert config.store.backend == "postgres"


# -- brokers as replicas -------------------------------------------------------------------------


@pytest.fixture
def store_backend() -> str:
    return "postgres"


async def test_flow_started_on_one_replica_completes_on_another(make_broker: BrokerFactory) -> None:
    a = await make_broker()
    b = await make_broker(client=a.client)
    started = await a.start_flow("alice")
    callback = await asyncio.to_thread(a.auth.authorize, started.authorization_url, "alice")
    await b.stub.Complete(pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice"))
    assert (await a.resolve("alice")).access_token == (await b.resolve("alice")).access_token


async def test_one_refresh_across_replicas(make_broker: BrokerFactory) -> None:
    a = await make_broker()
    b = await make_broker(client=a.client)
    a.auth.access_ttl = 30  # inside the refresh window: stale at once
    await a.connect("alice")
    a.auth.access_ttl = 3600
    before = len(a.auth.token_requests("refresh_token"))
    answers = await asyncio.gather(*(r.resolve("alice") for _ in range(50) for r in (a, b)))
    assert len({x.access_token for x in answers}) == 1
    assert len(a.auth.token_requests("refresh_token")) - before == 1


# -- the database restarting under load ---------------------------------------------------------


@pytest.fixture
def restartable_dsn(pg_cluster: PgCluster) -> Any:
    with fresh_schema(pg_cluster.dsn) as dsn:
        yield dsn


async def test_database_restart_answers_unavailable_then_recovers(
    make_broker: BrokerFactory, pg_cluster: PgCluster, restartable_dsn: str
) -> None:
    broker: Broker = await make_broker(store={"backend": "postgres", "dsn": restartable_dsn})
    await broker.connect("alice")
    token = (await broker.resolve("alice")).access_token
    outcomes: list[str] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            try:
                answer = await broker.resolve("alice")
                assert answer.access_token == token  # never a wrong answer
                outcomes.append("ok")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                assert error_info(exc).reason == "STORE_UNAVAILABLE"
                outcomes.append("unavailable")
            await asyncio.sleep(0.01)

    callers = [asyncio.create_task(load()) for _ in range(4)]
    await asyncio.sleep(0.3)
    await asyncio.to_thread(pg_cluster.stop, "fast")
    await asyncio.sleep(1.0)
    down = len(outcomes)
    assert "unavailable" in outcomes
    await asyncio.to_thread(pg_cluster.start)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and outcomes[-1:] != ["ok"]:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*callers)
    assert outcomes[-1] == "ok", "the broker did not recover after the database came back"
    assert outcomes[down:].count("ok") > 0
    assert outcomes[0] == "ok"
