"""Python client SDK for qwen-grpc.

    from service.client import QwenClient
    client = QwenClient("dns:///qwen-headless.default.svc.cluster.local:50051")
    print(client.chat([{"role": "user", "content": "Hi"}]).content)
    for piece in client.stream([{"role": "user", "content": "Hi"}], temperature=0):
        print(piece.content, end="", flush=True)

`connect()` returns a channel set up for a fleet of replicas behind a headless
Service: round_robin over every resolved address, transparent retry of
UNAVAILABLE (a refused call did no work), keepalive, and faster DNS
re-resolution.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Iterator, Mapping, Sequence

import grpc
from grpc import aio

from ..pb.qwen import qwen_service_pb2 as pb
from ..pb.qwen import qwen_service_pb2_grpc as pb_grpc

__all__ = [
    "AsyncQwenClient",
    "ChatResult",
    "QwenClient",
    "build_request",
    "channel_options",
    "connect",
    "connect_async",
    "finish_reason_name",
]

SERVICE = "qwen.QwenService"
_RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def channel_options(*, keepalive_seconds: float = 30.0, dns_refresh_seconds: float = 5.0) -> list[tuple[str, Any]]:
    service_config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": _RETRY_POLICY}],
    }
    return [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.dns_min_time_between_resolutions_ms", int(dns_refresh_seconds * 1000)),
    ]


def _target(target: str) -> str:
    # A bare host:port would use pick_first semantics on one address list;
    # dns:/// makes every A record a round_robin backend.
    return target if "://" in target or target.startswith(("unix:", "dns:")) else f"dns:///{target}"


def connect(target: str, **options: Any) -> grpc.Channel:
    return grpc.insecure_channel(_target(target), options=channel_options(**options))


def connect_async(target: str, **options: Any) -> aio.Channel:
    return aio.insecure_channel(_target(target), options=channel_options(**options))


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
) -> pb.ChatRequest:
    """Only the parameters you pass are sent; the rest take server defaults."""
    request = pb.ChatRequest(messages=_messages(messages), model=model, stop=list(stop))
    for name, value in (
        ("temperature", temperature),
        ("max_tokens", max_tokens),
        ("top_p", top_p),
        ("top_k", top_k),
        ("repetition_penalty", repetition_penalty),
        ("seed", seed),
    ):
        if value is not None:
            setattr(request, name, value)
    return request


def finish_reason_name(response: pb.ChatResponse) -> str:
    """"stop" | "length" | "cancelled" ("" on non-final messages)."""
    if not response.finish_reason:
        return ""
    return pb.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()


@dataclasses.dataclass(frozen=True)
class ChatResult:
    id: str
    content: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    model: str

    @classmethod
    def from_response(cls, response: pb.ChatResponse) -> "ChatResult":
        return cls(
            id=response.id,
            content=response.content,
            finish_reason=finish_reason_name(response),
            prompt_tokens=response.usage.prompt_tokens,
            completion_tokens=response.usage.completion_tokens,
            model=response.model,
        )


class QwenClient:
    """Blocking client. `timeout` is the per-call deadline in seconds."""

    def __init__(self, target: str, *, channel: grpc.Channel | None = None, timeout: float | None = 120.0) -> None:
        self.channel = channel or connect(target)
        self._stub = pb_grpc.QwenServiceStub(self.channel)
        self.timeout = timeout

    def chat(self, messages, *, timeout: float | None = None, **params: Any) -> ChatResult:
        response = self._stub.Chat(build_request(messages, **params), timeout=timeout or self.timeout)
        return ChatResult.from_response(response)

    def stream(self, messages, *, timeout: float | None = None, **params: Any) -> Iterator[pb.ChatResponse]:
        """Yields ChatResponse messages; the last has is_final, finish_reason and usage.
        Breaking out of the loop (or calling .cancel() on the returned call) cancels
        the generation on the server."""
        call = self._stub.ChatStream(build_request(messages, **params), timeout=timeout or self.timeout)
        try:
            yield from call
        finally:
            call.cancel()

    def list_models(self) -> list[str]:
        return [m.id for m in self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models]

    def count_tokens(self, messages, model: str = "") -> int:
        request = pb.CountTokensRequest(messages=_messages(messages), model=model)
        return self._stub.CountTokens(request, timeout=self.timeout).prompt_tokens

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "QwenClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncQwenClient:
    """asyncio client; cancelling the task that iterates `stream` cancels the RPC."""

    def __init__(self, target: str, *, channel: aio.Channel | None = None, timeout: float | None = 120.0) -> None:
        self.channel = channel or connect_async(target)
        self._stub = pb_grpc.QwenServiceStub(self.channel)
        self.timeout = timeout

    async def chat(self, messages, *, timeout: float | None = None, **params: Any) -> ChatResult:
        response = await self._stub.Chat(build_request(messages, **params), timeout=timeout or self.timeout)
        return ChatResult.from_response(response)

    async def stream(self, messages, *, timeout: float | None = None, **params: Any):
        call = self._stub.ChatStream(build_request(messages, **params), timeout=timeout or self.timeout)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncQwenClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
