"""The child side of broker/refresh_process.py: ``python -m broker.refresh_worker --stats-fd N``.

Reads the broker's config (pickled) from stdin, lowers its own CPU priority (SCHED_IDLE by
default), builds the store, vault, token client and service (broker/app.py ``build_core``) and
runs the BackgroundRefresher until stdin closes (the parent asked it to stop, or died) or
SIGTERM. Its audit records go to the configured sink; a file sink gets a file of its own,
``<path>.refresher``, since each process rotates its own file. Twice a second it writes its
counts to fd N (one JSON line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pickle
import signal
import sys

from broker import event_loop
from broker.app import build_core
from broker.audit import AuditSink, sink_from_config
from broker.clock import SystemClock
from broker.config import BrokerConfig
from broker.errors import BrokerError
from broker.logs import configure, fields
from broker.metrics import timed_store
from broker.refresh_process import FailureCounter, stats_line
from broker.refresher import BackgroundRefresher

REPORT_SECONDS = 0.5


def _own_audit_file(config: BrokerConfig) -> BrokerConfig:
    if config.audit.output != "file" or config.audit.path is None:
        return config
    path = config.audit.path.with_name(f"{config.audit.path.name}.refresher")
    return config.model_copy(update={"audit": config.audit.model_copy(update={"path": path})})


def _lower_priority(config: BrokerConfig) -> str | None:
    """Lower this process's CPU priority (``process_scheduling``, ``process_nice``) before any
    thread starts, so every thread inherits it; a warning to log when SCHED_IDLE is refused."""
    settings = config.background_refresh
    with contextlib.suppress(OSError):
        os.nice(settings.process_nice)
    if settings.process_scheduling != "idle":
        return None
    if not hasattr(os, "SCHED_IDLE"):
        return "SCHED_IDLE is not available on this system; the background refresher runs at process_nice"
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        return (
            f"could not enter the idle scheduling class ({exc.strerror or exc}); "
            "the background refresher runs at process_nice"
        )
    return None


async def _run(config: BrokerConfig, stats_fd: int, priority_warning: str | None = None) -> None:
    logger = configure(config.log.format, config.log.level)
    if priority_warning is not None:
        logger.warning(priority_warning)
    clock = SystemClock()
    config = _own_audit_file(config)
    configured = sink_from_config(config.audit)
    failures = FailureCounter()
    sinks: list[AuditSink] = [failures] if configured is None else [configured, failures]
    core = build_core(config, clock=clock, logger=logger, audit_sinks=sinks, discover=False)
    refresher = BackgroundRefresher(
        core.config, timed_store(core.traced, core.metrics), core.service, clock, logger
    )
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    # stdin stays open while the parent wants us: its end (EOF) is the cue to stop.
    stdin = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def watch_stdin() -> None:
        with contextlib.suppress(Exception):
            while await stdin.read(4096):
                pass
        done.set()

    watcher = loop.create_task(watch_stdin())
    out = os.fdopen(stats_fd, "wb", buffering=0)
    logger.info("background refresh process started", extra=fields(pid=os.getpid()))
    refresher.start()
    try:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), REPORT_SECONDS)
            with contextlib.suppress(OSError):
                out.write(stats_line(refresher.stats, failures))
    finally:
        await refresher.stop()
        with contextlib.suppress(OSError):
            out.write(stats_line(refresher.stats, failures))
        out.close()
        watcher.cancel()
        transport.close()
        await core.tokens.aclose()
        core.store.close()
        await core.spans.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="broker.refresh_worker")
    parser.add_argument("--stats-fd", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    config = pickle.load(sys.stdin.buffer)  # noqa: S301 - our parent's own config, on a private pipe
    if not isinstance(config, BrokerConfig):
        print("credential-broker: background refresh process: no config on stdin", file=sys.stderr)
        return 2
    warning = _lower_priority(config)
    try:
        event_loop.run(_run(config, args.stats_fd, warning), config.event_loop)
    except BrokerError as exc:
        print(f"credential-broker: background refresh process: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"credential-broker: background refresh process: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
