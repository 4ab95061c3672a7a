"""``serve --workers N``: N broker processes sharing one TCP port, so one sidecar uses every core.

The parent forks N workers before anything imports grpc (forking after grpc starts its threads
is unsafe). Each worker runs its own grpc.aio server with SO_REUSEPORT on the same TCP port and
the kernel spreads new connections across them. The parent holds a SO_REUSEPORT socket bound
(not listening) to each TCP address meanwhile, which turns port 0 into one concrete port for all
workers and keeps it reserved. A unix socket cannot be shared that way: only worker 0 binds the
unix addresses, ``health_listen`` and ``metrics.listen``, so at least one TCP address is
required.

Workers share state only through the store (SQLite file or PostgreSQL). The parent forwards
SIGTERM/SIGINT to the workers and waits for them; if one dies on its own, it stops the others
and exits non-zero, so the supervisor (kubelet, systemd) restarts the whole sidecar.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

from broker import event_loop
from broker.config import BrokerConfig, ListenerConfig
from broker.crypto import generate_keyring_file
from broker.errors import BrokerError, ConfigError
from broker.logs import configure, fields

Serve = Callable[..., Coroutine[Any, Any, int]]
_STOP_GRACE_SECONDS = 30.0


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def reserve_port(address: str) -> tuple[socket.socket, str]:
    """Bind (without listening) a SO_REUSEPORT socket; returns it and the concrete address."""
    host, port = _split(address)
    family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(where)
    except OSError:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    shown = address.rpartition(":")[0]
    return sock, f"{shown}:{bound}"


def worker_configs(config: BrokerConfig, tcp: list[ListenerConfig]) -> list[BrokerConfig]:
    """Worker 0 binds every address; the others only the shared TCP ones."""
    unix = [entry for entry in config.listeners() if entry.address.startswith("unix://")]
    first = config.model_copy(update={"listen": (*tcp, *unix)})
    # health_listen and metrics.listen are single endpoints: worker 0 serves them.
    metrics = config.metrics.model_copy(update={"listen": None})
    rest = config.model_copy(update={"listen": tuple(tcp), "health_listen": None, "metrics": metrics})
    if config.background_refresh.separate_process:
        # One refresh process for the sidecar (worker 0's child), whose counts worker 0 exports.
        refresh = config.background_refresh.model_copy(update={"enabled": False})
        rest = rest.model_copy(update={"background_refresh": refresh})
    configs = [first] + [rest] * (config.workers - 1)
    if config.audit.output == "file" and config.audit.path is not None:
        # Each worker rotates its own audit file: worker N > 0 appends to "<path>.w<N>".
        path = config.audit.path
        configs = [configs[0]] + [
            c.model_copy(
                update={"audit": c.audit.model_copy(update={"path": path.with_name(f"{path.name}.w{n}")})}
            )
            for n, c in enumerate(configs[1:], start=1)
        ]
    return configs


def _run_worker(config: BrokerConfig, embedded: bool, serve: Serve) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    try:
        return event_loop.run(serve(config, embedded, reuse_port=True), config.event_loop)
    except BrokerError as exc:
        print(f"credential-broker worker {os.getpid()}: {exc.message}", flush=True)
        return 2
    except BaseException as exc:
        print(f"credential-broker worker {os.getpid()}: {type(exc).__name__}", flush=True)
        return 1


def serve_workers(config: BrokerConfig, embedded: bool, serve: Serve) -> int:
    """Fork ``config.workers`` workers on one TCP port; forward signals; wait for them."""
    log = configure(config.log.format, config.log.level)
    tcp_listeners = [entry for entry in config.listeners() if not entry.address.startswith("unix://")]
    if not tcp_listeners:
        raise ConfigError(
            "workers: more than one worker needs a TCP listen address (a unix socket cannot be "
            "shared by several processes)"
        )
    if embedded and not config.keyring.file.exists():
        generate_keyring_file(config.keyring.file)
        log.warning("generated a development keyring", extra=fields(path=str(config.keyring.file)))
    reserved: list[socket.socket] = []
    tcp: list[ListenerConfig] = []
    try:
        for listener in tcp_listeners:
            address = listener.address
            sock, concrete = reserve_port(address)
            reserved.append(sock)
            tcp.append(listener.model_copy(update={"address": concrete}))
    except OSError as exc:
        for sock in reserved:
            sock.close()
        raise ConfigError(f"listen: cannot bind {address} ({exc.strerror})") from None

    children: dict[int, int] = {}
    for index, worker_config in enumerate(worker_configs(config, tcp)):
        pid = os.fork()
        if pid == 0:  # the worker
            for sock in reserved:
                sock.close()
            os._exit(_run_worker(worker_config, embedded, serve))
        children[pid] = index
    log.info(
        "workers started",
        extra=fields(workers=len(children), addresses=",".join(entry.address for entry in tcp)),
    )

    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    failed = False
    deadline: float | None = None
    try:
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                if stopping and deadline is None:
                    deadline = time.monotonic() + _STOP_GRACE_SECONDS
                if deadline is not None and time.monotonic() > deadline:
                    for late in children:
                        os.kill(late, signal.SIGKILL)
                    deadline = float("inf")
                time.sleep(0.05)
                continue
            index = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if code != 0 or not stopping:
                failed = True
                log.error("worker exited", extra=fields(worker=index, pid=pid, exit_code=code))
                if not stopping:
                    forward(signal.SIGTERM, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in reserved:
            sock.close()
    log.info("all workers stopped")
    return 1 if failed else 0
