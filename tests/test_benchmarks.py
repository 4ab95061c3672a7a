"""The benchmark scripts still run (tiny budgets). Their figures are not checked here: speed is
measured by running them, not asserted in the test suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each script starts brokers and loads stores: alone one takes 30-50 s on a 2-core machine, so
# the suite-wide 60 s per-test timeout is too tight. The subprocess timeout below still bounds it.
pytestmark = pytest.mark.timeout(300)


def _run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_resolve_vs_empty_runs_and_prints_ratios() -> None:
    out = _run(
        "benchmarks/resolve_vs_empty.py",
        "--seconds",
        "0.2",
        "--rounds",
        "1",
        "--callers",
        "1",
        "--backend",
        "sqlite",
    )
    rows = [line.split() for line in out.splitlines() if line.startswith("sqlite ")]
    assert {row[1] for row in rows} == {"tcp", "unix"}
    assert all(float(row[5]) > 0 for row in rows)  # the p50 ratio column
    assert "targets (p50 <= 1.25x, rate >= 0.8x):" in out


def test_suite_runs_with_small_sizes() -> None:
    out = _run(
        "benchmarks/suite.py",
        "store-size",
        "coalescing",
        "memory",
        "--large",
        "3000",
        "--seconds",
        "0.3",
        "--memory-users",
        "300",
    )
    assert "store-size" in out and "coalescing" in out and "memory" in out


def test_workers_benchmark_runs_with_the_go_load_generator() -> None:
    out = _run("benchmarks/suite.py", "workers", "--go-loadgen", "--seconds", "0.5")
    rates = [line for line in out.splitlines() if "worker(s):" in line and "Go load generator" in line]
    assert len(rates) == 2, out
    assert all("errors 0" in line and float(line.split()[2]) > 0 for line in rates), out
    # Each rate comes with the cores the machine and the broker's processes used meanwhile.
    for line in rates:
        machine = float(line.split("cores busy: ")[1].split()[0])
        broker = float(line.split(" in all, broker ")[1].split()[0])
        assert broker > 0 and 0 < machine <= (os.cpu_count() or 1), line
    assert "workers: calls/s 2 workers / 1 =" in out


def test_refresh_scan_runs_and_prints_ratio() -> None:
    out = _run(
        "benchmarks/refresh_scan.py",
        "--backend",
        "sqlite",
        "--small",
        "300",
        "--large",
        "3000",
        "--rounds",
        "2",
    )
    assert "sqlite    ratio 3000/300:" in out
    assert "USING INDEX credentials_refresh_due" in out  # the scan is an index range scan
    assert "USING INDEX credentials_keep_alive" in out


def test_resolve_vs_check_runs_and_prints_ratios_with_floor_and_tracing_cost() -> None:
    out = _run(
        "benchmarks/resolve_vs_check.py", "--seconds", "0.2", "--rounds", "2", "--callers", "4", "--floor"
    )
    lines = {line.split(":")[0]: line for line in out.splitlines() if ":" in line}
    ratios = lines["resolve/check"].split("rate ratio ")[1].split(",")[0]
    assert float(ratios) > 0, out
    assert "p50 ratio" in lines["resolve/check"] and "server CPU per call ratio" in lines["resolve/check"]
    # The floor: the bare handler's answer (checked equal to Resolve's before measuring) against Check.
    floor = lines["floor (the same answer from a bare handler) vs check"]
    assert float(floor.split("rate ratio ")[1].split(",")[0]) > 0, out
    traced = lines["tracing on/off"]
    assert float(traced.split("rate ratio ")[1].split(",")[0]) > 0, out
    # The traced broker really exported its Resolve spans to the loopback receiver.
    received = int(out.split(" spans received")[0].rsplit("; ", 1)[1])
    assert received > 0, out


def test_usage_stamp_benchmark_runs_and_prints_ratio() -> None:
    out = _run("benchmarks/resolve_usage_stamp.py", "--users", "50", "--calls", "200", "--rounds", "4")
    assert "ratio on/off: p50" in out
    figures = json.loads(out.splitlines()[-1])
    # Two rounds of four stamp: each credential at most once per round (the once-a-minute
    # throttle), and not always every one (at most 16 writes pending: a Resolve never waits).
    assert figures["p50_x"] > 0 and 0 < figures["stamps_written"] <= 2 * 50


def test_background_refresh_benchmark_runs_at_a_tiny_size() -> None:
    out = _run(
        "benchmarks/background_refresh.py",
        "--backend",
        "sqlite",
        "--due",
        "40",
        "--cached",
        "5",
        "--seconds",
        "0.3",
        "--rounds",
        "2",
        "--interval",
        "0.2",
        "--watchers",
        "5",
        "--changes",
        "4",
        "--rate",
        "50",
    )
    assert "by the background refresher vs" in out and "/s sent directly" in out
    for mode in ("idle", "inline"):  # the refresher in its own (idle-class) process, and in the serving one
        for load in ("paced", "flat out"):
            assert (
                f"{mode:<7} resolve {load:<8} idle" in out
                and f"{mode:<7} resolve {load:<8} refreshing" in out
            )
            assert f"{mode:<7} resolve {load} (" in out
    assert "watch fan-out: 4 changes on replica A" in out
    deliveries = [line for line in out.splitlines() if "watch 5 watchers" in line]
    assert deliveries and deliveries[0].endswith("deliveries 20"), out
