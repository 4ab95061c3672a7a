"""Client keepalive pings: a caller that pings its connection (Go's and Java's clients are often
configured to, down to their floor of 10 s) must keep it, with a call open or none.

gRPC's server default allows a ping only every 5 minutes while no data flows, and none on a
connection without calls: a third ping too early makes it close the connection with GOAWAY
"too_many_pings", which ends an idle WatchConnections stream (and so empties an SDK cache) and
fails the next call. Runs a real ``broker serve`` and real gRPC channels that ping every
``KEEPALIVE_PING_SECONDS``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.crypto import generate_keyring_file
from broker.rpc.server import KEEPALIVE_PING_SECONDS
from tests.brokerproc import ServerProcess

HEADER = (("x-credential-broker-request", "true"),)


def _pinging_channel(address: str) -> grpc.Channel:
    interval_ms = int(KEEPALIVE_PING_SECONDS * 1000)
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.keepalive_time_ms", interval_ms),
            ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )


class _States:
    """Every connectivity state a channel goes through once it is READY."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.seen: list[grpc.ChannelConnectivity] = []
        self._ready = threading.Event()
        channel.subscribe(self._note, try_to_connect=True)

    def _note(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            self._ready.set()
        elif self._ready.is_set():
            self.seen.append(state)

    def wait_ready(self) -> None:
        assert self._ready.wait(10), "the channel never became READY"


def test_pinging_clients_keep_their_connections(tmp_path: Path) -> None:
    generate_keyring_file(tmp_path / "keyring.json")
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": ["127.0.0.1:0"],
                "store": {"path": str(tmp_path / "broker.db")},
                "keyring": {"file": str(tmp_path / "keyring.json")},
            }
        )
    )
    server = ServerProcess(config, tmp_path / "serve.log")
    watching, idle = _pinging_channel(server.address), _pinging_channel(server.address)
    try:
        watch_states, idle_states = _States(watching), _States(idle)
        # One connection holds an idle WatchConnections stream; the other has no call at all.
        stream = pb_grpc.CredentialBrokerStub(watching).WatchConnections(
            pb.WatchConnectionsRequest(), metadata=HEADER
        )
        stream.initial_metadata()  # subscribed
        health_pb2_grpc.HealthStub(idle).Check(health_pb2.HealthCheckRequest(), timeout=5)
        watch_states.wait_ready()
        idle_states.wait_ready()
        # Three pings and a half: the server's default refuses the third with GOAWAY.
        time.sleep(KEEPALIVE_PING_SECONDS * 3.5)
        assert stream.is_active(), f"the idle watch stream ended: {stream.code()} {stream.details()}"
        assert watch_states.seen == [], f"the watching connection was dropped: {watch_states.seen}"
        assert idle_states.seen == [], f"the idle connection was dropped: {idle_states.seen}"
        stream.cancel()
        answer = health_pb2_grpc.HealthStub(idle).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        watching.close()
        idle.close()
        server.stop()
