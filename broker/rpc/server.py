"""The gRPC server: listeners, health, reflection and graceful stop."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.rpc.servicer import CredentialBrokerServicer, lenient_deserializer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CredentialBroker"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def _handlers(servicer: CredentialBrokerServicer) -> grpc.GenericRpcHandler:
    """The service's method handlers, built from its descriptor with a lenient deserializer."""
    service = pb.DESCRIPTOR.services_by_name["CredentialBroker"]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=lenient_deserializer(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class BrokerServer:
    """A grpc.aio server bound to the configured addresses.

    ``extra_handlers`` lets a benchmark add an empty RPC on the very same server.
    """

    def __init__(
        self,
        servicer: CredentialBrokerServicer,
        listen: Sequence[str],
        *,
        health_listen: str | None = None,
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
        reuse_port: bool = False,
    ) -> None:
        # SO_REUSEPORT only for worker processes sharing a port (serve --workers N); otherwise a
        # second broker on a taken port must fail to bind rather than silently share it.
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
        self._server = grpc.aio.server(options=options)
        self._server.add_generic_rpc_handlers((_handlers(servicer),))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        if extra_handlers:
            self._server.add_generic_rpc_handlers(tuple(extra_handlers))
        self.addresses: list[str] = []
        self._sockets: list[Path] = []
        for address in listen:
            self.addresses.append(self._bind(self._server, address))
        self._health_server: grpc.aio.Server | None = None
        if health_listen:
            # Health only, for kubelet gRPC probes that cannot reach a unix socket.
            self._health_server = grpc.aio.server(options=options)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            self.health_address = self._bind(self._health_server, health_listen)

    def _bind(self, server: grpc.aio.Server, address: str) -> str:
        if address.startswith("unix://"):
            path = Path(address.removeprefix("unix://"))
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()  # a stale socket from a previous run
            server.add_insecure_port(address)
            self._sockets.append(path)
            return address
        port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"could not bind {address}")
        host = address.rpartition(":")[0]
        return f"{host}:{port}"

    async def start(self) -> None:
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        for path in self._sockets:
            os.chmod(path, 0o660)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """Flip health to NOT_SERVING first, then let in-flight calls finish within ``grace``."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        for path in self._sockets:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
