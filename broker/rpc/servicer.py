"""CredentialBroker servicer: proto <-> domain, nothing else."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.errors import BrokerError, InvalidArgument
from broker.identity import UserAuthenticator, VerifiedUser
from broker.logs import fields, get_logger
from broker.models import CredentialInfo
from broker.rpc.status import internal_status, to_status
from broker.service import BrokerService

T = TypeVar("T")


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1_000_000_000))
    return stamp


def _info(info: CredentialInfo) -> pb.CredentialInfo:
    return pb.CredentialInfo(
        user_id=info.user_id,
        upstream=info.upstream,
        token_type=info.token_type,
        scopes=list(info.scopes),
        expires_at=_timestamp(info.expires_at),
        obtained_via=info.obtained_via,
        updated_at=_timestamp(info.updated_at),
    )


class MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the servicer can answer
    INVALID_ARGUMENT instead of gRPC's generic UNKNOWN."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def lenient_deserializer(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return MalformedRequest(message_type.DESCRIPTOR.full_name)

    return parse


class CredentialBrokerServicer(pb_grpc.CredentialBrokerServicer):
    """Maps each RPC to one service call; errors go through the status table."""

    def __init__(
        self,
        service: BrokerService,
        logger: logging.Logger | None = None,
        authenticator: UserAuthenticator | None = None,
    ) -> None:
        self._service = service
        self._log = logger or get_logger()
        self._users = authenticator or UserAuthenticator()

    async def _user(
        self, context: grpc.aio.ServicerContext, user_id: str, subject_token: str = ""
    ) -> VerifiedUser:
        """The identity hook: with an ``identity:`` config, the user's token must name user_id."""
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                authorization = value
        return await self._users.authenticate(user_id, subject_token, authorization)

    async def _call(
        self,
        context: grpc.aio.ServicerContext,
        request: object,
        method: str,
        work: Callable[[], Awaitable[T]],
    ) -> T:
        try:
            if isinstance(request, MalformedRequest):
                raise InvalidArgument(f"request: not a valid {request.type_name} message")
            return await work()
        except BrokerError as exc:
            await context.abort_with_status(to_status(exc))
        except Exception as exc:
            # The message of a foreign exception may carry anything; log its type only.
            self._log.error("unexpected error", extra=fields(method=method, error=type(exc).__name__))
            await context.abort_with_status(internal_status())
        raise AssertionError("abort_with_status returns by raising")  # pragma: no cover

    @staticmethod
    async def _after(first: Awaitable[VerifiedUser], then: Callable[[VerifiedUser], Awaitable[T]]) -> T:
        return await then(await first)

    async def BuildAuthorizationURL(
        self, request: pb.BuildAuthorizationURLRequest, context: grpc.aio.ServicerContext
    ) -> pb.BuildAuthorizationURLResponse:
        result = await self._call(
            context,
            request,
            "BuildAuthorizationURL",
            lambda: self._after(
                self._user(context, request.user_id),
                lambda _: self._service.build_authorization_url(request.user_id, request.upstream),
            ),
        )
        return pb.BuildAuthorizationURLResponse(
            authorization_url=result.authorization_url,
            state=result.state,
            expires_at=_timestamp(result.expires_at),
        )

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteResponse:
        info = await self._call(
            context,
            request,
            "Complete",
            lambda: self._after(
                self._user(context, request.user_id),
                lambda _: self._service.complete(request.state, request.code, request.user_id),
            ),
        )
        return pb.CompleteResponse(credential=_info(info))

    async def Deny(self, request: pb.DenyRequest, context: grpc.aio.ServicerContext) -> pb.DenyResponse:
        await self._call(
            context,
            request,
            "Deny",
            lambda: self._service.deny(request.state, request.error, request.error_description),
        )
        return pb.DenyResponse()

    async def Refresh(
        self, request: pb.RefreshRequest, context: grpc.aio.ServicerContext
    ) -> pb.RefreshResponse:
        info = await self._call(
            context,
            request,
            "Refresh",
            lambda: self._after(
                self._user(context, request.user_id),
                lambda _: self._service.refresh(request.user_id, request.upstream),
            ),
        )
        return pb.RefreshResponse(credential=_info(info))

    async def Resolve(
        self, request: pb.ResolveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveResponse:
        result = await self._call(
            context,
            request,
            "Resolve",
            lambda: self._after(
                self._user(context, request.user_id, request.subject_token),
                lambda user: self._service.resolve(
                    request.user_id, request.upstream, user.token, request.min_valid_seconds, user.claims
                ),
            ),
        )
        return pb.ResolveResponse(
            access_token=result.access_token,
            token_type=result.token_type,
            expires_at=_timestamp(result.expires_at),
            scopes=list(result.scopes),
            obtained_via=result.obtained_via,
            header_name=result.header_name,
            header_value=result.header_value,
        )
