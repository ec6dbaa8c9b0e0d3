"""gRPC server interceptors for cross-cutting concerns.

Order in build_server (first = outermost):
  TelemetryInterceptor -> metrics and spans; sees the final status of every call
  AuthInterceptor      -> UNAUTHENTICATED before the request is even parsed
  ErrorInterceptor     -> ServiceError -> status; undecodable request -> INVALID_ARGUMENT
  ReplicaNameInterceptor (api/replica.py) -> qwen-replica initial metadata
  RateLimitInterceptor -> RateLimited (a ServiceError, so mapped by ErrorInterceptor)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, NoReturn

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..auth import ApiKeyAuth, bearer_token
from ..errors import INTERNAL_ERROR_MESSAGE, Overloaded, ServiceError
from ..observability.metrics import GRPC_CODE_NAMES, GrpcServerMetrics
from ..observability.telemetry import DEADLINE_SLACK_SECONDS
from ..observability.tracing import extract_context
from ..ratelimit import RateLimiter, grpc_peer_key
from .grpc_handlers import Behavior, Continuation, Wrapper, rewrap, rpc_kind

_LOG = logging.getLogger(__name__)

# Called with the request and context before the wrapped behavior runs.
Before = Callable[[Any, aio.ServicerContext], Awaitable[None]]

RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def status_of(exc: ServiceError) -> grpc.StatusCode:
    """The gRPC status of a ServiceError: ErrorCode members are named after them."""
    return grpc.StatusCode[exc.code.name]


def _ended_while_sending(exc: aio.InternalError, method: str) -> NoReturn:
    """A send failed in grpc's core (ExecuteBatchError): the call ended
    there, cancelled by the client a moment before grpc cancelled this
    handler. It is that cancellation (grpc itself would log it at ERROR);
    nobody is left to tell."""
    _LOG.debug("%s: the call ended while sending: %s", method, exc)
    raise asyncio.CancelledError from exc


async def _abort_with(context: aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, aio.InternalError):
        _ended_while_sending(exc, method)
    if isinstance(exc, ServiceError):
        if isinstance(exc, Overloaded):
            # gRPC's retry pushback: clients with a retry policy wait this long.
            context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(max(1, round(exc.retry_after_seconds * 1000)))),))
        await context.abort(status_of(exc), exc.message)
    _LOG.exception("unhandled error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE)


def _first(before: Before) -> Wrapper:
    """Wraps a coroutine behavior (unary or writer) to await `before(request, context)` first."""

    def wrap(inner: Behavior) -> Behavior:
        async def behavior(request: Any, context: aio.ServicerContext) -> Any:
            await before(request, context)
            return await inner(request, context)

        return behavior

    return wrap


def _first_stream(before: Before) -> Wrapper:
    """Wraps an async-generator behavior to await `before(request, context)` first."""

    def wrap(inner: Behavior) -> Behavior:
        async def behavior(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            await before(request, context)
            async for response in inner(request, context):
                yield response

        return behavior

    return wrap


class _Undecodable:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


async def _reject_undecodable(request: Any, context: aio.ServicerContext) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid protobuf message: {request.error}"
        )


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - reported as INVALID_ARGUMENT
            return _Undecodable(exc)

    return deserialize


class ErrorInterceptor(aio.ServerInterceptor):
    """ServiceError -> its status code; any other exception -> INTERNAL
    (logged with its traceback, never shown to the client). A request that
    is not a valid protobuf message (corrupt wire format, bad UTF-8 in a
    string) -> INVALID_ARGUMENT, instead of grpcio's UNKNOWN with the parser's
    exception text and an ERROR traceback per call."""

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method

        def unary(inner: Behavior) -> Behavior:
            async def behavior(request: Any, context: aio.ServicerContext) -> Any:
                await _reject_undecodable(request, context)
                try:
                    return await inner(request, context)
                except (aio.AbortError, grpc.RpcError):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    await _abort_with(context, exc, method)

            return behavior

        def stream(inner: Behavior) -> Behavior:
            async def behavior(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                await _reject_undecodable(request, context)
                try:
                    async for response in inner(request, context):
                        yield response
                except (aio.AbortError, grpc.RpcError):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    await _abort_with(context, exc, method)

            return behavior

        def writer(inner: Behavior) -> Behavior:
            checked = _first(_reject_undecodable)(inner)

            async def behavior(request: Any, context: aio.ServicerContext) -> None:
                try:
                    await checked(request, context)
                except aio.InternalError as exc:
                    _ended_while_sending(exc, method)

            return behavior

        # Write-style streams (health Watch uses context.write()) get only the
        # undecodable-request check and the client's cancellation while
        # writing: their other errors pass through untouched, as do streaming
        # requests (reflection).
        return rewrap(
            handler,
            unary=unary,
            stream=stream,
            writer=writer,
            request_deserializer=_lenient(handler.request_deserializer),
        )


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
    """ "/qwen.QwenService/Chat" -> ("qwen.QwenService", "Chat")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _peer_attributes(peer: str | None) -> dict[str, str | int]:
    """ "ipv4:127.0.0.1:5000" / "ipv6:[::1]:5000" -> network.peer.* attributes."""
    if not peer or ":" not in peer:
        return {}
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {}
    host, _, port = address.rpartition(":")
    attributes: dict[str, str | int] = {"network.peer.address": host.strip("[]")}
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
        if self._token is not None:
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
            attributes: dict[str, str | int] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
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
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler  # unknown method: grpc answers UNIMPLEMENTED itself
        kind = rpc_kind(handler)
        return rewrap(
            handler,
            unary=lambda inner: self._unary_response(inner, details, kind),
            stream=lambda inner: self._stream_response(inner, details, kind),
            writer=lambda inner: self._writer_response(inner, details, kind),
            streaming_requests=True,
        )

    def _requests(self, request: Any, details: grpc.HandlerCallDetails, kind: str) -> Any:
        if kind in ("unary", "server_stream"):
            self._received(details, kind)
            return request

        async def counted() -> AsyncIterator[Any]:
            async for item in request:
                self._received(details, kind)
                yield item

        return counted()

    def _unary_response(self, inner: Behavior, details: grpc.HandlerCallDetails, kind: str) -> Behavior:
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

    def _writer_response(self, inner: Behavior, details: grpc.HandlerCallDetails, kind: str) -> Behavior:
        """A streaming response written with context.write() (e.g. health Watch)."""

        async def handle(request: Any, context: aio.ServicerContext) -> None:
            call = self._begin(kind, details, context)
            try:
                await inner(self._requests(request, details, kind), context)
            except BaseException as exc:
                call.end(context, exc)
                raise
            call.end(context, None)

        return handle

    def _stream_response(self, inner: Behavior, details: grpc.HandlerCallDetails, kind: str) -> Behavior:
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


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for name, value in details.invocation_metadata or ():
        if name == key:
            return value if isinstance(value, str) else None
    return None


def _rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails every call with
    `code` without parsing the request."""

    async def reject(request_or_iterator: Any, context: aio.ServicerContext) -> None:
        await context.abort(code, message)

    def replace(_: Behavior) -> Behavior:
        return reject

    return rewrap(
        handler, unary=replace, stream=replace, writer=replace, streaming_requests=True, request_deserializer=None
    )


class AuthInterceptor(aio.ServerInterceptor):
    """Every call must carry `authorization: Bearer <key>` with a configured
    key, except methods of the services named in `public_services`
    (e.g. grpc.health.v1.Health for kubelet probes). Wrong or missing key:
    UNAUTHENTICATED, decided from the metadata before the request is parsed."""

    def __init__(self, auth: ApiKeyAuth, public_services: Iterable[str] = ()) -> None:
        self._auth = auth
        self._public_prefixes = tuple(f"/{name}/" for name in public_services)

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(self._public_prefixes):
            return await continuation(details)
        try:
            self._auth.authenticate(_metadata_value(details, "authorization"))
        except ServiceError as exc:
            handler = await continuation(details)
            if handler is None:
                return None
            return _rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, exc.message)
        return await continuation(details)


class RateLimitInterceptor(aio.ServerInterceptor):
    """Token bucket per client for the methods of `services`: the client is its
    API-key fingerprint when keys are configured (the key was already checked
    by AuthInterceptor), else its peer address without the port. Over the
    limit: RateLimited, which ErrorInterceptor maps to RESOURCE_EXHAUSTED with
    grpc-retry-pushback-ms."""

    def __init__(self, limiter: RateLimiter, services: Iterable[str], auth: ApiKeyAuth | None = None) -> None:
        self._limiter = limiter
        self._auth = auth
        self._prefixes = tuple(f"/{name}/" for name in services)

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefixes):
            return handler
        client = None
        if self._auth is not None:
            client = self._auth.identify(bearer_token(_metadata_value(details, "authorization")))
        limiter = self._limiter

        async def before(request: Any, context: aio.ServicerContext) -> None:
            limiter.check(client or grpc_peer_key(context.peer()))

        return rewrap(handler, unary=_first(before), stream=_first_stream(before), writer=_first(before))
