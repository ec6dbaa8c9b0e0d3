"""Python client SDK for qwen-grpc (distribution `qwen-grpc-client`).

    from qwen_grpc_client import QwenClient
    with QwenClient("dns:///qwen-headless.default.svc.cluster.local:50051") as client:
        print(client.chat([{"role": "user", "content": "Hi"}], timeout=30).content)
        for piece in client.stream([{"role": "user", "content": "Hi"}], temperature=0):
            print(piece.content, end="", flush=True)
        # The turns of one conversation on one replica (its prefix cache):
        client.chat(history, session_id="conversation-42")

`connect()` returns a channel set up for a fleet of replicas behind a headless
Service: round_robin over every resolved address, client-side health checks,
transparent retry of UNAVAILABLE (a refused call did no work), keepalive,
faster DNS re-resolution, optional TLS and API key, and W3C `traceparent`
propagation when OpenTelemetry is active. Calls given a `session_id=` go
over a second channel that hashes that key to a replica (conversation
affinity, see channel.py). clients/python/README.md shows an example for each
capability.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
from grpc import aio

from .channel import (
    call_metadata,
    channel_credentials,
    channel_options,
    connect,
    connect_async,
    fleet_channel,
    service_config,
    session_metadata,
    target_of,
)
from .pb.qwen import qwen_service_pb2 as pb
from .pb.qwen import qwen_service_pb2_grpc as pb_grpc
from .wire import REPLICA_METADATA_KEY, SESSION_METADATA_KEY

__all__ = [
    "AsyncChatStream",
    "AsyncQwenClient",
    "ChatResult",
    "ChatStream",
    "Choice",
    "QwenClient",
    "build_request",
    "replica_of",
    "channel_credentials",
    "channel_options",
    "connect",
    "connect_async",
    "finish_reason_name",
    "fleet_channel",
    "call_metadata",
    "session_metadata",
    "service_config",
    "target_of",
    "REPLICA_METADATA_KEY",
    "SESSION_METADATA_KEY",
]

# A generation of max_tokens on a busy CPU replica can take minutes; callers
# that want less pass timeout= per call.
DEFAULT_TIMEOUT_SECONDS = 120.0


def _messages(messages: Iterable[Mapping[str, str] | tuple[str, str]]) -> list[pb.Message]:
    out = []
    for message in messages:
        role, content = (message["role"], message["content"]) if isinstance(message, Mapping) else message
        out.append(pb.Message(role=role, content=content))
    return out


def build_request(
    messages: Iterable[Mapping[str, str] | tuple[str, str]],
    *,
    model: str = "",
    temperature: float | None = None,
    max_tokens: int | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    json_schema: Mapping[str, Any] | str | type | None = None,
    json_mode: bool = False,
    n: int | None = None,
    logprobs: bool = False,
    top_logprobs: int | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logit_bias: Mapping[int, float] | None = None,
) -> pb.ChatRequest:
    """Only the parameters you pass are sent; the rest take server defaults.

    Structured output: `json_schema=` (a JSON Schema as a dict or JSON text,
    or a pydantic model class) makes the server constrain the answer to JSON
    valid against it; `json_mode=True` to any JSON object.

    `n=` choices from one prefill of the prompt (choice i samples with
    seed + i); `logprobs=True` (and `top_logprobs=` 0..20 alternatives) for
    each token's logprob; `presence_penalty=` / `frequency_penalty=` in
    [-2, 2] as OpenAI's; `logit_bias=` {token id: bias in [-100, 100]}."""
    request = pb.ChatRequest(
        messages=_messages(messages),
        model=model,
        stop=list(stop),
        logprobs=logprobs,
        logit_bias=dict(logit_bias or {}),
    )
    if json_schema is not None:
        if hasattr(json_schema, "model_json_schema"):  # a pydantic model, without importing pydantic
            json_schema = json_schema.model_json_schema()
        text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        request.response_format.CopyFrom(pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=text))
    elif json_mode:
        request.response_format.CopyFrom(pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_OBJECT))
    for name, value in (
        ("temperature", temperature),
        ("max_tokens", max_tokens),
        ("top_p", top_p),
        ("top_k", top_k),
        ("repetition_penalty", repetition_penalty),
        ("seed", seed),
        ("n", n),
        ("top_logprobs", top_logprobs),
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
    ):
        if value is not None:
            setattr(request, name, value)
    return request


def finish_reason_name(response: pb.ChatResponse | pb.Choice) -> str:
    """ "stop" | "length" | "cancelled" ("" on non-final messages)."""
    if not response.finish_reason:
        return ""
    return pb.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of the n answers of a chat() call."""

    index: int
    content: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    # With logprobs=True: pb.TokenLogprob per generated token (token, logprob, token_bytes, token_id, top_logprobs).
    logprobs: tuple[pb.TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class ChatResult:
    id: str
    content: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    model: str
    # The replica that answered (its `qwen-replica` header: the pod name on
    # Kubernetes); "" from servers that do not send it.
    replica: str = ""
    # Prompt tokens the replica took from its prefix cache (0 from servers without one).
    cached_prompt_tokens: int = 0
    # With logprobs=True: one pb.TokenLogprob per generated token (of choice 0).
    logprobs: tuple[pb.TokenLogprob, ...] = ()
    # Every choice, choice 0 (the fields above) first; one unless n > 1 was asked.
    # completion_tokens counts the tokens of all of them.
    choices: tuple[Choice, ...] = ()

    @classmethod
    def from_response(cls, response: pb.ChatResponse, replica: str = "") -> ChatResult:
        choices = tuple(
            Choice(c.index, c.content, finish_reason_name(c), tuple(c.logprobs)) for c in response.choices
        ) or (Choice(0, response.content, finish_reason_name(response), tuple(response.logprobs)),)
        return cls(
            id=response.id,
            content=response.content,
            finish_reason=finish_reason_name(response),
            prompt_tokens=response.usage.prompt_tokens,
            completion_tokens=response.usage.completion_tokens,
            model=response.model,
            replica=replica,
            cached_prompt_tokens=response.usage.cached_prompt_tokens,
            logprobs=tuple(response.logprobs),
            choices=choices,
        )


class ChatStream:
    """The messages of one ChatStream call, as an iterator. The last message
    has is_final, finish_reason and usage. With n > 1 each message says its
    choice (`choice_index`) and each choice's last one has finish_reason;
    with logprobs each carries its tokens' `logprobs`. cancel() (or leaving a `with`
    block, or close()) cancels the generation on the server; a caller that
    stops iterating early should do one of these."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> pb.ChatResponse:
        return next(self._call)

    def cancel(self) -> bool:
        """True if the call was still running and is now cancelled."""
        return self._call.cancel()

    close = cancel

    def replica(self) -> str:
        """The replica serving this stream; waits for the first message."""
        return replica_of(self._call.initial_metadata())

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class AsyncChatStream:
    """ChatStream for asyncio: `async for`; cancel() or cancelling the task
    that iterates cancels the generation on the server."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._responses: AsyncIterator[pb.ChatResponse] = call.__aiter__()

    def __aiter__(self) -> AsyncChatStream:
        return self

    async def __anext__(self) -> pb.ChatResponse:
        return await self._responses.__anext__()

    def cancel(self) -> bool:
        return self._call.cancel()

    close = cancel

    async def replica(self) -> str:
        """The replica serving this stream; waits for the first message."""
        return replica_of(await self._call.initial_metadata())

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


def replica_of(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The `qwen-replica` response header: which replica served a call."""
    return next((str(value) for key, value in metadata or () if key == REPLICA_METADATA_KEY), "")


def _timeout(timeout: float | None, default: float | None) -> float | None:
    return default if timeout is None else timeout


class _SessionRouting:
    """Calls with a session key use the affinity (ring_hash) channel's stub,
    the others the round_robin one."""

    _stub: pb_grpc.QwenServiceStub
    _affinity_stub: pb_grpc.QwenServiceStub

    def _stub_for(self, session_id: str | None) -> pb_grpc.QwenServiceStub:
        return self._stub if session_id is None else self._affinity_stub


class QwenClient(_SessionRouting):
    """Blocking client. `timeout` (seconds) is the default deadline of every
    call; each method takes its own `timeout=` too. Keyword options are those
    of connect(): api_key, tls, root_certificates, client_certificate_chain,
    client_private_key, keepalive_seconds, dns_refresh_seconds, ...
    With `channel=` the caller owns the channel (and its metadata), and
    session_id= only adds the header: affinity is then up to that channel.

    chat() and stream() take `session_id=`: calls with a key go over a second
    channel (ring_hash on the key; it opens connections only once used), calls
    without one keep round_robin over every replica."""

    def __init__(
        self,
        target: str,
        *,
        channel: grpc.Channel | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        api_key: str | None = None,
        **connect_options: Any,
    ) -> None:
        if channel is not None and (connect_options or api_key):
            raise TypeError("pass connect options or a channel, not both")
        self.channel = channel or fleet_channel(target, **connect_options)
        self.affinity_channel = channel or fleet_channel(target, affinity=True, **connect_options)
        self._metadata = call_metadata(api_key)
        self._stub = pb_grpc.QwenServiceStub(self.channel)
        self._affinity_stub = pb_grpc.QwenServiceStub(self.affinity_channel)
        self.timeout = timeout

    def _call_args(self, timeout: float | None, session_id: str | None = None) -> dict[str, Any]:
        return {"timeout": _timeout(timeout, self.timeout), "metadata": self._metadata() + session_metadata(session_id)}

    def chat(
        self, messages, *, timeout: float | None = None, session_id: str | None = None, **params: Any
    ) -> ChatResult:
        """session_id: the conversation's key; its calls go to one replica while it is up."""
        call_args = self._call_args(timeout, session_id)
        response, call = self._stub_for(session_id).Chat.with_call(build_request(messages, **params), **call_args)
        return ChatResult.from_response(response, replica=replica_of(call.initial_metadata()))

    def stream(
        self, messages, *, timeout: float | None = None, session_id: str | None = None, **params: Any
    ) -> ChatStream:
        call_args = self._call_args(timeout, session_id)
        return ChatStream(self._stub_for(session_id).ChatStream(build_request(messages, **params), **call_args))

    def list_models(self, *, timeout: float | None = None) -> list[str]:
        reply = self._stub.ListModels(pb.ListModelsRequest(), **self._call_args(timeout))
        return [m.id for m in reply.models]

    def count_tokens(self, messages, model: str = "", *, timeout: float | None = None) -> int:
        request = pb.CountTokensRequest(messages=_messages(messages), model=model)
        return self._stub.CountTokens(request, **self._call_args(timeout)).prompt_tokens

    def close(self) -> None:
        self.channel.close()
        if self.affinity_channel is not self.channel:
            self.affinity_channel.close()

    def __enter__(self) -> QwenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncQwenClient(_SessionRouting):
    """asyncio client with the same options as QwenClient (session_id= too)."""

    def __init__(
        self,
        target: str,
        *,
        channel: aio.Channel | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        **connect_options: Any,
    ) -> None:
        if channel is not None and connect_options:
            raise TypeError("pass connect options or a channel, not both")
        self.channel = channel or connect_async(target, **connect_options)
        self.affinity_channel = channel or connect_async(target, affinity=True, **connect_options)
        self._stub = pb_grpc.QwenServiceStub(self.channel)
        self._affinity_stub = pb_grpc.QwenServiceStub(self.affinity_channel)
        self.timeout = timeout

    def _call_args(self, timeout: float | None, session_id: str | None) -> dict[str, Any]:
        # API key and traceparent come from the channel's interceptors.
        return {"timeout": _timeout(timeout, self.timeout), "metadata": session_metadata(session_id)}

    async def chat(
        self, messages, *, timeout: float | None = None, session_id: str | None = None, **params: Any
    ) -> ChatResult:
        call_args = self._call_args(timeout, session_id)
        call = self._stub_for(session_id).Chat(build_request(messages, **params), **call_args)
        response = await call
        return ChatResult.from_response(response, replica=replica_of(await call.initial_metadata()))

    def stream(
        self, messages, *, timeout: float | None = None, session_id: str | None = None, **params: Any
    ) -> AsyncChatStream:
        call_args = self._call_args(timeout, session_id)
        return AsyncChatStream(self._stub_for(session_id).ChatStream(build_request(messages, **params), **call_args))

    async def list_models(self, *, timeout: float | None = None) -> list[str]:
        reply = await self._stub.ListModels(pb.ListModelsRequest(), timeout=_timeout(timeout, self.timeout))
        return [m.id for m in reply.models]

    async def count_tokens(self, messages, model: str = "", *, timeout: float | None = None) -> int:
        request = pb.CountTokensRequest(messages=_messages(messages), model=model)
        reply = await self._stub.CountTokens(request, timeout=_timeout(timeout, self.timeout))
        return reply.prompt_tokens

    async def close(self) -> None:
        await self.channel.close()
        if self.affinity_channel is not self.channel:
            await self.affinity_channel.close()

    async def __aenter__(self) -> AsyncQwenClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
