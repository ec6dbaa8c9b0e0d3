"""The OpenAI chat-completions wire format: request validation (strict JSON
types, every bad field named), the mapping to ChatParams, and the response,
chunk and error shapes. Nothing here knows about a web framework.

Supported: messages (string or text-part content; "developer" is read as
"system"; "tool" messages and assistant tool_calls; a trailing assistant
message is a prefill the answer continues), model, temperature, top_p,
max_tokens / max_completion_tokens, stop, seed, stream,
stream_options.include_usage, response_format (text, json_object,
json_schema: grammar-constrained decoding), tools / tool_choice /
parallel_tool_calls (Qwen2.5's tool-call format, see service/tool_calls.py),
n, logprobs / top_logprobs, presence_penalty / frequency_penalty,
logit_bias, and the extensions top_k and repetition_penalty (as vLLM
accepts them). null is accepted for every optional field, as OpenAI does.
Fields that would change the answer in ways this server cannot honour
(stream_options.continuous_usage_stats) are refused with 400 naming the field; fields that change nothing here (user, metadata, store,
...) are accepted and ignored; any other field is refused like OpenAI does.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..chat import ChatMessage, ChatParams, LogprobToken, ResponseFormat, ResponseFormatType
from ..chat import TokenLogprob as ChatTokenLogprob
from ..errors import InvalidArgument
from ..tool_calls import Tool, ToolCall, ToolChoice, ToolChoiceMode

# ----------------------------------------------------------------- requests


class _Strict(BaseModel):
    # strict: JSON "0.5" is not a number and true is not an integer.
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCallWire(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallWire(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallWire


class Message(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallWire] | None = None  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's extension; accepted only as false


class JsonSchemaFormat(_Strict):
    name: str  # required by OpenAI; not used here
    description: str | None = None
    # The JSON Schema; absent means any JSON value. ("schema" would shadow a BaseModel attribute.)
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is always enforced here


class FunctionWire(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema; absent: no arguments
    strict: bool | None = None  # constrained calls always follow the schema here


class ToolWire(_Strict):
    type: Literal["function"]
    function: FunctionWire


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormatWire(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_Strict):
    messages: list[Message]
    model: str = ""
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Extensions (vLLM and TGI accept these too).
    top_k: int | None = None
    repetition_penalty: float | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a JSON object key) -> bias
    tools: list[ToolWire] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormatWire | None = None
    # Accepted and ignored: they do not change the answer.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


ROLE_ALIASES = {"developer": "system"}


def _field_path(loc: tuple[Any, ...]) -> str:
    """("messages", 0, "content") -> "messages[0].content"; union-member
    names that pydantic adds to the location are dropped. A logit_bias entry
    is named as the field (its key is a token id, not a field)."""
    if loc[:1] == ("logit_bias",):
        return "logit_bias"
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "list[TextPart]", "list[str]", "dict[str,any]", "dict[str,float]") or "[" in str(part):
            continue
        elif str(part)[:1].isupper():  # a union member that is a model (NamedToolChoice); fields are lower case
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


def parse_request(body: bytes) -> ChatCompletionRequest:
    """Raw request body -> validated request; InvalidArgument names the field."""
    return parse_body(body, ChatCompletionRequest)


RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_body(body: bytes, request_type: type[RequestT]) -> RequestT:
    """Raw request body -> a validated `request_type`; InvalidArgument names the field."""
    if not body.strip():
        raise InvalidArgument("body", "the request body is empty; send a JSON object")
    try:
        return request_type.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # For a union (e.g. content: string or parts) the deepest location is
        # the most specific complaint.
        error = max(errors, key=lambda e: len(e["loc"]))
        if error["type"] == "json_invalid":
            raise InvalidArgument("body", f"not valid JSON: {error['msg']}") from None
        if error["type"] == "model_type" and not error["loc"]:
            raise InvalidArgument("body", "the request body must be a JSON object") from None
        field = _field_path(tuple(error["loc"]))
        if error["type"] == "extra_forbidden":
            raise InvalidArgument(field, "unrecognized request argument") from None
        if error["type"] == "missing":
            raise InvalidArgument(field, "is required") from None
        raise InvalidArgument(field, error["msg"]) from None


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    if request.stream_options is not None:
        if not request.stream:
            raise InvalidArgument("stream_options", "is only allowed when stream is true")
        if request.stream_options.continuous_usage_stats:
            raise InvalidArgument("stream_options.continuous_usage_stats", "is not supported")


def _response_format(wire: ResponseFormatWire | None) -> ResponseFormat | None:
    if wire is None:
        return None
    kind = ResponseFormatType(wire.type)
    if kind is ResponseFormatType.JSON_SCHEMA:
        if wire.json_schema is None:
            raise InvalidArgument("response_format.json_schema", "is required when type is 'json_schema'")
        schema = wire.json_schema.json_schema
        return ResponseFormat(kind, json.dumps({} if schema is None else schema))
    if wire.json_schema is not None:
        raise InvalidArgument("response_format.json_schema", "is only allowed when type is 'json_schema'")
    return ResponseFormat(kind)


def _logit_bias(wire: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings)."""
    if wire is None:
        return None
    bias = {}
    for key, value in wire.items():
        if not key.isascii() or not key.isdigit():
            raise InvalidArgument("logit_bias", f"keys must be token ids (non-negative integers), got {key[:40]!r}")
        bias[int(key)] = value
    return bias


def _tools(request: ChatCompletionRequest) -> tuple[list[Tool], ToolChoice | None]:
    tools = [
        Tool(
            name=wire.function.name,
            description=wire.function.description or "",
            # OpenAI: omitted parameters = a function without arguments.
            parameters=json.dumps(
                {"type": "object", "properties": {}} if wire.function.parameters is None else wire.function.parameters
            ),
        )
        for wire in request.tools or ()
    ]
    choice = request.tool_choice
    if choice is None:
        return tools, None
    if isinstance(choice, NamedToolChoice):
        return tools, ToolChoice(ToolChoiceMode.FUNCTION, choice.function.name)
    return tools, ToolChoice(ToolChoiceMode(choice))


def _message(message: Message) -> ChatMessage:
    calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ())
    return ChatMessage(
        role=ROLE_ALIASES.get(message.role, message.role),
        content=message.text(),
        tool_calls=calls,
        tool_call_id=message.tool_call_id or "",
        name=message.name or "",
    )


def to_chat_params(request: ChatCompletionRequest) -> ChatParams:
    """Wire -> service. Range checks (temperature, max_tokens, ...) are the
    service layer's, so both transports refuse the same things."""
    _refuse_unsupported(request)
    max_tokens = request.max_tokens
    if request.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != request.max_completion_tokens:
            raise InvalidArgument("max_completion_tokens", "conflicts with max_tokens; send one of them")
        max_tokens = request.max_completion_tokens
    stop: tuple[str, ...]
    if request.stop is None:
        stop = ()
    elif isinstance(request.stop, str):
        stop = (request.stop,)
    else:
        stop = tuple(request.stop)
    tools, tool_choice = _tools(request)
    return ChatParams(
        messages=[_message(m) for m in request.messages],
        model=request.model,
        temperature=request.temperature,
        max_tokens=max_tokens,
        top_p=request.top_p,
        top_k=request.top_k,
        repetition_penalty=request.repetition_penalty,
        seed=request.seed,
        stop=stop,
        response_format=_response_format(request.response_format),
        n=request.n,
        logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=_logit_bias(request.logit_bias),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=request.parallel_tool_calls,
    )


# ---------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens reused from the server's prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut

    @classmethod
    def of(cls, call: ToolCall) -> ToolCallOut:
        return cls(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None: an answer that is only tool calls, as OpenAI sends it
    # Left out of the JSON when there are none.
    tool_calls: list[ToolCallOut] | None = Field(default=None, exclude_if=lambda calls: calls is None)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


def _top_logprob(token: LogprobToken) -> TopLogprob:
    return TopLogprob(token=token.token, logprob=token.logprob, bytes=list(token.bytes))


def token_logprob(entry: ChatTokenLogprob) -> TokenLogprob:
    chosen = entry.chosen
    return TokenLogprob(
        token=chosen.token,
        logprob=chosen.logprob,
        bytes=list(chosen.bytes),
        top_logprobs=[_top_logprob(top) for top in entry.top],
    )


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChunkChoice(BaseModel):
    index: int = 0
    # {"role": "assistant", "content": ""} first, then {"content": "..."} or
    # {"tool_calls": [...]}; {} on the final chunk when it carries no text.
    delta: dict[str, Any]
    # With logprobs: the logprobs of the chunk's token (its content may be
    # empty: a token's text can be held back while it may start a stop string).
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    # With stream_options.include_usage every chunk carries "usage": null and
    # one last chunk (empty choices) carries the totals; otherwise absent.
    usage: Usage | None = None


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen-grpc"
    # Not in OpenAI's schema; clients ignore unknown fields.
    max_context_tokens: int
    max_output_tokens: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def now() -> int:
    return int(time.time())


class ChunkWriter:
    """Renders one stream's Server-Sent Events. The fixed part of every chunk
    (id, created, model) is rendered once; per token only the text is
    serialised."""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.request_id = request_id
        self._include_usage = include_usage
        self._created = now()
        self._model = model

    def _event(self, chunk: ChatCompletionChunk) -> bytes:
        exclude = None if self._include_usage else {"usage"}
        return b"data: " + chunk.model_dump_json(exclude=exclude, exclude_none=False).encode() + b"\n\n"

    def _chunk(
        self,
        delta: dict[str, Any],
        index: int,
        finish_reason: str | None = None,
        logprobs: TokenLogprob | None = None,
    ) -> bytes:
        choice = ChunkChoice(
            index=index,
            delta=delta,
            finish_reason=finish_reason,
            logprobs=None if logprobs is None else ChoiceLogprobs(content=[logprobs]),
        )
        return self._event(
            ChatCompletionChunk(id=self.request_id, created=self._created, model=self._model, choices=[choice])
        )

    def role(self, index: int = 0) -> bytes:
        return self._chunk({"role": "assistant", "content": ""}, index)

    def content(self, text: str, index: int = 0, logprobs: TokenLogprob | None = None) -> bytes:
        return self._chunk({"content": text}, index, logprobs=logprobs)

    def tool_call(self, call_index: int, call: ToolCall, index: int = 0) -> bytes:
        """A call as OpenAI streams one: id and name first, then the arguments
        (here in one fragment: a call is parsed once it is complete).
        `call_index`: the call's position among the choice's calls."""
        head = {
            "index": call_index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        arguments = {"index": call_index, "function": {"arguments": call.arguments}}
        return self._chunk({"tool_calls": [head]}, index) + self._chunk({"tool_calls": [arguments]}, index)

    def finish(self, text: str, finish_reason: str, index: int = 0, logprobs: TokenLogprob | None = None) -> bytes:
        """The last text (if any) in its own chunk, then the finish reason
        with an empty delta, as OpenAI sends it."""
        last = self.content(text, index, logprobs) if text or logprobs else b""
        return last + self._chunk({}, index, finish_reason)

    def usage(self, usage: Usage) -> bytes:
        return self._event(
            ChatCompletionChunk(id=self.request_id, created=self._created, model=self._model, choices=[], usage=usage)
        )

    @staticmethod
    def error(detail: ErrorDetail) -> bytes:
        return b"data: " + ErrorResponse(error=detail).model_dump_json().encode() + b"\n\n"

    DONE = b"data: [DONE]\n\n"


__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChoiceLogprobs",
    "ChunkWriter",
    "ErrorDetail",
    "ErrorResponse",
    "ModelList",
    "ModelObject",
    "PromptTokensDetails",
    "Usage",
    "parse_request",
    "token_logprob",
    "to_chat_params",
]
