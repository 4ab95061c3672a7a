"""benchmarks/sdk_cache.py still runs (tiny budgets, SQLite and PostgreSQL). Its figures are not
checked here: speed is measured by running it, not asserted in the test suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_sdk_cache_benchmark_runs_and_prints_figures(pg_server_dsn: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/sdk_cache.py",
            "--resolves",
            "80",
            "--samples",
            "4",
            "--dsn",
            pg_server_dsn,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for backend in ("sqlite", "postgres"):
        [latency] = [line for line in result.stdout.splitlines() if line.startswith(f"{backend} latency:")]
        assert float(latency.split("ratio ")[1].split("x")[0]) > 0
        stale = [line for line in result.stdout.splitlines() if line.startswith(f"{backend} staleness ")]
        assert len(stale) == 5, result.stdout
