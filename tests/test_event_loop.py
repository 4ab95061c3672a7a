"""``event_loop``: every broker process (the server, its worker processes and its background
refresh process) runs on uvloop by default, or on asyncio's own loop when configured.

Observed from outside: which shared objects each live process has mapped (/proc/PID/maps), and
that a flow completes and Resolve answers through the real server on either loop.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from broker import event_loop
from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.errors import ConfigError
from tests.authserver import AuthServer
from tests.live import REQUEST_HEADER, LiveBroker, start_live_broker


def _family(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        children = Path(f"/proc/{current}/task/{current}/children")
        if children.exists():
            todo.extend(int(c) for c in children.read_text().split())
    return out


def _runs_uvloop(pid: int) -> bool:
    return "/uvloop/loop." in Path(f"/proc/{pid}/maps").read_text()


def _connect_and_resolve(live: LiveBroker, auth: AuthServer) -> None:
    with live.channel() as channel:
        stub = pb_grpc.CredentialBrokerStub(channel)
        md = (REQUEST_HEADER,)
        started = stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id="alice", upstream=live.upstream), metadata=md
        )
        callback = auth.authorize(started.authorization_url, "alice")
        stub.Complete(
            pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice"), metadata=md
        )
        answer = stub.Resolve(pb.ResolveRequest(user_id="alice", upstream=live.upstream), metadata=md)
    info = auth.access_token_info(answer.access_token)
    assert info is not None and info["user"] == "alice"


@pytest.mark.parametrize(
    ("setting", "workers", "uvloop"),
    [(None, 1, True), (None, 2, True), ("asyncio", 1, False), ("asyncio", 2, False)],
)
def test_every_process_runs_the_configured_loop(
    tmp_path: Path, auth_server: AuthServer, setting: str | None, workers: int, uvloop: bool
) -> None:
    extra = {} if setting is None else {"event_loop": setting}
    live = start_live_broker(tmp_path, auth_server, workers=workers, **extra)
    try:
        _connect_and_resolve(live, auth_server)
        deadline = time.monotonic() + 15
        while "background refresh process started" not in live.logs():
            assert time.monotonic() < deadline, live.logs()
            time.sleep(0.05)
        family = _family(live.process.pid)
        # The server (or each worker) and the background refresh process; with workers, the
        # parent only forks and waits, on no loop.
        assert len(family) == (1 if workers == 1 else 1 + workers) + 1, family
        serving = family if workers == 1 else [pid for pid in family if pid != live.process.pid]
        assert {pid: _runs_uvloop(pid) for pid in serving} == {pid: uvloop for pid in serving}
    finally:
        assert live.stop(signal.SIGTERM) == 0


def test_a_missing_uvloop_is_one_line_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never_run() -> None:
        raise AssertionError("ran without a loop")

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    main = never_run()
    with pytest.raises(ConfigError) as info:
        event_loop.run(main, "uvloop")
    main.close()
    assert (
        str(info.value) == "event_loop: uvloop is not installed here; install it or set event_loop: asyncio"
    )
