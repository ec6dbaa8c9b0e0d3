"""gRPC server interceptors for cross-cutting concerns."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Awaitable, Callable

import grpc
from grpc import aio

from ..errors import ErrorCode, Overloaded, ServiceError

_LOG = logging.getLogger(__name__)

STATUS_BY_CODE = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}


async def _abort_with(context: aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, ServiceError):
        if isinstance(exc, Overloaded):
            # gRPC's retry pushback: clients with a retry policy wait this long.
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(exc.retry_after_seconds * 1000))),))
        await context.abort(STATUS_BY_CODE[exc.code], exc.message)
    _LOG.exception("unhandled error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


class ErrorInterceptor(aio.ServerInterceptor):
    """ServiceError -> its status code; any other exception -> INTERNAL
    (logged with its traceback, never shown to the client)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        if handler.unary_unary:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: aio.ServicerContext) -> Any:
                try:
                    return await inner_unary(request, context)
                except (aio.AbortError, grpc.RpcError):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    await _abort_with(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: aio.ServicerContext) -> Any:
                try:
                    async for response in inner_stream(request, context):
                        yield response
                except (aio.AbortError, grpc.RpcError):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    await _abort_with(context, exc, method)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        # Other shapes (e.g. health Watch, which writes with context.write())
        # pass through untouched.
        return handler
