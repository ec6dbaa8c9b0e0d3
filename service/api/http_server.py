"""The HTTP transport: OpenAI-compatible routes (wire <-> ChatParams via
openai_protocol), the web chat page, health, and an embedded uvicorn server
that runs in the same event loop as the gRPC server and shares its
ChatService.

Cross-cutting concerns (auth, metrics, tracing, rate limits) belong in ASGI
middleware passed to `create_app(..., middleware=[...])`, not in the routes.
ServiceError -> HTTP status mapping lives in one exception handler, the
counterpart of the gRPC ErrorInterceptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import pathlib
import resource
import socket
from collections.abc import AsyncIterator, Awaitable, Generator, Sequence
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..chat import ChatService, PreparedChat
from ..config import Settings
from ..engine.types import FinishReason, TokenEvent, Usage
from ..errors import (
    INTERNAL_ERROR_MESSAGE,
    ContextLengthExceeded,
    ErrorCode,
    InternalError,
    InvalidArgument,
    ModelNotFound,
    Overloaded,
    ServiceError,
    SlowConsumer,
    Unavailable,
)
from . import openai_protocol as oai

_LOG = logging.getLogger(__name__)

STATIC_DIR = pathlib.Path(__file__).resolve().parent / "static"
# create_app's default: the server's (qwen-serve passes --max-request-bytes, the gRPC limit too).
MAX_BODY_BYTES: int = Settings.model_fields["max_request_bytes"].default
# Kernel send buffer of each HTTP connection. Linux otherwise grows it up to
# tcp_wmem's maximum (4 MiB) for a client that does not read, which then
# absorbs a whole long answer: the server never sees backpressure, and 1000
# such connections could pin 4 GB of kernel memory. An SSE stream needs a
# few KB per second, so this costs no throughput that matters.
HTTP_SEND_BUFFER_BYTES = 64 * 1024

# ServiceError code -> (HTTP status, OpenAI error type, error code)
STATUS_BY_CODE: dict[ErrorCode, tuple[int, str, str]] = {
    ErrorCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    ErrorCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    ErrorCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "server_overloaded"),
    ErrorCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    ErrorCode.INTERNAL: (500, "server_error", "internal_error"),
    ErrorCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}
REQUEST_ID_HEADER = "x-request-id"
# A client's x-request-id is echoed only if it is this short and printable ASCII.
MAX_CLIENT_REQUEST_ID = 256

T = TypeVar("T")


class HttpBackend:
    """What the routes need from the replica. qwen-serve sets `chat` once the
    model is loaded and flips `serving` exactly when gRPC health flips."""

    def __init__(self) -> None:
        self.chat: ChatService | None = None
        self.serving = False


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


# ------------------------------------------------------------------ errors


def error_detail(exc: ServiceError) -> tuple[int, oai.ErrorDetail]:
    status, kind, code = STATUS_BY_CODE[exc.code]
    if isinstance(exc, SlowConsumer):
        code = "slow_consumer"
    elif isinstance(exc, ContextLengthExceeded):
        code = "context_length_exceeded"  # OpenAI's code; clients key on it
    param = exc.field if isinstance(exc, InvalidArgument) else ("model" if isinstance(exc, ModelNotFound) else None)
    return status, oai.ErrorDetail(message=exc.message, type=kind, param=param, code=code)


def _internal_error_detail() -> oai.ErrorDetail:
    """What a client is told of an unexpected failure (the details go to the log)."""
    return error_detail(InternalError(INTERNAL_ERROR_MESSAGE))[1]


def retry_after(exc: Overloaded) -> dict[str, str]:
    """The Retry-After header of a 429: whole seconds, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(exc.retry_after_seconds)))}


def _error_response(status: int, detail: oai.ErrorDetail, headers: dict[str, str] | None = None) -> Response:
    return Response(
        oai.ErrorResponse(error=detail).model_dump_json(),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def client_request_id(request: Request) -> str | None:
    """The client's x-request-id, if it is one worth echoing."""
    value = request.headers.get(REQUEST_ID_HEADER)
    if value and len(value) <= MAX_CLIENT_REQUEST_ID and value.isascii() and value.isprintable():
        return value
    return None


def _request_id_headers(request: Request, fallback: str | None = None) -> dict[str, str]:
    """x-request-id: the client's, else `fallback` (the completion id)."""
    request_id = client_request_id(request) or fallback
    return {REQUEST_ID_HEADER: request_id} if request_id else {}


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    status, detail = error_detail(exc)
    headers = _request_id_headers(request)
    if isinstance(exc, Overloaded):
        headers.update(retry_after(exc))
    return _error_response(status, detail, headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {
        404: "not_found",
        405: "method_not_allowed",
        413: "request_too_large",
        415: "unsupported_media_type",
    }.get(exc.status_code)
    headers = {**(exc.headers or {}), **_request_id_headers(request)}
    return _error_response(exc.status_code, oai.ErrorDetail(message=str(exc.detail), type=kind, code=code), headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this response and uvicorn logs the traceback;
    # the client only learns that it was an internal error.
    return _error_response(500, _internal_error_detail())


# ---------------------------------------------------------------- helpers


def _chat(request: Request) -> ChatService:
    chat = request.app.state.backend.chat
    if chat is None:
        raise Unavailable("the model is still loading")
    return chat


# An oversized body is read and discarded up to this multiple of the limit
# before the 413 goes out: closing a socket with unread data makes the kernel
# send a reset, and the client then sees "connection reset" instead of the
# answer (nginx's lingering close). Anything larger is cut off unread; the
# body timeout bounds the time either way.
OVERSIZE_DRAIN_FACTOR = 16


async def _read_body(request: Request) -> bytes:
    limit = request.app.state.max_body_bytes
    declared = request.headers.get("content-length")
    too_large = HTTPException(413, f"request body exceeds {limit} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limit * OVERSIZE_DRAIN_FACTOR:
        raise too_large
    body = bytearray()
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit * OVERSIZE_DRAIN_FACTOR:
                raise too_large
            if received <= limit:
                body += chunk
    except ClientDisconnect:  # gone mid-body (or cut by --http-body-timeout): nobody to answer, nothing to log
        raise ClientDisconnected() from None
    if received > limit:
        raise too_large
    return bytes(body)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it if the client disconnects first (raising
    ClientDisconnected). Cancelling a generation closes its event iterator,
    which aborts the request in the engine and frees its slot — the same path
    a gRPC cancel takes."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself was cancelled (server shutdown)
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected()


class EventStreamResponse(StreamingResponse):
    """SSE response whose body iterator is always closed when the response
    ends, whether it finished, failed, or the client disconnected (Starlette
    cancels the sending task then; closing the iterator aborts the request)."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._body = body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()  # type: ignore[attr-defined]


# ----------------------------------------------------------------- routes


async def index(request: Request) -> Response:
    return Response(
        request.app.state.index_html, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
    )


async def health(request: Request) -> Response:
    """Mirrors grpc.health.v1 for the whole server: 200 SERVING, otherwise
    503 NOT_SERVING (loading the model, or draining after SIGTERM)."""
    serving = request.app.state.backend.serving
    return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)


def _model_object(card: Any, created: int) -> oai.ModelObject:
    return oai.ModelObject(
        id=card.id,
        created=created,
        max_context_tokens=card.max_context_tokens,
        max_output_tokens=card.max_output_tokens,
    )


async def list_models(request: Request) -> Response:
    created = request.app.state.created
    models = oai.ModelList(data=[_model_object(card, created) for card in _chat(request).list_models()])
    return Response(models.model_dump_json(), media_type="application/json")


async def retrieve_model(request: Request) -> Response:
    chat = _chat(request)
    name = chat.resolve_model(request.path_params["model"])
    card = next(card for card in chat.list_models() if card.id == name)
    return Response(_model_object(card, request.app.state.created).model_dump_json(), media_type="application/json")


def _require_json(request: Request) -> None:
    """Only application/json bodies: a web page can POST text/plain or form
    data cross-origin without a CORS preflight, so parsing those as JSON
    would let any page make its visitors' browsers use a keyless server."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise HTTPException(415, f"Content-Type must be application/json, got {media_type or 'none'!r}")


def _completion_id(prepared: PreparedChat) -> str:
    return prepared.request.request_id.replace("chat-", "chatcmpl-", 1)


async def chat_completions(request: Request) -> Response:
    chat = _chat(request)
    _require_json(request)
    try:
        wire = oai.parse_request(await _read_body(request))
        prepared = await chat.prepare_async(oai.to_chat_params(wire))  # tokenizes off the event loop
        include_usage = bool(wire.stream_options and wire.stream_options.include_usage)
        headers = _request_id_headers(request, _completion_id(prepared))
        if wire.stream:
            response = await _stream(request, chat, prepared, include_usage)
        else:
            response = await until_disconnect(request, _complete(chat, prepared))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; a generation it started is already aborted
    response.headers.update(headers)
    return response


def _usage(usage: Usage) -> oai.Usage:
    return oai.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=oai.PromptTokensDetails(cached_tokens=usage.cached_prompt_tokens),
    )


def _logprobs(chat: ChatService, event: TokenEvent) -> oai.TokenLogprob | None:
    return None if event.logprobs is None else oai.token_logprob(chat.token_logprob(event.logprobs))


async def _complete(chat: ChatService, prepared: PreparedChat) -> Response:
    n = prepared.request.sampling.n
    pieces: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[oai.TokenLogprob]] = [[] for _ in range(n)]
    finish_reasons: list[str] = [""] * n
    async for event in chat.generate(prepared):
        pieces[event.index].append(event.text)
        entry = _logprobs(chat, event)
        if entry is not None:
            logprobs[event.index].append(entry)
        if event.finish_reason is not None:  # a choice's final event
            if event.finish_reason is FinishReason.CANCELLED:
                raise Unavailable("the server stopped before the answer was complete; retry")
            finish_reasons[event.index] = event.finish_reason.value
        if event.finished and all(finish_reasons):  # the last event: the request's usage
            usage = event.usage
            assert usage is not None
            body = oai.ChatCompletion(
                id=_completion_id(prepared),
                created=oai.now(),
                model=prepared.model,
                choices=[
                    oai.Choice(
                        index=index,
                        message=oai.AssistantMessage(content="".join(pieces[index])),
                        finish_reason=finish_reasons[index],
                        logprobs=oai.ChoiceLogprobs(content=logprobs[index])
                        if prepared.request.sampling.logprobs
                        else None,
                    )
                    for index in range(n)
                ],
                usage=_usage(usage),
            )
            return Response(body.model_dump_json(), media_type="application/json")
    raise RuntimeError("engine ended a request without a final event")


async def _stream(request: Request, chat: ChatService, prepared: PreparedChat, include_usage: bool) -> Response:
    """Headers go out with the first token, like gRPC's initial metadata: an
    overloaded or failing request still gets its proper status (429, 503, ...)
    instead of a 200 followed by an in-band error."""
    events = chat.generate(prepared)
    first = await until_disconnect(request, anext(events))
    writer = oai.ChunkWriter(_completion_id(prepared), prepared.model, include_usage)
    return EventStreamResponse(_sse_body(chat, writer, prepared.request.sampling.n, first, events, include_usage))


async def _sse_body(
    chat: ChatService,
    writer: oai.ChunkWriter,
    n: int,
    first: TokenEvent,
    events: AsyncIterator[TokenEvent],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """Every choice's chunks carry its index; each choice ends with its own
    finish chunk, and the usage and [DONE] follow the last."""
    try:
        event = first
        out = b"".join(writer.role(index) for index in range(n))
        choices_left = n
        while True:
            logprobs = _logprobs(chat, event)
            if event.finish_reason is not None:  # a choice's final event
                if event.finish_reason is FinishReason.CANCELLED:
                    _, detail = error_detail(Unavailable("the server stopped before the answer was complete; retry"))
                    yield out + writer.error(detail)
                    return
                out += writer.finish(event.text, event.finish_reason.value, event.index, logprobs)
                choices_left -= 1
                if not choices_left:
                    if include_usage and event.usage is not None:
                        out += writer.usage(_usage(event.usage))
                    yield out + writer.DONE
                    return
            elif event.text or logprobs:  # pieces that render as nothing yet are not sent (as over gRPC)
                out += writer.content(event.text, event.index, logprobs)
            if out:
                yield out
                out = b""
            event = await anext(events)
    except ServiceError as exc:  # after the headers: report in-band, as OpenAI does
        _, detail = error_detail(exc)
        yield writer.error(detail)
    except Exception:  # a bug: log it, tell the client it was internal, end the stream cleanly
        _LOG.exception("unhandled error while streaming %s", writer.request_id)
        yield writer.error(_internal_error_detail())
    finally:
        await events.aclose()  # type: ignore[attr-defined]


# ------------------------------------------------------------------- app


def create_app(
    backend: HttpBackend,
    *,
    middleware: Sequence[Middleware] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
    cors_allowed_origins: Sequence[str] = (),
) -> Starlette:
    """The ASGI app. `middleware` wraps every route (outermost first):
    the place for auth (api/http_access.py), metrics and tracing. Bodies
    above max_body_bytes (qwen-serve: --max-request-bytes) get 413.
    Browsers may call the API cross-origin only from cors_allowed_origins
    (qwen-serve: --cors-allowed-origins; none by default)."""
    if cors_allowed_origins:
        # Outermost: a preflight carries no API key and must not meet auth.
        cors = Middleware(
            CORSMiddleware,
            allow_origins=list(cors_allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER],
        )
        middleware = [cors, *middleware]
    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        middleware=list(middleware),
        exception_handlers={
            ServiceError: _service_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
    app.state.backend = backend
    app.state.max_body_bytes = max_body_bytes
    app.state.created = oai.now()
    app.state.index_html = (STATIC_DIR / "index.html").read_bytes()
    return app


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: qwen-serve owns SIGTERM/SIGINT
    and stops both transports through its drain sequence."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    """Bind now, so a taken port fails at startup like the gRPC port does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind HTTP to {host}:{port}: {exc}") from exc
    sock.setblocking(False)
    return sock


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout: float
    body_timeout: float
    write_timeout: float


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the connection bounds uvicorn lacks.

    uvicorn times out only idle keep-alive connections, and only after a
    response (timeout_keep_alive). A connection that never completes its
    headers (silent, or slowloris sending a byte at a time) or its body, or
    never reads its response, stays open forever; limit_concurrency counts
    such connections but refuses only requests whose headers completed, so it
    bounds none of them. The bounds therefore live here, at the protocol: it
    sees every byte and every pause of the transport, and closing the
    transport is an ordinary disconnect for the app (a request cut mid-body
    or mid-response is cancelled like any other). One timer per connection:
    headers from the connection's start or a new request's first byte, then
    the body from the end of the headers; a response that cannot be written
    (send buffer full) has its own timer."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._read_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._limits.max_connections:
            # Refused before reading anything (answering would mean reading a request).
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HTTP_SEND_BUFFER_BYTES)
        self._arm_read(self._limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm_read(None)
        self._arm_write(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_read(self._limits.header_timeout)  # the first byte of a request on a kept-alive connection
        super().data_received(data)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm_read(self._limits.body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._arm_read(None)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_write(self._limits.write_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._arm_write(None)

    def _arm_read(self, seconds: float | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer = None if seconds is None else self.loop.call_later(seconds, self._read_timed_out)

    def _arm_write(self, seconds: float | None) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
        self._write_timer = None if seconds is None else self.loop.call_later(seconds, self._write_timed_out)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        self.transport.close()

    def _write_timed_out(self) -> None:
        self._write_timer = None
        self.transport.abort()  # close() would wait for the buffer to drain, which it does not


def connection_limit(configured: int) -> int:
    """At most half the file-descriptor limit goes to HTTP connections, so
    gRPC, the model files and the metrics listener keep theirs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or configured <= soft // 2:
        return configured
    _LOG.warning("--http-max-connections %d lowered to %d (half the file-descriptor limit)", configured, soft // 2)
    return soft // 2


class HttpServer:
    """uvicorn serving `app` inside the running event loop."""

    def __init__(self, settings: Settings, app: Any, *, shutdown_grace: float = 1.0) -> None:
        self._socket = _bind(settings.host, settings.http_port)
        self.port: int = self._socket.getsockname()[1]
        limits = ConnectionLimits(
            max_connections=connection_limit(settings.http_max_connections),
            header_timeout=settings.http_header_timeout,
            body_timeout=settings.http_body_timeout,
            write_timeout=settings.http_write_timeout,
        )
        config = uvicorn.Config(
            app,
            # uvicorn annotates a protocol class, and whole seconds where it
            # takes any number (asyncio timers): both are taken as they are.
            http=functools.partial(BoundedHttpProtocol, limits=limits),  # type: ignore[arg-type]
            timeout_keep_alive=settings.http_keepalive_timeout,  # type: ignore[arg-type]
            log_config=None,  # keep qwen-serve's logging setup
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=shutdown_grace,  # type: ignore[arg-type]
        )
        self._server = _EmbeddedUvicorn(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="http-server")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("HTTP server exited during startup")
            await asyncio.sleep(0.01)

    @property
    def task(self) -> asyncio.Task[None]:
        """The serving task, from start() on."""
        if self._task is None:
            raise RuntimeError("the HTTP server has not been started")
        return self._task

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, close idle connections, give responses still being
        sent up to `grace` seconds (default: shutdown_grace), then cancel them."""
        if self._task is None:
            return
        if grace is not None:
            self._server.config.timeout_graceful_shutdown = grace  # type: ignore[assignment]  # seconds, as above
        self._server.should_exit = True
        await self._task
