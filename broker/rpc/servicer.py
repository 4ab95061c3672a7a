"""CredentialBroker servicer: proto <-> domain, nothing else."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.audit import Auditor
from broker.callers import current_call
from broker.connections import Connection, ConnectionManager, Disconnection
from broker.errors import BrokerError, InvalidArgument, NotImplementedMode
from broker.events import ConnectionEvent, EventHub, EventKind
from broker.identity import UserAuthenticator, VerifiedUser
from broker.logs import fields, get_logger
from broker.models import CredentialInfo, ResolvedCredential
from broker.offboarding import Offboarding
from broker.rpc.status import internal_status, to_status
from broker.service import BrokerService


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    whole = math.floor(seconds)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=int((seconds - whole) * 1_000_000_000))


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


def resolve_response(result: ResolvedCredential) -> pb.ResolveResponse:
    """The Resolve answer for a resolved credential (also the benchmarks' bare-handler floor)."""
    return pb.ResolveResponse(
        access_token=result.access_token,
        token_type=result.token_type,
        expires_at=_timestamp(result.expires_at),
        scopes=result.scopes,
        obtained_via=result.obtained_via,
        header_name=result.header_name,
        header_value=result.header_value,
        connection_fields=dict(result.connection_fields),
    )


ANSWER_CACHE_SIZE = 1024


T = TypeVar("T")


class RunToTheEnd:
    """Runs work that a caller's going away (its deadline passing, a cancel) must not cut short.

    gRPC cancels a handler whose caller has gone. Complete has by then consumed the flow and
    presented the code (the authorization server redeems it whether or not anyone reads the
    answer), and Disconnect may be waiting on a slow revocation endpoint before it deletes:
    cancelled there, the user's login would be lost with its grant orphaned upstream, or a
    credential the caller asked to delete would still be served. So the work runs in a task of
    its own, held here until it ends, and the handler awaits it through ``asyncio.shield``.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, work: Awaitable[T], orphaned: Callable[[BaseException], object]) -> T:
        """``work``'s result; ``orphaned`` gets its failure when its caller has gone by then."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller has gone and the work goes on: a failure has nobody left to answer.
            task.add_done_callback(lambda done: _report_failure(done, orphaned))
            raise

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the work still running (shutdown: before the store
        closes, so a login whose caller gave up is still stored)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller may be gone (a live one got it raised)


def _report_failure(task: asyncio.Task[Any], orphaned: Callable[[BaseException], object]) -> None:
    if not task.cancelled():
        failure = task.exception()
        if failure is not None:
            orphaned(failure)


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
        *,
        auditor: Auditor | None = None,
        connections: ConnectionManager | None = None,
        events: EventHub | None = None,
        offboarding: Offboarding | None = None,
    ) -> None:
        self._events = events
        self._offboarding = offboarding
        self._service = service
        self._log = logger or get_logger()
        self._users = authenticator or UserAuthenticator()
        self._audit = auditor or Auditor()
        self._connections = connections
        self._answers: dict[tuple[object, ...], pb.ResolveResponse] = {}
        self._to_the_end = RunToTheEnd()

    async def drain(self, timeout: float) -> None:
        """At shutdown: let Complete, Disconnect and DisconnectAll whose callers have gone finish."""
        await self._to_the_end.drain(timeout)

    async def _run_to_the_end(self, method: str, request: object, work: Awaitable[T]) -> T:
        """``work`` and its audit record in a task its caller's going away cannot cut short
        (RunToTheEnd); a failure after the caller has gone is still audited (and logged)."""
        return await self._to_the_end.run(
            self._audited(method, request, work), functools.partial(self._failed, method, request)
        )

    async def _audited(self, method: str, request: object, work: Awaitable[T]) -> T:
        """``work``, then its success audited: both within the task a caller cannot cancel."""
        result = await work
        _audit(self._audit, method, request, "success", "", result)
        return result

    async def _user(
        self, context: grpc.aio.ServicerContext, user_id: str, subject_token: str = ""
    ) -> VerifiedUser:
        """The identity hook: with an ``identity:`` config, the user's token must name user_id."""
        if self._users.verifier is None:  # the caller names the user; nothing to look at
            return VerifiedUser(user_id, None, subject_token)
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                authorization = value
        return await self._users.authenticate(user_id, subject_token, authorization)

    def _check(self, request: object) -> None:
        if isinstance(request, MalformedRequest):
            raise InvalidArgument(f"request: not a valid {request.type_name} message")

    async def _fail(
        self, context: grpc.aio.ServicerContext, method: str, request: object, exc: Exception
    ) -> NoReturn:
        """Audit the failure and answer it: a BrokerError through the status table, anything else
        as INTERNAL (a foreign exception's message may carry anything: only its type is logged)."""
        await context.abort_with_status(self._failed(method, request, exc))
        raise AssertionError("abort_with_status returns by raising")  # pragma: no cover

    def _failed(self, method: str, request: object, exc: BaseException) -> grpc.Status:
        """Audit a failure (and log a foreign exception's type); the status that answers it."""
        if isinstance(exc, BrokerError):
            _audit(self._audit, method, request, "failure", exc.code, None)
            return to_status(exc)
        self._log.error("unexpected error", extra=fields(method=method, error=type(exc).__name__))
        _audit(self._audit, method, request, "failure", "INTERNAL", None)
        return internal_status()

    # Each RPC: check, verify the user, do the work, audit, answer. Kept flat (no closures or
    # helper coroutines) because Resolve runs this on every call.

    async def BuildAuthorizationURL(
        self, request: pb.BuildAuthorizationURLRequest, context: grpc.aio.ServicerContext
    ) -> pb.BuildAuthorizationURLResponse:
        try:
            self._check(request)
            await self._user(context, request.user_id)
            result = await self._service.build_authorization_url(
                request.user_id, request.upstream, dict(request.connection_params)
            )
        except Exception as exc:
            await self._fail(context, "BuildAuthorizationURL", request, exc)
        _audit(self._audit, "BuildAuthorizationURL", request, "success", "", result)
        return pb.BuildAuthorizationURLResponse(
            authorization_url=result.authorization_url,
            state=result.state,
            expires_at=_timestamp(result.expires_at),
        )

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteResponse:
        try:
            self._check(request)
            await self._user(context, request.user_id)
            info = await self._run_to_the_end(
                "Complete",
                request,
                self._service.complete(
                    request.state,
                    request.code,
                    request.user_id,
                    request.iss,
                    dict(request.callback_params),
                ),
            )
        except Exception as exc:
            await self._fail(context, "Complete", request, exc)
        return pb.CompleteResponse(credential=_info(info))

    async def Deny(self, request: pb.DenyRequest, context: grpc.aio.ServicerContext) -> pb.DenyResponse:
        try:
            self._check(request)
            await self._service.deny(request.state, request.error, request.error_description)
        except Exception as exc:
            await self._fail(context, "Deny", request, exc)
        _audit(self._audit, "Deny", request, "success", "", None)
        return pb.DenyResponse()

    async def Refresh(
        self, request: pb.RefreshRequest, context: grpc.aio.ServicerContext
    ) -> pb.RefreshResponse:
        try:
            self._check(request)
            await self._user(context, request.user_id)
            info = await self._service.refresh(request.user_id, request.upstream)
        except Exception as exc:
            await self._fail(context, "Refresh", request, exc)
        _audit(self._audit, "Refresh", request, "success", "", info)
        return pb.RefreshResponse(credential=_info(info))

    async def Resolve(
        self, request: pb.ResolveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveResponse:
        try:
            self._check(request)
            user_id, upstream = request.user_id, request.upstream
            token, claims = request.subject_token, None
            # Without a user-token verifier authenticate() passes the request's token through
            # unchanged; Resolve skips that coroutine rather than await it on every call.
            if self._users.verifier is not None:
                user = await self._user(context, user_id, token)
                token, claims = user.token, user.claims
            result = await self._service.resolve(
                user_id,
                upstream,
                token,
                request.min_valid_seconds,
                claims,
                request.rejected_access_token,
                request.required_scopes,
            )
        except Exception as exc:
            await self._fail(context, "Resolve", request, exc)
        self._audit.record("inject", "success", user=user_id, upstream=upstream)
        # A credential answered from the read cache gives the same values call after call: the
        # message is built once per distinct answer (by every field it holds) and reused.
        key = (
            result.access_token,
            result.token_type,
            result.expires_at,
            result.scopes,
            result.obtained_via,
            result.header_name,
            result.header_value,
            result.connection_fields,
        )
        answer = self._answers.get(key)
        if answer is None:
            if len(self._answers) >= ANSWER_CACHE_SIZE:
                self._answers.clear()
            answer = self._answers[key] = resolve_response(result)
        return answer

    async def ListConnections(
        self, request: pb.ListConnectionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListConnectionsResponse:
        call = current_call.get()
        who = call.who if call is not None else None
        try:
            self._check(request)
            await self._user(context, request.user_id)
            connections = await self._manager().list_connections(
                request.user_id, who.may_use if who else lambda _: True
            )
        except Exception as exc:
            await self._fail(context, "ListConnections", request, exc)
        _audit(self._audit, "ListConnections", request, "success", "", connections)
        return pb.ListConnectionsResponse(connections=[_connection(c) for c in connections])

    async def Disconnect(
        self, request: pb.DisconnectRequest, context: grpc.aio.ServicerContext
    ) -> pb.DisconnectResponse:
        try:
            self._check(request)
            await self._user(context, request.user_id)
            result = await self._run_to_the_end(
                "Disconnect", request, self._manager().disconnect(request.user_id, request.upstream)
            )
        except Exception as exc:
            await self._fail(context, "Disconnect", request, exc)
        return pb.DisconnectResponse(
            deleted=result.deleted,
            revocations=[
                pb.TokenRevocation(token_type_hint=r.token_type_hint, outcome=r.outcome, reason=r.reason)
                for r in result.revocations
            ],
        )

    async def DisconnectAll(
        self, request: pb.DisconnectAllRequest, context: grpc.aio.ServicerContext
    ) -> pb.DisconnectAllResponse:
        call = current_call.get()
        who = call.who if call is not None else None
        try:
            self._check(request)
            if self._offboarding is None:
                raise NotImplementedMode("DisconnectAll is not wired in this server")
            await self._user(context, request.user_id)
            done = await self._run_to_the_end(
                "DisconnectAll",
                request,
                self._offboarding.disconnect_all(request.user_id, who.may_use if who else lambda _: True),
            )
        except Exception as exc:
            await self._fail(context, "DisconnectAll", request, exc)
        return pb.DisconnectAllResponse(
            results=[
                pb.UpstreamDisconnect(
                    upstream=d.upstream,
                    deleted=d.result.deleted,
                    revocations=[
                        pb.TokenRevocation(
                            token_type_hint=r.token_type_hint, outcome=r.outcome, reason=r.reason
                        )
                        for r in d.result.revocations
                    ],
                )
                for d in done
            ]
        )

    async def WatchConnections(
        self, request: pb.WatchConnectionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchConnectionsResponse]:
        call = current_call.get()
        who = call.who if call is not None else None
        try:
            self._check(request)
            if self._events is None:
                raise NotImplementedMode("connection events are not wired in this server")
            if request.user_id or self._users.verifier is not None:
                await self._user(context, request.user_id)  # with user tokens, one user only
            after = request.after_sequence if request.HasField("after_sequence") else None

            async def live() -> None:
                # Headers once subscribed, not with the first event: a client cache learns its
                # stream is live, and every change committed after them reaches it.
                await context.send_initial_metadata(())

            stream = self._events.watch_connections(
                request.user_id or None,
                list(request.upstreams),
                after,
                who.may_use if who else lambda _: True,
                live,
            )
            _audit(self._audit, "WatchConnections", request, "success", "", None)
            async for event in stream:
                yield pb.WatchConnectionsResponse(event=_event(event))
        except Exception as exc:
            await self._fail(context, "WatchConnections", request, exc)

    def _manager(self) -> ConnectionManager:
        if self._connections is None:
            raise NotImplementedMode("connection management is not wired in this server")
        return self._connections


# RPC -> audit action. RPCs not listed here are not audited by the servicer.
AUDIT_ACTIONS = {
    "BuildAuthorizationURL": "connect",
    "Complete": "acquire",
    "Deny": "deny",
    "Refresh": "refresh",
    "Resolve": "inject",
    "ListConnections": "list",
    "Disconnect": "disconnect",
    "DisconnectAll": "disconnect",
    "WatchConnections": "list",
}


def _audit(auditor: Auditor, method: str, request: object, outcome: str, reason: str, result: object) -> None:
    action = AUDIT_ACTIONS.get(method)
    if action is None:
        return
    user = getattr(request, "user_id", "")
    upstream = getattr(request, "upstream", "") or getattr(result, "upstream", "")
    detail: dict[str, str] = {}
    if isinstance(result, list):  # DisconnectAll: each upstream is audited on its own as well
        detail["upstreams"] = ",".join(sorted(getattr(d, "upstream", "") for d in result))
    if isinstance(result, Disconnection):
        detail["deleted"] = str(result.deleted).lower()
        for revocation in result.revocations:
            detail[revocation.token_type_hint] = revocation.outcome + (
                f" ({revocation.reason})" if revocation.reason else ""
            )
    # Only the name of a field we set ourselves: never a token, code, state or URL.
    auditor.record(
        action,
        outcome,
        user=user if isinstance(user, str) else "",
        upstream=upstream if isinstance(upstream, str) else "",
        reason=reason,
        detail=detail,
    )


def _connection(connection: Connection) -> pb.Connection:
    return pb.Connection(
        upstream=connection.upstream,
        status=connection.status,
        mode=connection.mode,
        scopes=list(connection.scopes),
        expires_at=_timestamp(connection.expires_at),
        obtained_via=connection.obtained_via,
        updated_at=_timestamp(connection.updated_at),
        last_error=connection.last_error,
        connection_fields=dict(connection.connection_fields),
        refresh_token_expires_at=_timestamp(connection.refresh_token_expires_at),
        last_refreshed_at=_timestamp(connection.last_refreshed_at),
        last_used_at=_timestamp(connection.last_used_at),
        consecutive_failures=connection.consecutive_failures,
        next_retry_at=_timestamp(connection.next_retry_at),
    )


_KINDS = {kind: pb.ConnectionEventKind.Value(f"CONNECTION_EVENT_KIND_{kind.name}") for kind in EventKind}


def _event(event: ConnectionEvent) -> pb.ConnectionEvent:
    return pb.ConnectionEvent(
        sequence=event.sequence,
        user_id=event.user_id,
        upstream=event.upstream,
        kind=_KINDS[event.kind],
        status=event.status,
        last_error=event.last_error or "",
        at=_timestamp(event.at),
    )
