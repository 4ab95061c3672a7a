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
from broker.config import ListenerConfig, TlsConfig
from broker.errors import ConfigError
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
        listen: Sequence[str | ListenerConfig],
        *,
        health_listen: str | None = None,
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
        reuse_port: bool = False,
        tls: TlsConfig | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        # SO_REUSEPORT only for worker processes sharing a port (serve --workers N); otherwise a
        # second broker on a taken port must fail to bind rather than silently share it.
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
        self._credentials = _server_credentials(tls) if tls is not None else None
        self._server = grpc.aio.server(options=options, interceptors=tuple(interceptors))
        self._server.add_generic_rpc_handlers((_handlers(servicer),))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        if extra_handlers:
            self._server.add_generic_rpc_handlers(tuple(extra_handlers))
        self.addresses: list[str] = []
        self._sockets: list[tuple[Path, int]] = []
        for index, entry in enumerate(listen):
            listener = ListenerConfig(address=entry) if isinstance(entry, str) else entry
            if listener.is_unix:
                _check_socket_path(f"listen[{index}]", Path(listener.address.removeprefix("unix://")))
            self.addresses.append(self._bind(self._server, listener.address, listener.mode, secure=True))
        self._health_server: grpc.aio.Server | None = None
        if health_listen:
            # Health only, for kubelet gRPC probes that cannot reach a unix socket.
            self._health_server = grpc.aio.server(options=options)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            # Plaintext on purpose, whatever tls says: kubelet probes speak neither TLS nor
            # the request header. It serves nothing but grpc.health.v1.
            self.health_address = self._bind(self._health_server, health_listen, 0o660, secure=False)

    def _bind(self, server: grpc.aio.Server, address: str, mode: int = 0o660, *, secure: bool = False) -> str:
        if address.startswith("unix://"):
            path = Path(address.removeprefix("unix://"))
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()  # a stale socket from a previous run
            server.add_insecure_port(address)
            self._sockets.append((path, mode))
            return address
        if secure and self._credentials is not None:
            port = server.add_secure_port(address, self._credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"could not bind {address}")
        host = address.rpartition(":")[0]
        return f"{host}:{port}"

    async def start(self) -> None:
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        for path, mode in self._sockets:
            os.chmod(path, mode)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """Flip health to NOT_SERVING first, then let in-flight calls finish within ``grace``."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        for path, _ in self._sockets:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _check_socket_path(where: str, path: Path) -> None:
    """Refuse a socket path that someone else owns, or that is not a socket: never replace it."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"{where}: {path} is owned by uid {st.st_uid}, not this process (uid {os.geteuid()}); "
            "refusing to replace it"
        )
    if not path.is_socket():
        raise ConfigError(f"{where}: {path} exists and is not a socket; refusing to replace it")


def _server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS for the TCP listeners; mutual TLS when a client CA is configured."""

    def read(where: str, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path} ({exc.strerror})") from None

    key = read("tls.key_file", tls.key_file)
    cert = read("tls.cert_file", tls.cert_file)
    ca = read("tls.client_ca_file", tls.client_ca_file) if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )
