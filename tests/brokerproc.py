"""Real broker server processes (``python -m broker serve --config F``) for cross-process tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests import leakcheck

_SERVING = re.compile(r"serving addresses=(\S+)")


def write_config(document: dict[str, Any], path: Path, **overrides: Any) -> Path:
    """A YAML config file from a make_broker document (listen on a fresh loopback port)."""
    doc = {**document, "listen": ["127.0.0.1:0"], **overrides}
    path.write_text(yaml.safe_dump(doc))
    return path


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m broker ARGS`` to completion; its output is kept for the leak check."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", *args], capture_output=True, text=True, timeout=30, check=False
    )
    leakcheck.observe_text(done.stdout + done.stderr, "cli output")
    if check and done.returncode != 0:
        raise AssertionError(f"broker {' '.join(args)} failed: {done.stderr.strip()}")
    return done


class ServerProcess:
    """One ``broker serve`` process; ``address`` is read from its "serving" log line."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(config)],
            stdout=self._log,
            stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.address = self._wait_serving()

    def _wait_serving(self, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            found = _SERVING.findall(text)
            if found:
                return found[-1].split(",")[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"broker exited with {self.proc.returncode}: {text[-2000:]}")
            time.sleep(0.02)
        raise AssertionError("broker did not start in time")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()

    def _close(self) -> None:
        if not self._log.closed:
            self._log.close()
            leakcheck.observe_text(self.log_path.read_text(errors="replace"), "server log")
