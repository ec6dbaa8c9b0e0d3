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
import logging
import math
import pathlib
import socket
from typing import Any, AsyncIterator, Awaitable, Sequence, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..chat import ChatService, PreparedChat
from ..config import Settings
from ..engine.types import FinishReason, TokenEvent
from ..errors import (
    ContextLengthExceeded,
    ErrorCode,
    InvalidArgument,
    ModelNotFound,
    Overloaded,
    ServiceError,
    Unavailable,
)
from . import openai_protocol as oai

_LOG = logging.getLogger(__name__)

STATIC_DIR = pathlib.Path(__file__).resolve().parent / "static"
# create_app's default; qwen-serve passes --max-request-bytes (the gRPC limit too).
MAX_BODY_BYTES = 4 * 1024 * 1024

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
_FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}
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
    if isinstance(exc, ContextLengthExceeded):
        code = "context_length_exceeded"  # OpenAI's code; clients key on it
    param = exc.field if isinstance(exc, InvalidArgument) else ("model" if isinstance(exc, ModelNotFound) else None)
    return status, oai.ErrorDetail(message=exc.message, type=kind, param=param, code=code)


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
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_seconds)))
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
    return _error_response(500, oai.ErrorDetail(message="internal error", type="server_error", code="internal_error"))


# ---------------------------------------------------------------- helpers


def _chat(request: Request) -> ChatService:
    chat = request.app.state.backend.chat
    if chat is None:
        raise Unavailable("the model is still loading")
    return chat


async def _read_body(request: Request) -> bytes:
    limit = request.app.state.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body exceeds {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body exceeds {limit} bytes")
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
    return Response(request.app.state.index_html, media_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})  # fmt: skip


async def health(request: Request) -> Response:
    """Mirrors grpc.health.v1 for the whole server: 200 SERVING, otherwise
    503 NOT_SERVING (loading the model, or draining after SIGTERM)."""
    serving = request.app.state.backend.serving
    return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)


def _model_object(card: Any, created: int) -> oai.ModelObject:
    return oai.ModelObject(
        id=card.id, created=created, max_context_tokens=card.max_context_tokens, max_output_tokens=card.max_output_tokens
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
    wire = oai.parse_request(await _read_body(request))
    prepared = await chat.prepare_async(oai.to_chat_params(wire))  # tokenizes off the event loop
    include_usage = bool(wire.stream_options and wire.stream_options.include_usage)
    headers = _request_id_headers(request, _completion_id(prepared))
    try:
        if wire.stream:
            response = await _stream(request, chat, prepared, include_usage)
        else:
            response = await until_disconnect(request, _complete(chat, prepared))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the generation is already aborted
    response.headers.update(headers)
    return response


async def _complete(chat: ChatService, prepared: PreparedChat) -> Response:
    pieces: list[str] = []
    async for event in chat.generate(prepared):
        pieces.append(event.text)
        if event.finished:
            if event.finish_reason is FinishReason.CANCELLED:
                raise Unavailable("the server stopped before the answer was complete; retry")
            usage = event.usage
            assert usage is not None
            body = oai.ChatCompletion(
                id=_completion_id(prepared),
                created=oai.now(),
                model=prepared.model,
                choices=[
                    oai.Choice(
                        message=oai.AssistantMessage(content="".join(pieces)),
                        finish_reason=_FINISH_REASONS[event.finish_reason],
                    )
                ],
                usage=oai.Usage(
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    total_tokens=usage.total_tokens,
                ),
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
    return EventStreamResponse(_sse_body(writer, first, events, include_usage))


async def _sse_body(
    writer: oai.ChunkWriter, first: TokenEvent, events: AsyncIterator[TokenEvent], include_usage: bool
) -> AsyncIterator[bytes]:
    try:
        event = first
        out = writer.role()
        while True:
            if event.finished:
                if event.finish_reason is FinishReason.CANCELLED:
                    _, detail = error_detail(Unavailable("the server stopped before the answer was complete; retry"))
                    yield out + writer.error(detail)
                    return
                out += writer.finish(event.text, _FINISH_REASONS[event.finish_reason])
                if include_usage and event.usage is not None:
                    usage = event.usage
                    out += writer.usage(oai.Usage(prompt_tokens=usage.prompt_tokens,
                                                  completion_tokens=usage.completion_tokens,
                                                  total_tokens=usage.total_tokens))  # fmt: skip
                yield out + writer.DONE
                return
            if event.text:  # pieces that render as nothing yet are not sent (as over gRPC)
                out += writer.content(event.text)
            if out:
                yield out
                out = b""
            event = await anext(events)
    except ServiceError as exc:  # after the headers: report in-band, as OpenAI does
        _, detail = error_detail(exc)
        yield writer.error(detail)
    except Exception:  # a bug: log it, tell the client it was internal, end the stream cleanly
        _LOG.exception("unhandled error while streaming %s", writer.request_id)
        yield writer.error(oai.ErrorDetail(message="internal error", type="server_error", code="internal_error"))
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
    def capture_signals(self):  # type: ignore[override]
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


class HttpServer:
    """uvicorn serving `app` inside the running event loop."""

    def __init__(self, settings: Settings, app: Any, *, shutdown_grace: float = 1.0) -> None:
        self._socket = _bind(settings.host, settings.http_port)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,  # keep qwen-serve's logging setup
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=shutdown_grace,
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
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, close idle connections, give responses still being
        sent up to `grace` seconds (default: shutdown_grace), then cancel them."""
        if self._task is None:
            return
        if grace is not None:
            self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        await self._task
