"""The background refresher in a child process (broker/refresh_process.py, the default).

Real processes throughout: the child is ``python -m broker.refresh_worker`` started by a real
app (or a real ``broker serve``), refreshing against the loopback authorization server, on both
stores. Why it exists (Resolve is not slowed by a refresh herd) is measured, not asserted:
benchmarks/background_refresh.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from broker.refresh_process import RefresherProcess
from tests.authserver import AuthServer
from tests.brokerproc import ServerProcess, write_config
from tests.conftest import Broker, BrokerFactory

CHILD = {"enabled": True, "ahead_seconds": 60, "interval_seconds": 0.1}


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def _refreshes(auth: AuthServer) -> int:
    return len(auth.token_requests("refresh_token"))


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name, or None when the process is gone (or a
    zombie waiting to be reaped: it has exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else fields


def _children(parent: int) -> list[int]:
    """Live ``broker.refresh_worker`` processes whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if stat is not None and int(stat[1]) == parent and b"broker.refresh_worker" in command:
            found.append(int(entry.name))
    return found


async def _connect_due(broker: Broker, user: str) -> None:
    """Connect ``user`` with a token due for background refresh 2 s later; its refreshed token
    is not due again."""
    broker.auth.access_ttl = 4
    await broker.connect(user)
    broker.auth.access_ttl = 3600


def _child_of(broker: Broker) -> RefresherProcess:
    refresher = broker.app.refresher
    assert isinstance(refresher, RefresherProcess)
    return refresher


def _policies(pid: int) -> set[int]:
    """The scheduling policy of every thread of ``pid`` (empty once it is gone)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found.add(os.sched_getscheduler(int(task.name)))
    return found


async def test_serve_refreshes_in_a_child_process_at_a_lower_cpu_priority(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(background_refresh=CHILD)
    refresher = _child_of(broker)
    await _until(lambda: refresher.pid is not None and _stat(refresher.pid) is not None)
    assert refresher.pid is not None and refresher.pid != os.getpid()
    pid = refresher.pid
    assert int((_stat(pid) or ["", "0"])[1]) == os.getpid()  # our child
    assert os.sched_getscheduler(os.getpid()) == os.SCHED_OTHER
    # Once it has read its config it enters the idle scheduling class (the default), before it
    # starts a thread: every thread of it is SCHED_IDLE.
    await _until(lambda: _policies(pid) == {os.SCHED_IDLE}, timeout=10)
    broker.auth.access_ttl = 4  # due 2 s after connecting
    old = (await broker.connect("alice")).credential
    broker.auth.access_ttl = 3600
    assert _refreshes(broker.auth) == 0
    await _until(lambda: _refreshes(broker.auth) == 1)
    await _until(lambda: refresher.stats.count("done") == 1)  # mirrored from the child
    assert broker.app.metrics is not None
    exposed = generate_latest(broker.app.metrics.registry).decode()
    assert 'credential_broker_background_refreshes_total{outcome="done",upstream="gh"} 1.0' in exposed
    await asyncio.sleep(1.1)  # the serving process's read cache (read_cache_seconds) lets go
    answer = await broker.resolve("alice")
    assert answer.expires_at.seconds > old.expires_at.seconds + 3000
    assert _refreshes(broker.auth) == 1  # the Resolve was answered, not refreshed again

    assert _policies(pid) == {os.SCHED_IDLE}  # the threads it started since (store, HTTP) too


async def test_with_nice_scheduling_the_child_only_lowers_its_nice_value(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(background_refresh={**CHILD, "process_scheduling": "nice", "process_nice": 7})
    refresher = _child_of(broker)
    await _until(lambda: refresher.pid is not None and _stat(refresher.pid) is not None)
    assert refresher.pid is not None
    pid, ours = refresher.pid, os.getpriority(os.PRIO_PROCESS, 0)
    await _until(lambda: int((_stat(pid) or [""] * 17)[16] or 0) - ours == 7, timeout=10)
    await _connect_due(broker, "alice")
    await _until(lambda: _refreshes(broker.auth) == 1)
    assert _policies(pid) == {os.SCHED_OTHER}


async def test_a_child_that_dies_is_started_again_and_its_counts_carry_on(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(background_refresh=CHILD)
    refresher = _child_of(broker)
    await _connect_due(broker, "alice")
    await _until(lambda: refresher.stats.count("done") == 1)
    first = refresher.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await _until(lambda: refresher.starts == 2 and refresher.pid != first, timeout=10)
    assert refresher.stats.count("done") == 1  # the metric never goes back
    await _connect_due(broker, "bob")
    await _until(lambda: refresher.stats.count("done") == 2)
    assert _refreshes(broker.auth) == 2
    assert await broker.resolve("bob")


async def test_stopping_the_broker_stops_the_child(make_broker: BrokerFactory) -> None:
    broker = await make_broker(background_refresh=CHILD)
    refresher = _child_of(broker)
    await _until(lambda: refresher.pid is not None)
    pid = refresher.pid
    assert pid is not None and _stat(pid) is not None
    await broker.app.stop(grace=0)
    assert _stat(pid) is None  # it exited before stop returned
    assert not _children(os.getpid())


async def test_the_child_of_a_killed_broker_exits_on_its_own(broker: Broker, tmp_path: Path) -> None:
    config = write_config(broker.document, tmp_path / "serve.yaml", background_refresh=CHILD)
    server = await asyncio.to_thread(ServerProcess, config, tmp_path / "serve.log")
    try:
        await _until(lambda: len(_children(server.proc.pid)) == 1, timeout=15)
        [child] = _children(server.proc.pid)
        server.kill()  # SIGKILL: the parent's shutdown code never runs
        await _until(lambda: _stat(child) is None, timeout=10)  # it saw its stdin close
    finally:
        server.stop()


async def test_the_childs_audit_records_go_to_a_file_of_its_own(broker: Broker, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    own = audit.with_name("audit.jsonl.refresher")
    await _connect_due(broker, "alice")
    config = write_config(
        broker.document,
        tmp_path / "serve.yaml",
        background_refresh=CHILD,
        audit={"output": "file", "path": str(audit)},
    )
    server = await asyncio.to_thread(ServerProcess, config, tmp_path / "serve.log")
    try:
        await _until(lambda: own.exists() and '"action":"refresh","outcome":"success"' in own.read_text())
    finally:
        server.stop()
    assert _refreshes(broker.auth) == 1
    assert '"action":"refresh"' not in (audit.read_text() if audit.exists() else "")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"process_nice": 20}, "background_refresh.process_nice"),
        ({"process_nice": -1}, "background_refresh.process_nice"),
        ({"separate_process": "sometimes"}, "background_refresh.separate_process"),
        ({"process_scheduling": "realtime"}, "background_refresh.process_scheduling"),
    ],
)
def test_bad_process_settings_are_refused_by_name(
    tmp_path: Path, settings: dict[str, object], message: str
) -> None:
    from broker.config import load_config
    from broker.errors import ConfigError

    document = {"keyring": {"file": "k.json"}, "background_refresh": settings}
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(document, environ={}, base_dir=tmp_path)


def test_the_refresher_runs_in_a_child_process_unless_turned_off(tmp_path: Path) -> None:
    from broker.config import load_config

    default = load_config({"keyring": {"file": "k.json"}}, environ={}, base_dir=tmp_path)
    assert default.background_refresh.separate_process is True
    assert default.background_refresh.process_nice == 10
    assert default.background_refresh.process_scheduling == "idle"
    inline = load_config(
        {"keyring": {"file": "k.json"}, "background_refresh": {"separate_process": False}},
        environ={},
        base_dir=tmp_path,
    )
    assert inline.background_refresh.separate_process is False


async def test_the_childs_failed_refreshes_are_counted_by_error_in_the_servers_metrics(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(background_refresh=CHILD)
    refresher = _child_of(broker)
    await _connect_due(broker, "alice")
    broker.auth.fail_next("503")  # the child's refresh meets an outage
    await _until(lambda: refresher.stats.count("failed") == 1)
    assert broker.app.metrics is not None

    def failures() -> list[str]:
        assert broker.app.metrics is not None
        text = generate_latest(broker.app.metrics.registry).decode()
        return [
            line
            for line in text.splitlines()
            if line.startswith("credential_broker_refresh_failures_total{") and 'upstream="gh"' in line
        ]

    await _until(lambda: len(failures()) == 1)
    [line] = failures()
    assert line.endswith(" 1.0") and 'error="UPSTREAM_UNAVAILABLE"' in line
