"""Caller authentication and authorization, request ids, audit of refusals and RPC metrics.

One server interceptor wraps every CredentialBroker handler. It needs the call's context
(peer, metadata, TLS auth context), which ``handler_call_details`` lacks, so it wraps the
handler's behaviour rather than deciding in ``intercept_service``. The health service is
never guarded: Kubernetes gRPC probes send no metadata.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc

from broker.audit import Auditor
from broker.callers import CallContext, Caller, CallerPolicy, current_call, request_id
from broker.errors import BrokerError
from broker.rpc.status import to_status

_GUARDED_PREFIX = "/credentialbroker.v1.CredentialBroker/"
# Reflection needs a known caller when callers are configured, but not the SSRF-guard header:
# it only describes the API, and `grpcurl ... grpc.health.v1.Health/Check` (which must work
# without the header, like a probe) looks the health service up through reflection first.
_REFLECTION_PREFIX = "/grpc.reflection."
_SAN = "x509_subject_alternative_name"

# The call's metadata as gRPC decoded it for intercept_service, passed on to the wrapped handler:
# asking the servicer context decodes it again, which was a tenth of Resolve's own cost. gRPC
# runs both in the call's task; the task is stored with it and checked, so metadata can never
# cross to another call (a mismatch falls back to the context). The hand-over is taken once:
# left in place, the task would hold itself through its context, and every call's task,
# coroutine and context would wait for the garbage collector instead of going when it ends.
_NOTHING: tuple[object, Any] = (None, None)
_decoded: contextvars.ContextVar[tuple[object, Any]] = contextvars.ContextVar(
    "credential_broker_metadata", default=_NOTHING
)


class RpcObserver(Protocol):
    """Where RPC counts and latencies go (the metrics registry)."""

    def observe_rpc(self, method: str, code: str, seconds: float) -> None: ...


def cert_identities(context: grpc.aio.ServicerContext) -> list[str]:
    """The SAN URIs and DNS names of a verified client certificate (mutual TLS), else []."""
    auth = context.auth_context() or {}
    return [value.decode("utf-8", "replace") for value in auth.get(_SAN, [])]


class CallerInterceptor(grpc.aio.ServerInterceptor):
    """Identifies and authorizes the caller of each CredentialBroker RPC."""

    def __init__(
        self,
        policy: CallerPolicy,
        auditor: Auditor,
        observer: RpcObserver | None = None,
        *,
        mutual_tls: bool = False,
    ) -> None:
        self._policy = policy
        self._audit = auditor
        self._observer = observer
        # Only mutual TLS yields client certificate identities; otherwise skip asking for them.
        self._mutual_tls = mutual_tls
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full = handler_call_details.method
        if handler is not None and full.startswith(_REFLECTION_PREFIX) and handler.stream_stream:
            _decoded.set((asyncio.current_task(), handler_call_details.invocation_metadata))
            return self._guard_reflection(handler, full)
        if handler is not None and full.startswith(_GUARDED_PREFIX) and handler.unary_stream is not None:
            _decoded.set((asyncio.current_task(), handler_call_details.invocation_metadata))
            return self._guard_unary_stream(handler, full)
        if handler is None or not full.startswith(_GUARDED_PREFIX) or handler.unary_unary is None:
            return handler
        _decoded.set((asyncio.current_task(), handler_call_details.invocation_metadata))
        cached = self._wrapped.get(full)
        if cached is not None and cached[0] is handler:
            return cached[1]  # one wrapper per method, not one per call
        method = full.removeprefix(_GUARDED_PREFIX)
        inner = handler.unary_unary

        observer = self._observer

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                refused = self._admit(method, request, context)
                if refused is not None:
                    await context.abort_with_status(refused)
                response = await inner(request, context)
            except BaseException:
                if observer is not None:
                    observer.observe_rpc(method, _code_name(context), time.perf_counter() - started)
                raise
            # The servicer answers every error by raising (abort_with_status): a return is OK.
            if observer is not None:
                observer.observe_rpc(method, "OK", time.perf_counter() - started)
            return response

        wrapped = grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[full] = (handler, wrapped)
        return wrapped

    def _guard_reflection(self, handler: grpc.RpcMethodHandler, full: str) -> grpc.RpcMethodHandler:
        inner = handler.stream_stream
        method = full.rpartition("/")[2]

        async def guarded(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            refused = self._admit(method, None, context, rules=False, header=False)
            if refused is not None:
                await context.abort_with_status(refused)
            async for response in inner(request_iterator, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _guard_unary_stream(self, handler: grpc.RpcMethodHandler, full: str) -> grpc.RpcMethodHandler:
        """A server-streaming RPC (WatchConnections) gets the same caller checks as the others."""
        inner = handler.unary_stream
        method = full.removeprefix(_GUARDED_PREFIX)

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            refused = self._admit(method, request, context)
            if refused is not None:
                await context.abort_with_status(refused)
            async for response in inner(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _admit(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        *,
        rules: bool = True,
        header: bool = True,
    ) -> grpc.Status | None:
        """Identify and authorize the caller and set the call context; the status to refuse the
        call with (the refusal audited), or None. Not a coroutine: it runs on every call."""
        decoded = _decoded.get()
        _decoded.set(_NOTHING)
        pairs = decoded[1] if decoded[0] is asyncio.current_task() else context.invocation_metadata()
        # Text headers are str, binary ("-bin") ones bytes; only text headers are ever read.
        metadata: dict[str, str] = dict(pairs) if pairs else {}
        rid = request_id(metadata)
        caller: Caller | None = None
        try:
            caller = self._policy.identify(
                over_tcp=lambda: not context.peer().startswith("unix:"),
                metadata=metadata,
                cert_identities=cert_identities(context) if self._mutual_tls else (),
                needs_header=header,
            )
            if rules and caller.rules is not None:  # a caller without rules may call everything
                is_message = hasattr(request, "DESCRIPTOR")
                self._policy.authorize(
                    caller, method, getattr(request, "upstream", "") if is_message else None
                )
            current_call.set(CallContext(rid, caller.name, method, caller))
            return None
        except BrokerError as exc:
            name = caller.name if caller is not None else ""
            current_call.set(CallContext(rid, name, method))
            is_message = hasattr(request, "DESCRIPTOR")
            self._audit.record(
                "policy_denial",
                "denied",
                user=_short(getattr(request, "user_id", "") if is_message else ""),
                upstream=_short(getattr(request, "upstream", "") if is_message else ""),
                reason=exc.code,
                caller=name,
            )
            return to_status(exc)


def _short(value: Any) -> str:
    """A request field as it may appear in the audit trail: bounded printable text."""
    text = value if isinstance(value, str) else ""
    return text[:256] if text.isprintable() else ""


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    for member in grpc.StatusCode:
        if member.value[0] == code:
            return str(member.name)
    return "UNKNOWN"
