"""gRPC server interceptors for cross-cutting concerns.

Order (outermost first): TelemetryInterceptor, ErrorInterceptor. Telemetry
therefore sees the final status code that ErrorInterceptor chose.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..errors import ErrorCode, Overloaded, ServiceError
from ..observability.metrics import GRPC_CODE_NAMES, GrpcServerMetrics
from ..observability.telemetry import DEADLINE_SLACK_SECONDS
from ..observability.tracing import extract_context

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


# Server span status per OpenTelemetry's RPC conventions: only these codes
# are the server's fault; the rest describe the request.
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
# Probes and tooling call these all the time; they get metrics, not spans.
_UNTRACED_SERVICES = ("grpc.health.", "grpc.reflection.")


def _split_method(full_method: str) -> tuple[str, str]:
    """"/qwen.QwenService/Chat" -> ("qwen.QwenService", "Chat")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _peer_attributes(peer: str | None) -> dict[str, object]:
    """"ipv4:127.0.0.1:5000" / "ipv6:[::1]:5000" -> network.peer.* attributes."""
    if not peer or ":" not in peer:
        return {}
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {}
    host, _, port = address.rpartition(":")
    attributes: dict[str, object] = {"network.peer.address": host.strip("[]")}
    if port.isdigit():
        attributes["network.peer.port"] = int(port)
    return attributes


def final_status(context: aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    """The status an RPC ended with, as the client sees it: past its deadline
    that is DEADLINE_EXCEEDED whatever the handler returned. The client's
    deadline timer fires a little before the server's (the server counts from
    when the call arrived) and its cancellation looks like any other, so a
    cancellation within DEADLINE_SLACK_SECONDS of the deadline counts as the
    deadline too."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        if remaining is not None and remaining <= DEADLINE_SLACK_SECONDS:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if exc is not None:
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


class _Call:
    """Bookkeeping for one RPC: its metric children, start time and span."""

    __slots__ = ("_labels", "_metrics", "_start", "_span", "_token", "sent")

    def __init__(self, metrics: GrpcServerMetrics, labels: tuple[str, str, str], span: trace.Span | None) -> None:
        self._labels = labels
        self._metrics = metrics
        self._start = time.perf_counter()
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span)) if span is not None else None
        self.sent = 0
        metrics.started.labels(*labels).inc()

    def end(self, context: aio.ServicerContext, exc: BaseException | None) -> None:
        code = final_status(context, exc)
        m, labels = self._metrics, self._labels
        m.handled.labels(*labels, GRPC_CODE_NAMES.get(code.name, code.name)).inc()
        m.handling_seconds.labels(*labels).observe(time.perf_counter() - self._start)
        if self.sent:
            m.msg_sent.labels(*labels).inc(self.sent)
        span = self._span
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _SERVER_ERROR_CODES:
                details = context.details() if code is not grpc.StatusCode.DEADLINE_EXCEEDED else None
                span.set_status(Status(StatusCode.ERROR, details or code.name))
            span.end()
            otel_context.detach(self._token)


class TelemetryInterceptor(aio.ServerInterceptor):
    """grpc_server_* metrics for every RPC and, when tracing is on, a SERVER
    span per RPC that continues the caller's trace (W3C traceparent in the
    metadata) and is the current span while the handler runs."""

    def __init__(self, metrics: GrpcServerMetrics, tracer: trace.Tracer | None = None) -> None:
        self._metrics = metrics
        self._tracer = tracer

    def _begin(self, kind: str, details: grpc.HandlerCallDetails, context: aio.ServicerContext) -> _Call:
        service, method = _split_method(details.method)
        span = None
        if self._tracer is not None and not service.startswith(_UNTRACED_SERVICES):
            attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
            attributes.update(_peer_attributes(context.peer()))
            span = self._tracer.start_span(
                f"{service}/{method}",
                context=extract_context(details.invocation_metadata),
                kind=SpanKind.SERVER,
                attributes=attributes,
            )
        return _Call(self._metrics, (kind, service, method), span)

    def _received(self, details: grpc.HandlerCallDetails, kind: str, count: int = 1) -> None:
        service, method = _split_method(details.method)
        self._metrics.msg_received.labels(kind, service, method).inc(count)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler  # unknown method: grpc answers UNIMPLEMENTED itself
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_response(handler.unary_unary, details, "unary"),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary_response(handler.stream_unary, details, "client_stream"),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream_response(handler.unary_stream, details, "server_stream"),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_response(handler.stream_stream, details, "bidi_stream"),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler

    def _requests(self, request: Any, details: grpc.HandlerCallDetails, kind: str) -> Any:
        if kind in ("unary", "server_stream"):
            self._received(details, kind)
            return request

        async def counted() -> AsyncIterator[Any]:
            async for item in request:
                self._received(details, kind)
                yield item

        return counted()

    def _unary_response(self, inner: Callable, details: grpc.HandlerCallDetails, kind: str) -> Callable:
        async def handle(request: Any, context: aio.ServicerContext) -> Any:
            call = self._begin(kind, details, context)
            try:
                response = await inner(self._requests(request, details, kind), context)
            except BaseException as exc:
                call.end(context, exc)
                raise
            call.sent = 1
            call.end(context, None)
            return response

        return handle

    def _stream_response(self, inner: Callable, details: grpc.HandlerCallDetails, kind: str) -> Callable:
        if not inspect.isasyncgenfunction(inner):  # writes with context.write() (e.g. health Watch)

            async def handle_writer(request: Any, context: aio.ServicerContext) -> None:
                call = self._begin(kind, details, context)
                try:
                    await inner(self._requests(request, details, kind), context)
                except BaseException as exc:
                    call.end(context, exc)
                    raise
                call.end(context, None)

            return handle_writer

        async def handle(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            call = self._begin(kind, details, context)
            error: BaseException | None = None
            try:
                async for response in inner(self._requests(request, details, kind), context):
                    call.sent += 1
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                call.end(context, error)

        return handle
