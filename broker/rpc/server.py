"""The gRPC server: listeners, health, reflection and graceful stop."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.config import ListenerConfig, TlsConfig
from broker.errors import ConfigError
from broker.preflight import private_socket_path, tcp_problem, unix_problem
from broker.rpc.servicer import CredentialBrokerServicer, lenient_deserializer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CredentialBroker"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Callers may send HTTP/2 keepalive pings this often, with calls open or none (gRPC's server
#: default is one every 5 minutes, and a third early one closes the connection with GOAWAY
#: "too_many_pings"); the server allows a second less, for timer jitter.
KEEPALIVE_PING_SECONDS = 5
#: At shutdown, how long work whose caller has gone (a Complete, a Disconnect) may still run
#: before the store closes: a token or revocation request's deadline and its write.
DRAIN_SECONDS = 30.0


def _handlers(servicer: CredentialBrokerServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The service's method handlers, built from its descriptor with a lenient deserializer."""
    service = pb.DESCRIPTOR.services_by_name["CredentialBroker"]
    return {
        method.name: (
            grpc.unary_stream_rpc_method_handler  # WatchConnections
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )(
            getattr(servicer, method.name),
            request_deserializer=lenient_deserializer(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }


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
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", (KEEPALIVE_PING_SECONDS - 1) * 1000),
        ]
        self._servicer = servicer
        self._credentials = _server_credentials(tls) if tls is not None else None
        self._server = grpc.aio.server(options=options, interceptors=tuple(interceptors))
        # Registered, not generic: gRPC core matches the method itself (as it does for the health
        # service), which takes a handler lookup in Python off every call.
        self._server.add_registered_method_handlers(SERVICE_NAME, _handlers(servicer))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        if extra_handlers:
            self._server.add_generic_rpc_handlers(tuple(extra_handlers))
        self.addresses: list[str] = []
        self._sockets: list[tuple[Path, int, int, int]] = []  # path, mode, st_ino, st_dev
        self._health_server: grpc.aio.Server | None = None
        try:
            self._bind_all(listen, health_listen, options)
        except BaseException:
            self._remove_sockets()  # a failed start leaves no socket file behind
            raise

    def _bind_all(
        self, listen: Sequence[str | ListenerConfig], health_listen: str | None, options: list[Any]
    ) -> None:
        for index, entry in enumerate(listen):
            listener = ListenerConfig(address=entry) if isinstance(entry, str) else entry
            where = f"listen[{index}]"
            if listener.is_unix:
                _check_socket_path(where, listener.address)
            self.addresses.append(
                self._bind(self._server, listener.address, listener.mode, secure=True, where=where)
            )
        if health_listen:
            # Health only, for kubelet gRPC probes that cannot reach a unix socket.
            self._health_server = grpc.aio.server(options=options)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            # Plaintext on purpose, whatever tls says: kubelet probes speak neither TLS nor
            # the request header. It serves nothing but grpc.health.v1.
            if health_listen.startswith("unix://"):
                _check_socket_path("health_listen", health_listen)
            self.health_address = self._bind(
                self._health_server, health_listen, 0o660, secure=False, where="health_listen"
            )

    def _bind(
        self,
        server: grpc.aio.Server,
        address: str,
        mode: int = 0o660,
        *,
        secure: bool = False,
        where: str = "listen",
    ) -> str:
        if address.startswith("unix://"):
            path = Path(address.removeprefix("unix://"))
            path.parent.mkdir(parents=True, exist_ok=True)
            # gRPC unlinks whatever is at the path it binds, before binding and again at
            # shutdown, so it never binds the configured path itself: it binds a private name in
            # the same folder, which is then renamed over the path (replacing a stale socket that
            # _check_socket_path found nothing serving on). gRPC's own unlink at shutdown then
            # finds nothing; stop() removes the path only while it is still this socket.
            private = private_socket_path(path)  # a fresh random name: never another's
            _add_port(server, f"unix://{private}", None, where)
            os.rename(private, path)
            st = path.lstat()
            self._sockets.append((path, mode, st.st_ino, st.st_dev))
            return address
        port = _add_port(server, address, self._credentials if secure else None, where)
        host = address.rpartition(":")[0]
        return f"{host}:{port}"

    async def start(self) -> None:
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        for path, mode, _, _ in self._sockets:
            os.chmod(path, mode)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """Flip health to NOT_SERVING first, then let in-flight calls finish within ``grace``, and
        work their callers gave up on within DRAIN_SECONDS."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        await self._servicer.drain(DRAIN_SECONDS)
        if self._health_server is not None:
            await self._health_server.stop(0)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        for path, _, inode, device in self._sockets:
            with contextlib.suppress(FileNotFoundError):
                st = path.lstat()
                if (st.st_ino, st.st_dev) == (inode, device):
                    path.unlink()  # still the socket this process created

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _check_socket_path(where: str, address: str) -> None:
    """Refuse a socket path that cannot be used, that someone else owns, that is not a socket, or
    that a live process answers on: never replace those (broker/preflight.py)."""
    problem = unix_problem(address)
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")


def _add_port(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None, where: str
) -> int:
    """Bind ``address``; a failure becomes one line naming the entry and the reason."""
    port: int
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc says only "Failed to bind"; ask the OS why
        port = 0
    if port == 0 and not address.startswith("unix://"):
        hint = " (check tls.cert_file and tls.key_file)" if credentials is not None else ""
        raise ConfigError(f"{where}: {tcp_problem(address) or f'{address} could not be bound{hint}'}")
    if port == 0:
        raise ConfigError(f"{where}: {address} could not be bound")
    return port


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
