"""Server side of the RPC path: Resolve against the health Check, and tracing on against off.

How most polyglot callers call: a synchronous gRPC client with a thread pool (``--callers``, 32 by
default) sharing one channel. Starts benchmarks/server.py in a subprocess (a cached credential
for user-0, an audit event per Resolve written to a file, as in production), then:

1. Resolve against grpc.health.v1.Health/Check on the same channel, in paired rounds (ABBA
   order), and prints the median over rounds of the throughput ratio, of the p50 ratio and of
   the ratio of the server's CPU time per call. Target: Resolve throughput >= 0.9x Check's,
   p50 <= 1.1x.
2. With ``--floor``, the same ResolveResponse bytes from a bare handler on the same server
   (``/bench.Bench/Answer``: no interceptor, no servicer) against Check, in the same way: what
   gRPC itself charges for a Resolve-sized call, so that Resolve's gap to Check splits into
   gRPC's part and the broker's own Python work.
3. Unless ``--no-tracing``, Resolve on a second broker with tracing on (every call
   sampled, exported over OTLP/gRPC to a loopback receiver run here) against the first one,
   tracing off, again in ABBA-paired rounds: the cost of tracing per Resolve.

    .venv/bin/python benchmarks/resolve_vs_check.py [--seconds 2] [--rounds 6] [--callers 32]
        [--transport tcp|unix] [--no-tracing] [--floor] [--event-loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.resolve_vs_empty import HEADER, pct
from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc

SERVER = Path(__file__).with_name("server.py")


@contextlib.contextmanager
def bench_server(*args: str) -> Iterator[dict[str, Any]]:
    process = subprocess.Popen(
        [sys.executable, str(SERVER), "--users", "1", *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        yield {**json.loads(process.stdout.readline()), "pid": process.pid}
    finally:
        process.terminate()
        process.wait(30)


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple[str, Callable[[], int]]]:
    """A loopback OTLP/gRPC trace receiver that counts the spans it is sent; yields its URL."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = [0]
    lock = threading.Lock()

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:
            count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            with lock:
                received[0] += count
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", lambda: received[0]
    finally:
        server.stop(0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    pool: futures.ThreadPoolExecutor, call: Callable[[], object], callers: int, seconds: float
) -> tuple[list[float], float]:
    """Latencies (s) of every call and calls/s, ``callers`` threads calling for ``seconds``."""
    deadline = time.perf_counter() + seconds

    def caller() -> list[float]:
        mine = []
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            call()
            mine.append(time.perf_counter() - t0)
        return mine

    started = time.perf_counter()
    latencies = [t for f in [pool.submit(caller) for _ in range(callers)] for t in f.result()]
    return latencies, len(latencies) / (time.perf_counter() - started)


def paired(
    pool: futures.ThreadPoolExecutor,
    a: tuple[str, Callable[[], object], int],
    b: tuple[str, Callable[[], object], int],
    callers: int,
    seconds: float,
    rounds: int,
) -> dict[str, float]:
    """ABBA-paired rounds of ``a`` and ``b`` (name, call, pid of the server it calls): each one's
    p50, calls/s and server CPU per call over all rounds, and the medians over rounds of b/a for
    p50, calls/s and server CPU per call.

    Server CPU per call (from /proc) is the steadier figure on a shared machine: throughput and
    latency also move with whatever else the cores run."""
    samples: dict[str, list[float]] = {a[0]: [], b[0]: []}
    rates: dict[str, list[float]] = {a[0]: [], b[0]: []}
    cpu: dict[str, list[float]] = {a[0]: [], b[0]: []}
    p50_ratios, rate_ratios, cpu_ratios = [], [], []
    for round_ in range(rounds):
        measured = {}
        for name, fn, pid in (a, b) if round_ % 2 == 0 else (b, a):
            used = cpu_seconds(pid)
            measured[name] = measure(pool, fn, callers, seconds)
            cpu[name].append((cpu_seconds(pid) - used) / max(1, len(measured[name][0])))
            samples[name] += measured[name][0]
            rates[name].append(measured[name][1])
        p50_ratios.append(pct(measured[b[0]][0], 0.5) / pct(measured[a[0]][0], 0.5))
        rate_ratios.append(measured[b[0]][1] / measured[a[0]][1])
        cpu_ratios.append(cpu[b[0]][-1] / max(cpu[a[0]][-1], 1e-9))
    out = {}
    for name in (a[0], b[0]):
        out[f"{name}_p50_us"] = pct(samples[name], 0.5) * 1e6
        out[f"{name}_rps"] = statistics.median(rates[name])
        out[f"{name}_cpu_us"] = statistics.median(cpu[name]) * 1e6
    out["p50_ratio"] = statistics.median(p50_ratios)
    out["rps_ratio"] = statistics.median(rate_ratios)
    out["cpu_ratio"] = statistics.median(cpu_ratios)
    return out


def _calls(
    target: str,
) -> tuple[grpc.Channel, Callable[[], object], Callable[[], object], Callable[[], object]]:
    """The channel, and a Resolve, a Check and a call of the bare Answer handler on it."""
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.CredentialBrokerStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    request = pb.ResolveRequest(user_id="user-0", upstream="bench")
    check_request = health_pb2.HealthCheckRequest(service="")
    answer_call = channel.unary_unary(
        "/bench.Bench/Answer", request_serializer=None, response_deserializer=pb.ResolveResponse.FromString
    )
    request_bytes = request.SerializeToString()

    def resolve() -> object:
        return stub.Resolve(request, metadata=HEADER)

    def check() -> object:
        return health.Check(check_request, metadata=HEADER)

    def answer() -> object:
        return answer_call(request_bytes, metadata=HEADER)

    resolved = stub.Resolve(request, metadata=HEADER)
    assert resolved.access_token == "access-0", "the credential did not resolve"
    assert answer() == resolved, "the bare handler's answer is not Resolve's"
    assert check().status == health_pb2.HealthCheckResponse.SERVING  # type: ignore[attr-defined]
    return channel, resolve, check, answer


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=6, help="paired rounds (ABBA order)")
    parser.add_argument("--callers", type=int, default=32, help="client threads sharing the channel")
    parser.add_argument("--transport", choices=("tcp", "unix"), default="tcp")
    parser.add_argument("--no-tracing", action="store_true", help="skip the tracing on/off comparison")
    parser.add_argument("--floor", action="store_true", help="also a bare handler's answer against Check")
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop", help="the server's")
    args = parser.parse_args()
    pool = futures.ThreadPoolExecutor(max_workers=args.callers)
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(bench_server("--event-loop", args.event_loop))
        channel, resolve, check, answer = _calls(plain[args.transport])
        stack.callback(channel.close)
        measure(pool, check, args.callers, 0.5)  # warm up both paths
        measure(pool, resolve, args.callers, 0.5)
        pid = plain["pid"]
        row = paired(
            pool, ("check", check, pid), ("resolve", resolve, pid), args.callers, args.seconds, args.rounds
        )
        print(
            f"resolve vs check ({args.transport}, {args.callers} callers, {args.rounds} rounds): "
            f"check p50 {row['check_p50_us']:.0f}us {row['check_rps']:.0f}/s "
            f"{row['check_cpu_us']:.0f}us server CPU/call; "
            f"resolve p50 {row['resolve_p50_us']:.0f}us {row['resolve_rps']:.0f}/s "
            f"{row['resolve_cpu_us']:.0f}us server CPU/call",
            flush=True,
        )
        met = row["rps_ratio"] >= 0.9 and row["p50_ratio"] <= 1.1
        print(
            f"resolve/check: rate ratio {row['rps_ratio']:.2f}, p50 ratio {row['p50_ratio']:.2f}, "
            f"server CPU per call ratio {row['cpu_ratio']:.2f}  "
            f"(target rate >= 0.9, p50 <= 1.1: {'met' if met else 'NOT met'})",
            flush=True,
        )
        if args.floor:
            measure(pool, answer, args.callers, 0.5)
            row = paired(
                pool, ("check", check, pid), ("answer", answer, pid), args.callers, args.seconds, args.rounds
            )
            print(
                f"floor (the same answer from a bare handler) vs check: rate ratio {row['rps_ratio']:.2f}, "
                f"p50 ratio {row['p50_ratio']:.2f}, server CPU per call ratio {row['cpu_ratio']:.2f} "
                f"({row['answer_cpu_us']:.0f}us against {row['check_cpu_us']:.0f}us)",
                flush=True,
            )
        if not args.no_tracing:
            endpoint, spans = stack.enter_context(otlp_receiver())
            traced = stack.enter_context(
                bench_server("--event-loop", args.event_loop, "--tracing-endpoint", endpoint)
            )
            traced_channel, traced_resolve, _, _ = _calls(traced[args.transport])
            stack.callback(traced_channel.close)
            measure(pool, traced_resolve, args.callers, 0.5)
            row = paired(
                pool,
                ("off", resolve, pid),
                ("on", traced_resolve, traced["pid"]),
                args.callers,
                args.seconds,
                args.rounds,
            )
            deadline = time.monotonic() + 15  # the batch exporter sends every few seconds
            while spans() == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            print(
                f"tracing ({args.transport}, {args.callers} callers): off p50 {row['off_p50_us']:.0f}us "
                f"{row['off_rps']:.0f}/s {row['off_cpu_us']:.0f}us server CPU/call; on p50 "
                f"{row['on_p50_us']:.0f}us {row['on_rps']:.0f}/s {row['on_cpu_us']:.0f}us server CPU/call; "
                f"{spans()} spans received",
                flush=True,
            )
            print(
                f"tracing on/off: rate ratio {row['rps_ratio']:.2f}, p50 ratio {row['p50_ratio']:.2f}, "
                f"server CPU per call ratio {row['cpu_ratio']:.2f}",
                flush=True,
            )
    pool.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
