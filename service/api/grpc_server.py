"""The gRPC transport: QwenService servicer (wire <-> ChatParams), standard
health checking, reflection, and server construction."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

from ..auth import ApiKeyAuth
from ..chat import (
    ChatMessage,
    ChatParams,
    ChatService,
    LogprobToken,
    PreparedChat,
    ResponseFormat,
    ResponseFormatType,
    TokenLogprob,
)
from ..config import ConfigError, Settings
from ..engine.types import EngineStats, FinishReason, TokenEvent
from ..errors import InvalidArgument, Unavailable
from ..ratelimit import RateLimiter, limiter_from_settings
from ..tool_calls import CallDelta, ContentDelta, Tool, ToolCall, ToolCallParser, ToolChoice, ToolChoiceMode
from .interceptors import AuthInterceptor, ErrorInterceptor, RateLimitInterceptor, TelemetryInterceptor
from .replica import ReplicaNameInterceptor

_LOG = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["QwenService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Reflection is served under both protocol versions: grpcio-reflection only
# ships v1alpha, whose messages are byte-identical to v1's (see
# _reflection_v1_file), and tools that speak only v1 get UNIMPLEMENTED there.
REFLECTION_V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
REFLECTION_SERVICE_NAMES = [reflection.SERVICE_NAME, REFLECTION_V1_SERVICE_NAME]
# Health is reported for the whole server ("") and for the service by name.
HEALTH_SERVICES = ("", SERVICE_NAME)
# Liveness (the chart's livenessProbe): NOT_SERVING while the engine thread
# is wedged, i.e. requests are queued or running but it has made no progress
# for LIVENESS_STALL_SECONDS. The longest healthy step (a 512-token prefill
# chunk for a full batch on 2 cores) takes seconds, not tens of them.
LIVENESS_SERVICE_NAME = "qwen.Liveness"
LIVENESS_STALL_SECONDS = 30.0


def _messages(request_messages) -> list[ChatMessage]:
    return [
        ChatMessage(
            role=m.role,
            content=m.content,
            tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls),
            tool_call_id=m.tool_call_id,
            name=m.name,
        )
        for m in request_messages
    ]


_TOOL_CHOICE_MODES = {
    pb.ToolChoice.MODE_NONE: ToolChoiceMode.NONE,
    pb.ToolChoice.MODE_AUTO: ToolChoiceMode.AUTO,
    pb.ToolChoice.MODE_REQUIRED: ToolChoiceMode.REQUIRED,
    pb.ToolChoice.MODE_FUNCTION: ToolChoiceMode.FUNCTION,
}


def _tool_choice(request: pb.ChatRequest) -> ToolChoice | None:
    wire = request.tool_choice
    if not request.HasField("tool_choice") or wire.mode == pb.ToolChoice.MODE_UNSPECIFIED:
        return None
    if wire.mode not in _TOOL_CHOICE_MODES:  # a value from a newer proto
        raise InvalidArgument("tool_choice.mode", f"unknown mode {wire.mode}")
    if wire.function_name and wire.mode != pb.ToolChoice.MODE_FUNCTION:
        raise InvalidArgument("tool_choice.function_name", "is only allowed with MODE_FUNCTION")
    return ToolChoice(_TOOL_CHOICE_MODES[wire.mode], wire.function_name)


def _tool_calls(calls: list[ToolCall]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]


_RESPONSE_FORMAT_TYPES = {
    pb.ResponseFormat.TYPE_UNSPECIFIED: ResponseFormatType.TEXT,
    pb.ResponseFormat.TYPE_TEXT: ResponseFormatType.TEXT,
    pb.ResponseFormat.TYPE_JSON_OBJECT: ResponseFormatType.JSON_OBJECT,
    pb.ResponseFormat.TYPE_JSON_SCHEMA: ResponseFormatType.JSON_SCHEMA,
}


def _response_format(request: pb.ChatRequest) -> ResponseFormat | None:
    if not request.HasField("response_format"):
        return None
    wire = request.response_format
    if wire.type not in _RESPONSE_FORMAT_TYPES:  # a value from a newer proto
        raise InvalidArgument("response_format.type", f"unknown type {wire.type}")
    kind = _RESPONSE_FORMAT_TYPES[wire.type]
    if wire.json_schema and kind is not ResponseFormatType.JSON_SCHEMA:
        raise InvalidArgument("response_format.json_schema", "is only allowed with TYPE_JSON_SCHEMA")
    return ResponseFormat(kind, wire.json_schema)


def chat_params(request: pb.ChatRequest) -> ChatParams:
    """Wire -> service. Unset optional fields stay None (server defaults);
    0 on the legacy fields from clients without field presence reads as unset."""

    def present(field: str):
        return getattr(request, field) if request.HasField(field) else None

    max_tokens = present("max_tokens")
    return ChatParams(
        messages=_messages(request.messages),
        model=request.model,
        temperature=present("temperature"),
        max_tokens=max_tokens,
        top_p=present("top_p"),
        top_k=present("top_k"),
        repetition_penalty=present("repetition_penalty"),
        seed=present("seed"),
        stop=tuple(request.stop),
        response_format=_response_format(request),
        n=present("n"),
        logprobs=request.logprobs,
        top_logprobs=present("top_logprobs"),
        presence_penalty=present("presence_penalty"),
        frequency_penalty=present("frequency_penalty"),
        logit_bias=dict(request.logit_bias) or None,
        tools=[Tool(t.name, t.description, t.parameters) for t in request.tools],
        tool_choice=_tool_choice(request),
        parallel_tool_calls=present("parallel_tool_calls"),
    )


def _top_logprob(token: LogprobToken) -> pb.TopLogprob:
    return pb.TopLogprob(token=token.token, logprob=token.logprob, token_bytes=token.bytes, token_id=token.token_id)


def _token_logprob(entry: TokenLogprob) -> pb.TokenLogprob:
    chosen = entry.chosen
    return pb.TokenLogprob(
        token=chosen.token,
        logprob=chosen.logprob,
        token_bytes=chosen.bytes,
        token_id=chosen.token_id,
        top_logprobs=[_top_logprob(top) for top in entry.top],
    )


def _finish_reason(reason: FinishReason, parser: ToolCallParser | None = None) -> pb.FinishReason:
    """The proto's FINISH_REASON_<name> (FinishReason names match the
    proto's); an answer that ended on its own after tool calls (`parser`
    holds them) is TOOL_CALLS."""
    if parser is not None and parser.calls and reason is FinishReason.STOP:
        return pb.FINISH_REASON_TOOL_CALLS
    return pb.FinishReason.Value(f"FINISH_REASON_{reason.name}")


def _final(event: TokenEvent, parser: ToolCallParser | None = None) -> pb.ChatResponse:
    """The fields of a request's last message: is_final, finish_reason, usage."""
    reason, usage = event.finish_reason, event.usage
    if reason is None or usage is None:
        raise ValueError("not a final event")
    return pb.ChatResponse(
        is_final=True,
        finish_reason=_finish_reason(reason, parser),
        usage=pb.Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cached_prompt_tokens=usage.cached_prompt_tokens,
        ),
    )


def _tool_call_parser(prepared: PreparedChat) -> ToolCallParser | None:
    return ToolCallParser(prepared.tool_names) if prepared.tool_names else None


def _ended_the_request(event: TokenEvent, choices_left: int) -> bool:
    """A choice's final event ends the request when it is the last choice,
    or when it did not end by STOP or LENGTH (the others are aborted)."""
    return not choices_left or event.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH)


class QwenServicer(pb_grpc.QwenServiceServicer):
    """Starts without a model (health is NOT_SERVING while it loads); `attach`
    hands it the ChatService once the engine is up."""

    def __init__(self) -> None:
        self._chat_service: ChatService | None = None

    def attach(self, chat: ChatService) -> None:
        self._chat_service = chat

    @property
    def _chat(self) -> ChatService:
        if self._chat_service is None:
            raise Unavailable("the model is still loading")
        return self._chat_service

    async def _prepare(self, request: pb.ChatRequest, context: aio.ServicerContext) -> PreparedChat:
        return await self._chat.prepare_async(chat_params(request), timeout=context.time_remaining())

    def _logprobs(self, event: TokenEvent) -> list[pb.TokenLogprob]:
        return [] if event.logprobs is None else [_token_logprob(self._chat.token_logprob(event.logprobs))]

    async def Chat(self, request: pb.ChatRequest, context: aio.ServicerContext) -> pb.ChatResponse:
        prepared = await self._prepare(request, context)
        n = prepared.request.sampling.n
        parsers = [_tool_call_parser(prepared) for _ in range(n)]
        choices = [pb.Choice(index=index) for index in range(n)]
        pieces: list[list[str]] = [[] for _ in range(n)]
        choices_left = n
        async for event in self._chat.generate(prepared):
            choice, parser = choices[event.index], parsers[event.index]
            pieces[event.index].append(event.text)
            choice.logprobs.extend(self._logprobs(event))
            if event.finish_reason is None:
                continue
            choice.content = "".join(pieces[event.index])
            if parser is not None:  # tool-call markup becomes tool_calls, never content
                deltas = parser.feed(choice.content) + parser.flush()
                choice.content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
                choice.tool_calls.extend(_tool_calls(parser.calls))
            choice.finish_reason = _finish_reason(event.finish_reason, parser)  # TOOL_CALLS once the calls are parsed
            choices_left -= 1
            if _ended_the_request(event, choices_left):
                response = _final(event, parser)  # the usage of all choices
                # The top-level answer is choice 0 (cancelled: the reason of the event that ended it all).
                first = choices[0]
                response.finish_reason = first.finish_reason or response.finish_reason
                response.MergeFrom(
                    pb.ChatResponse(
                        id=prepared.request.request_id,
                        content=first.content if first.finish_reason else "".join(pieces[0]),
                        model=prepared.model,
                        logprobs=first.logprobs,
                        tool_calls=first.tool_calls,
                        choices=choices if n > 1 else [],
                    )
                )
                return response
        raise RuntimeError("engine ended a request without a final event")

    async def ChatStream(self, request: pb.ChatRequest, context: aio.ServicerContext) -> AsyncIterator[pb.ChatResponse]:
        prepared = await self._prepare(request, context)
        request_id = prepared.request.request_id
        n = prepared.request.sampling.n
        parsers = [_tool_call_parser(prepared) for _ in range(n)]
        choices_left = n
        index = 0
        async for event in self._chat.generate(prepared):
            parser = parsers[event.index]
            ended = event.finish_reason is not None
            if parser is None:
                content, calls = event.text, []
            else:  # tool-call markup becomes tool_calls, never content
                deltas = parser.feed(event.text) + (parser.flush() if ended else [])
                content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
                calls = [d.call for d in deltas if isinstance(d, CallDelta)]
            message = pb.ChatResponse(
                id=request_id,
                content=content,
                index=index,
                model=prepared.model,
                logprobs=self._logprobs(event),
                choice_index=event.index,
                tool_calls=_tool_calls(calls),
            )
            if event.finish_reason is not None:
                choices_left -= 1
                if _ended_the_request(event, choices_left):
                    message.MergeFrom(_final(event, parser))
                    yield message
                    return
                # One choice of several is done: its finish reason, the stream goes on.
                message.finish_reason = _finish_reason(event.finish_reason, parser)
            elif not (content or calls or message.logprobs):  # pieces that render as nothing yet are not sent
                continue
            yield message
            index += 1

    async def ListModels(self, request: pb.ListModelsRequest, context: aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    id=card.id, max_context_tokens=card.max_context_tokens, max_output_tokens=card.max_output_tokens
                )
                for card in self._chat.list_models()
            ]
        )

    async def CountTokens(self, request: pb.CountTokensRequest, context: aio.ServicerContext) -> pb.CountTokensResponse:
        count = await self._chat.count_tokens_async(_messages(request.messages), request.model)
        window = self._chat.list_models()[0].max_context_tokens
        return pb.CountTokensResponse(prompt_tokens=count, max_context_tokens=window, remaining_tokens=window - count)


class QwenHealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 (Check, Watch) plus two things the stock servicer lacks:
    - qwen.Liveness, judged at each Check from the engine's progress;
    - a drain ends every Watch stream after its NOT_SERVING message: an open
      Watch is a running RPC, so the server's graceful stop would otherwise
      wait for it until the whole drain timeout even on an idle replica.
    Written out rather than wrapped around grpcio-health's servicer: ending
    its Watch means cancelling it, possibly inside a `context.write`, and a
    write cancelled there left about 1 in 400 streams hanging until their
    deadline (reproduced: 40 watchers drained 30 times)."""

    def __init__(self) -> None:
        # Alive from the start: the startup probe covers the model load.
        self._status = {
            "": health_pb2.HealthCheckResponse.SERVING,
            LIVENESS_SERVICE_NAME: health_pb2.HealthCheckResponse.SERVING,
        }
        self._changed = asyncio.Condition()
        self._draining = False
        self._engine_stats: Callable[[], EngineStats] | None = None

    def watch_engine(self, stats: Callable[[], EngineStats]) -> None:
        self._engine_stats = stats

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        """Ignored once draining: NOT_SERVING is for good then."""
        async with self._changed:
            if not self._draining:
                self._status[service] = status
                self._changed.notify_all()

    async def begin_drain(self) -> None:
        """NOT_SERVING for good, to every watcher, then end the Watch streams."""
        async with self._changed:
            self._draining = True
            for service in self._status:
                self._status[service] = health_pb2.HealthCheckResponse.NOT_SERVING
            self._changed.notify_all()

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        if request.service == LIVENESS_SERVICE_NAME and self._engine_stats is not None:
            stalled = self._engine_stats().stalled_seconds(time.monotonic())
            if stalled > LIVENESS_STALL_SECONDS:
                _LOG.error("liveness: the engine made no progress for %.0f s with requests in flight", stalled)
                return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        """The current status, then every change; while draining the last
        word is NOT_SERVING (even for a service unknown here) and the stream
        ends OK. Statuses that change faster than the client reads are
        coalesced, as the protocol allows."""
        sent: health_pb2.HealthCheckResponse.ServingStatus | None = None

        def current() -> health_pb2.HealthCheckResponse.ServingStatus:
            if self._draining:
                return health_pb2.HealthCheckResponse.NOT_SERVING
            return self._status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

        def news() -> bool:
            return self._draining or current() != sent  # noqa: B023 (awaited within the iteration)

        while True:
            async with self._changed:
                await self._changed.wait_for(news)
                status, draining = current(), self._draining
            if status != sent:  # written outside the lock: a slow reader holds up nobody
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if draining:
                return


def _reflection_v1_file() -> None:
    """Add grpc/reflection/v1/reflection.proto to the default descriptor pool,
    derived from grpcio-reflection's v1alpha file: the two protocols differ
    only in the package name (same messages, fields and numbers), so the v1
    service can reuse the v1alpha servicer and message classes, and reflection
    can describe it like any other service."""
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(name)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    text = text_format.MessageToString(proto).replace('"grpc.reflection.v1alpha', '"grpc.reflection.v1')
    text = text.replace('".grpc.reflection.v1alpha.', '".grpc.reflection.v1.')
    proto = text_format.Parse(text, descriptor_pb2.FileDescriptorProto())
    proto.name = name
    proto.options.Clear()
    pool.Add(proto)


def enable_reflection(server: aio.Server, service_names: tuple[str, ...]) -> None:
    """Reflection v1alpha and v1 for service_names (and the reflection
    services themselves), one servicer behind both."""
    _reflection_v1_file()
    servicer = reflection.aio.ReflectionServicer((*service_names, *REFLECTION_SERVICE_NAMES))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for name in REFLECTION_SERVICE_NAMES:
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler}),)
        )


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def server_options(settings: Settings) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.so_reuseport", 0),  # a taken port is an error, not a silent second listener
        # Our own pings find dead clients, whose generations would otherwise
        # hold a batch slot until max_tokens.
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_time)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout)),
        # Ping enforcement: without these, C-core accepts a client ping at most
        # every 5 minutes (every 2 hours on a connection without calls) and
        # answers faster ones with GOAWAY too_many_pings, which would make
        # the SDKs' keepalive tear down healthy connections.
        # The C macro is GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS but
        # its string has no "recv": "grpc.http2.min_recv_ping_..." (seen in
        # public server code) is silently ignored (checked with grpcio 1.85).
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(settings.keepalive_min_ping_interval)),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
        # Larger requests get RESOURCE_EXHAUSTED from grpcio before they are parsed.
        ("grpc.max_receive_message_length", settings.max_request_bytes),
    ]
    if settings.max_connection_age > 0:
        # GOAWAY after this age makes clients reconnect and re-resolve DNS;
        # calls still running get the grace period before a hard close.
        options += [
            ("grpc.max_connection_age_ms", _ms(settings.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(settings.max_connection_age_grace)),
        ]
    return options


def build_interceptors(
    settings: Settings,
    telemetry: TelemetryInterceptor | None = None,
    *,
    auth: ApiKeyAuth | None = None,
    limiter: RateLimiter | None = None,
) -> list[aio.ServerInterceptor]:
    """Outermost first: telemetry (metrics and tracing, so it sees the final
    status code of every call, refusals included), auth (reject before
    parsing), error mapping, the replica-name header, rate limit (its
    RateLimited error is mapped by ErrorInterceptor)."""
    interceptors: list[aio.ServerInterceptor] = [] if telemetry is None else [telemetry]
    if auth is None:
        auth = ApiKeyAuth.from_settings(settings)
    if auth is not None:
        public = []
        if settings.auth_public_health:
            public.append(HEALTH_SERVICE_NAME)
        if settings.auth_public_reflection:
            public += REFLECTION_SERVICE_NAMES
        interceptors.append(AuthInterceptor(auth, public))
    interceptors.append(ErrorInterceptor())
    interceptors.append(ReplicaNameInterceptor(settings.replica_name, f"/{SERVICE_NAME}/"))
    if limiter is None:
        limiter = limiter_from_settings(settings)
    if limiter is not None:
        interceptors.append(RateLimitInterceptor(limiter, [SERVICE_NAME], auth))
    return interceptors


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from mounted PEM files; with a client CA, mutual TLS (a client
    without a certificate signed by that CA cannot complete the handshake)."""
    if not settings.tls_cert_file:
        return None
    try:
        cert = pathlib.Path(settings.tls_cert_file).read_bytes()
        key = pathlib.Path(settings.tls_key_file or "").read_bytes()  # set with tls_cert_file (Settings checks)
        client_ca = pathlib.Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    except OSError as exc:
        raise ConfigError(f"cannot read a TLS file: {exc}") from exc
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def build_server(
    settings: Settings,
    servicer: QwenServicer,
    telemetry: TelemetryInterceptor | None = None,
    *,
    auth: ApiKeyAuth | None = None,
    limiter: RateLimiter | None = None,
) -> tuple[aio.Server, QwenHealthServicer, int]:
    """Create the server with every service registered (interceptors: see
    build_interceptors; auth and limiter default to what the settings ask
    for). Returns (server, health servicer, bound gRPC port)."""
    credentials = server_credentials(settings)
    interceptors = build_interceptors(settings, telemetry, auth=auth, limiter=limiter)
    server = aio.server(interceptors=interceptors, options=server_options(settings))
    pb_grpc.add_QwenServiceServicer_to_server(servicer, server)
    health_servicer = QwenHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        enable_reflection(server, (SERVICE_NAME, HEALTH_SERVICE_NAME))
    address = f"{settings.host}:{settings.grpc_port}"
    try:  # grpcio raises RuntimeError for a taken port (older versions returned 0)
        port = (
            server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
        )
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot bind gRPC to {settings.host}:{settings.grpc_port}: address in use or not available")
    return server, health_servicer, port


async def set_serving(health_servicer: QwenHealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in HEALTH_SERVICES:
        await health_servicer.set(name, status)
