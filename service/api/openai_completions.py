"""OpenAI's legacy text completions (/v1/completions) wire format: a raw
prompt (no chat template), or with `suffix` fill-in-the-middle in the Coder
model's format. Same validation rules as openai_protocol (strict types, every
bad field named, null for any optional field); only n=1, best_of=1 and no
logprobs. HTTP only: gRPC has no counterpart.
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel

from ..chat import ChatParams
from ..errors import InvalidArgument
from .openai_protocol import ChunkWriter, StreamOptions, Usage, _Strict, now, parse_body


class CompletionRequest(_Strict):
    prompt: str | list[str]
    model: str = ""
    suffix: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    echo: bool | None = None
    # Extensions, as on chat completions.
    top_k: int | None = None
    repetition_penalty: float | None = None
    # Accepted only at the value that means "off" here.
    n: int | None = None
    best_of: int | None = None
    logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored


def parse_request(body: bytes) -> CompletionRequest:
    """Raw body -> validated request; InvalidArgument names the field."""
    return parse_body(body, CompletionRequest)


def to_chat_params(request: CompletionRequest) -> ChatParams:
    for name in ("n", "best_of"):
        if getattr(request, name) not in (None, 1):
            raise InvalidArgument(name, "only 1 is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) not in (None, 0):
            raise InvalidArgument(name, "is not supported (use repetition_penalty)")
    if request.logprobs is not None:
        raise InvalidArgument("logprobs", "is not supported on /v1/completions")
    if request.logit_bias:
        raise InvalidArgument("logit_bias", "is not supported")
    if request.stream_options is not None and not request.stream:
        raise InvalidArgument("stream_options", "is only allowed when stream is true")
    prompt = request.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidArgument("prompt", f"a list must hold exactly one prompt, got {len(prompt)}")
        prompt = prompt[0]
    if not prompt:
        raise InvalidArgument("prompt", "must not be empty")
    if request.echo and request.suffix is not None:
        raise InvalidArgument("echo", "cannot be combined with suffix")
    stop = () if request.stop is None else (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)
    return ChatParams(
        messages=(),
        prompt=prompt,
        suffix=request.suffix,
        model=request.model,
        temperature=request.temperature,
        max_tokens=request.max_tokens,
        top_p=request.top_p,
        top_k=request.top_k,
        repetition_penalty=request.repetition_penalty,
        seed=request.seed,
        stop=stop,
    )


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: str | None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionChunkWriter:
    """One stream's Server-Sent Events: text chunks, then the finish reason
    in a chunk with empty text, as OpenAI sends them."""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.request_id = request_id
        self.include_usage = include_usage
        self._created = now()
        self._model = model

    def _event(self, chunk: TextCompletion) -> bytes:
        exclude = None if self.include_usage else {"usage"}
        return b"data: " + chunk.model_dump_json(exclude=exclude).encode() + b"\n\n"

    def text(self, text: str, finish_reason: str | None = None) -> bytes:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return self._event(
            TextCompletion(id=self.request_id, created=self._created, model=self._model, choices=[choice])
        )

    def usage(self, usage: Usage) -> bytes:
        return self._event(
            TextCompletion(id=self.request_id, created=self._created, model=self._model, choices=[], usage=usage)
        )

    error = staticmethod(ChunkWriter.error)
    DONE = ChunkWriter.DONE
