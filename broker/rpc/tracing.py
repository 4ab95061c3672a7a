"""A server span around every RPC (but health checks), when tracing is on.

Installed first among the interceptors, so caller admission, the servicer and every store or
HTTP call they make run inside the span. Not installed at all when tracing is off.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from broker.tracing import Spans

_UNTRACED_PREFIX = "/grpc.health."  # probes every few seconds: noise, not traces
_UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]


def _code(context: grpc.aio.ServicerContext, failed: bool) -> int:
    """The call's gRPC status code as a number (an exception without a status is UNKNOWN)."""
    code = context.code()
    if code is None:
        return _UNKNOWN if failed else 0
    if isinstance(code, grpc.StatusCode):
        return int(code.value[0])
    return int(code)


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Opens ``spans.server`` for each call, under the caller's ``traceparent``."""

    def __init__(self, spans: Spans) -> None:
        self._spans = spans

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNTRACED_PREFIX):
            return handler
        metadata = tuple(handler_call_details.invocation_metadata or ())
        spans = self._spans
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def traced_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with spans.server(method, metadata) as record:
                    try:
                        response = await unary(request, context)
                    except BaseException:
                        record.finish(_code(context, True))
                        raise
                    record.finish(_code(context, False))
                    return response

            return grpc.unary_unary_rpc_method_handler(
                traced_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def traced_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with spans.server(method, metadata) as record:
                    try:
                        async for response in stream(request, context):
                            yield response
                    except BaseException:
                        record.finish(_code(context, True))
                        raise
                    record.finish(_code(context, False))

            return grpc.unary_stream_rpc_method_handler(
                traced_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:  # reflection
            both = handler.stream_stream

            async def traced_both(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with spans.server(method, metadata) as record:
                    try:
                        async for response in both(requests, context):
                            yield response
                    except BaseException:
                        record.finish(_code(context, True))
                        raise
                    record.finish(_code(context, False))

            return grpc.stream_stream_rpc_method_handler(
                traced_both,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
