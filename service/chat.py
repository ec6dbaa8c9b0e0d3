"""The service layer between transports and the engine: model names,
validation (every bad field named), server defaults, admission and drain.

Transports convert their wire format into ChatParams, call ChatService and
map ServiceError codes to their own statuses. Nothing here knows gRPC/HTTP.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import enum
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TypeVar

from .config import LEGACY_MODEL_NAME, Settings
from .engine.engine import Engine
from .engine.grammar import Grammar, InvalidGrammar
from .engine.types import (
    ConstraintKind,
    EngineOverloaded,
    EngineStopped,
    FinishReason,
    GenerationRequest,
    InvalidSamplingParams,
    OutputConstraint,
    SamplingParams,
    TokenEvent,
    TokenLogprobs,
)
from .errors import (
    ContextLengthExceeded,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    ModelNotFound,
    Overloaded,
    ServiceError,
    SlowConsumer,
    Unavailable,
    excerpt,
)
from .observability.telemetry import RequestTelemetry, Telemetry
from .tool_calls import (
    CLOSE_TAG,
    OPEN_TAG,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    forced_call_grammar,
    validate_tools,
)

T = TypeVar("T")

ROLES = ("system", "user", "assistant", "tool")
# A form's schema is a few KiB; compiling one costs milliseconds per KiB on
# the tokenizer thread, so a bound keeps one request from holding it long.
MAX_SCHEMA_BYTES = 64 * 1024
# JSON mode: any JSON object (as OpenAI's json_object).
JSON_OBJECT_SCHEMA = '{"type": "object"}'
# Fill-in-the-middle (legacy completions' `suffix`) in the Qwen2.5-Coder format.
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
# RESOURCE_EXHAUSTED carries this retry hint; a slot frees up within about
# one short answer's time on a busy replica.
RETRY_AFTER_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: Sequence[ToolCall] = ()  # an assistant message's calls
    tool_call_id: str = ""  # a tool message: the call it answers
    name: str = ""  # a tool message: the function's name (optional)


class ResponseFormatType(enum.StrEnum):
    TEXT = "text"
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # JSON valid against ResponseFormat.json_schema


@dataclasses.dataclass(frozen=True)
class ResponseFormat:
    type: ResponseFormatType = ResponseFormatType.TEXT
    json_schema: str = ""  # the JSON Schema as JSON text, for JSON_SCHEMA


@dataclasses.dataclass(frozen=True)
class ChatParams:
    """A chat request as the transports hand it over; None = unset."""

    messages: Sequence[ChatMessage]
    model: str = ""
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    response_format: ResponseFormat | None = None
    n: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Mapping[int, float] | None = None  # token id -> bias
    # Tool calling (see tool_calls.py); tool_choice None = auto with tools, none without.
    tools: Sequence[Tool] = ()
    tool_choice: ToolChoice | None = None
    # A forced answer (tool_choice required) holds several calls only when asked:
    # a small model otherwise tends to repeat its call until max_tokens.
    parallel_tool_calls: bool | None = None
    # Legacy completions: a raw prompt instead of messages (no chat template),
    # with `suffix` for fill-in-the-middle.
    prompt: str | None = None
    suffix: str | None = None


@dataclasses.dataclass(frozen=True)
class LogprobToken:
    """A token as logprobs report it: its text (bytes that are not a whole
    UTF-8 character written as \\xNN), exact bytes, and logprob."""

    token_id: int
    token: str
    bytes: bytes
    logprob: float


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprob and its most likely alternatives."""

    chosen: LogprobToken
    top: tuple[LogprobToken, ...]


@dataclasses.dataclass(frozen=True)
class ModelCard:
    id: str
    max_context_tokens: int
    max_output_tokens: int


@dataclasses.dataclass(frozen=True)
class PreparedChat:
    request: GenerationRequest
    model: str  # the served name that was asked for
    telemetry: RequestTelemetry
    # Names of the tools whose calls the transport parses out of the answer
    # (tool_calls.ToolCallParser); empty: the answer is all content.
    tool_names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Checked:
    """A request checked before tokenizing."""

    model: str
    messages: list[dict[str, object]]
    sampling: SamplingParams
    prompt_bytes: int
    tool_choice: ToolChoice
    tool_names: tuple[str, ...] = ()  # of the tools shown to the model


def served_model_names(settings: Settings, model_name: str) -> tuple[str, ...]:
    """The names a server answers to; the first is the default (and the
    `model` label of the metrics)."""
    return tuple(dict.fromkeys(settings.served_model_name or [model_name, LEGACY_MODEL_NAME]))


class ChatService:
    """`telemetry` records the service-level metrics and spans of every chat
    request (default: a private metrics registry, no tracing)."""

    def __init__(self, engine: Engine, settings: Settings, telemetry: Telemetry | None = None) -> None:
        self._engine = engine
        self._settings = settings
        self.served_model_names: tuple[str, ...] = served_model_names(settings, engine.model_name)
        self._telemetry = telemetry if telemetry is not None else Telemetry.standalone(self.served_model_names[0])
        self._draining = False
        # Tokenizing a prompt near --max-request-bytes is CPU work of a large
        # fraction of a second; on the event loop it would stall every running
        # stream. Transports use the *_async methods, which run it here: one
        # thread, so the tokenizer is never used by two threads at once and
        # tokenization never takes more than one core.
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qwen-tokenize")
        self._tokenizer_queue_bytes = 0  # prompt bytes queued for or on the tokenizer thread
        self._tokenizing = 0  # chat requests among them (admitted, not yet in the engine)

    @property
    def default_model(self) -> str:
        return self.served_model_names[0]

    def list_models(self) -> list[ModelCard]:
        return [
            ModelCard(name, self._settings.max_model_len, self._settings.max_tokens_limit)
            for name in self.served_model_names
        ]

    def resolve_model(self, name: str) -> str:
        if not name:
            return self.default_model
        if name not in self.served_model_names:
            raise ModelNotFound(
                f"model {excerpt(name)!r} is not served here; available: {', '.join(self.served_model_names)}"
            )
        return name

    def begin_drain(self) -> None:
        """Refuse new requests (UNAVAILABLE, so clients retry elsewhere)."""
        self._draining = True

    # ----- validation -----------------------------------------------------
    def _validate_messages(self, messages: Sequence[ChatMessage]) -> list[dict[str, object]]:
        """Messages as the chat template takes them. A trailing assistant
        message is a prefill: the answer continues it."""
        if not messages:
            raise InvalidArgument("messages", "at least one message is required")
        if len(messages) > self._settings.max_messages:
            raise InvalidArgument("messages", f"at most {self._settings.max_messages} messages, got {len(messages)}")
        for index, message in enumerate(messages):
            if message.role not in ROLES:
                raise InvalidArgument(
                    f"messages[{index}].role", f"must be one of {', '.join(ROLES)}, got {excerpt(message.role)!r}"
                )
            if message.tool_calls and message.role != "assistant":
                raise InvalidArgument(f"messages[{index}].tool_calls", "only assistant messages carry tool calls")
            if message.role == "tool" and not message.tool_call_id:
                raise InvalidArgument(f"messages[{index}].tool_call_id", "is required for a tool message")
        last = messages[-1]
        if last.tool_calls:
            raise InvalidArgument(
                f"messages[{len(messages) - 1}].tool_calls",
                "a prefill (trailing assistant message) cannot hold tool calls",
            )
        if not last.content.strip():
            raise InvalidArgument(f"messages[{len(messages) - 1}].content", "must not be empty")
        return [_template_message(m) for m in messages]

    def _sampling(self, params: ChatParams) -> SamplingParams:
        """Server defaults applied to the unset fields; the ranges are
        SamplingParams' own (engine/types.py), plus what depends on this server."""
        s = self._settings
        max_tokens = s.max_tokens_default if params.max_tokens is None else params.max_tokens
        if (
            not isinstance(max_tokens, bool)
            and isinstance(max_tokens, int)
            and not 1 <= max_tokens <= s.max_tokens_limit
        ):
            raise InvalidArgument("max_tokens", f"must be between 1 and {s.max_tokens_limit}, got {max_tokens}")
        n = 1 if params.n is None else params.n
        if isinstance(n, int) and n > s.max_batch_size:
            raise InvalidArgument("n", f"must be at most the server's batch size {s.max_batch_size}, got {n}")
        logit_bias = tuple(sorted((params.logit_bias or {}).items()))
        vocab_size = self._engine.vocab_size
        for token, _ in logit_bias:
            if isinstance(token, int) and token >= vocab_size:
                raise InvalidArgument("logit_bias", f"token id {token} is not below the vocabulary size {vocab_size}")

        def given(value: T | None, default: T) -> T:
            return default if value is None else value

        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=given(params.temperature, s.temperature_default),
                top_p=given(params.top_p, s.top_p_default),
                top_k=given(params.top_k, s.top_k_default),
                repetition_penalty=given(params.repetition_penalty, s.repetition_penalty_default),
                seed=params.seed,
                stop=tuple(params.stop),
                n=n,
                logprobs=params.logprobs,
                top_logprobs=given(params.top_logprobs, 0),
                presence_penalty=given(params.presence_penalty, 0.0),
                frequency_penalty=given(params.frequency_penalty, 0.0),
                logit_bias=logit_bias,
            )
        except InvalidSamplingParams as exc:
            raise InvalidArgument(exc.field, exc.message) from None

    def default_sampling(self, max_tokens: int) -> SamplingParams:
        """The sampling of a request that sets only max_tokens (the server's defaults)."""
        return self._sampling(ChatParams(messages=(), max_tokens=max_tokens))

    @staticmethod
    def _text_bytes(messages: list[dict[str, object]], extra: Sequence[str] = ()) -> int:
        """The UTF-8 size of the messages' text (and of `extra` texts: tool
        definitions, a raw prompt): what tokenizing them costs."""
        texts = [str(m["content"]) for m in messages] + list(extra)
        return sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)

    def _prompt_bytes(self, messages: list[dict[str, object]], extra: Sequence[str] = ()) -> int:
        """_text_bytes(), refusing without tokenizing a prompt that size alone
        proves too long: no token stands for more than engine.max_token_bytes
        bytes, so it has at least ceil(bytes / max_token_bytes) tokens."""
        size = self._text_bytes(messages, extra)
        fewest_tokens = -(-size // self._engine.max_token_bytes)
        if fewest_tokens >= self._settings.max_model_len:
            raise InvalidArgument(
                "messages",
                f"prompt is {size} bytes, at least {fewest_tokens} tokens; "
                f"the context window is {self._settings.max_model_len} tokens",
            )
        return size

    def _grammar(self, response_format: ResponseFormat | None) -> Grammar | None:
        """The compiled constraint for a response format (None: free text)."""
        if response_format is None or response_format.type is ResponseFormatType.TEXT:
            return None
        source = JSON_OBJECT_SCHEMA
        if response_format.type is ResponseFormatType.JSON_SCHEMA:
            source = response_format.json_schema
            if len(source.encode("utf-8", "surrogatepass")) > MAX_SCHEMA_BYTES:
                raise InvalidArgument("response_format", f"the JSON schema exceeds {MAX_SCHEMA_BYTES} bytes")
            try:
                schema = json.loads(source)
            except ValueError as exc:
                raise InvalidArgument("response_format", f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise InvalidArgument("response_format", "the JSON schema must be a JSON object")
        try:
            return self._engine.compile_grammar(OutputConstraint(ConstraintKind.JSON_SCHEMA, source))
        except InvalidGrammar as exc:
            raise InvalidArgument("response_format", f"unsupported or invalid JSON schema: {exc}") from None

    def _tool_grammar(self, params: ChatParams, choice: ToolChoice) -> Grammar | None:
        """Compiles every rendered tool's parameters schema (so a bad one is
        named) and, for tool_choice required or a named function, the
        grammar that forces the calls."""
        if choice.mode is ToolChoiceMode.NONE:
            return None
        for index, tool in enumerate(params.tools):
            if len(tool.parameters.encode("utf-8", "surrogatepass")) > MAX_SCHEMA_BYTES:
                raise InvalidArgument(f"tools[{index}].function.parameters", f"exceeds {MAX_SCHEMA_BYTES} bytes")
            try:
                self._engine.compile_grammar(OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(tool.schema())))
            except InvalidGrammar as exc:
                raise InvalidArgument(
                    f"tools[{index}].function.parameters", f"unsupported or invalid JSON schema: {exc}"
                ) from None
        if choice.mode is ToolChoiceMode.AUTO:
            return None
        tags = self._engine.token_ids((OPEN_TAG, CLOSE_TAG))
        source = forced_call_grammar(params.tools, choice, params.parallel_tool_calls is True, tags)
        try:
            return self._engine.compile_grammar(OutputConstraint(ConstraintKind.LARK, source))
        except InvalidGrammar as exc:
            raise InvalidArgument("tools", f"cannot build the tool-call grammar: {exc}") from None

    def _encode(self, params: ChatParams, checked: _Checked) -> tuple[list[int], Grammar | None]:
        """Prompt tokens and the answer's grammar: CPU work for the tokenizer thread."""
        if params.prompt is not None:
            return self._encode_completion(params.prompt, params.suffix), None
        choice = checked.tool_choice
        tools = [t.template_entry() for t in params.tools] if choice.mode is not ToolChoiceMode.NONE else None
        prompt = self._engine.encode_chat(checked.messages, tools)
        if choice.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.FUNCTION):
            return prompt, self._tool_grammar(params, choice)
        self._tool_grammar(params, choice)
        return prompt, self._grammar(params.response_format)

    def _encode_completion(self, prompt: str, suffix: str | None) -> list[int]:
        """A legacy completion's prompt: the raw text, or with a suffix the
        Coder model's fill-in-the-middle layout."""
        if suffix is None:
            return self._engine.encode_text(prompt)
        if self._engine.token_ids((FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)) is None:
            raise InvalidArgument("suffix", "this model has no fill-in-the-middle tokens")
        return self._engine.encode_text(f"{FIM_PREFIX}{prompt}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}")

    def count_tokens(self, messages: Sequence[ChatMessage], model: str = "") -> int:
        self.resolve_model(model)
        return len(self._engine.encode_chat(self._validate_messages(messages)))

    async def _on_tokenizer_thread(self, function: Callable[[], T], cost: int) -> T:
        """Run `function` on the tokenizer thread, or refuse at once
        (RESOURCE_EXHAUSTED) when the prompt bytes queued for it would exceed
        --max-tokenizer-queue-bytes: tokenizing costs ~1 s per MiB on one
        thread, and everything queued delays every request behind it. A lone
        request is never refused (its size is bounded by the request limit)."""
        queued, limit = self._tokenizer_queue_bytes, self._settings.max_tokenizer_queue_bytes
        if queued and queued + cost > limit:
            raise Overloaded(f"the tokenizer is busy ({queued} prompt bytes queued); retry later", RETRY_AFTER_SECONDS)
        self._tokenizer_queue_bytes += cost
        # The caller's context (the current trace span) goes along.
        context = contextvars.copy_context()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, context.run, function)
        finally:
            # A caller cancelled while queued also takes its job out of the executor's queue.
            self._tokenizer_queue_bytes -= cost

    async def count_tokens_async(self, messages: Sequence[ChatMessage], model: str = "") -> int:
        """count_tokens() on the tokenizer thread, within its queue bound."""
        self.resolve_model(model)
        validated = self._validate_messages(messages)
        encode = functools.partial(self._engine.encode_chat, validated)
        return len(await self._on_tokenizer_thread(encode, self._text_bytes(validated)))

    def _check_capacity(self, slots: int) -> None:
        """Admission before tokenizing: requests being tokenized count like
        waiting ones, so a burst is refused at once instead of queueing for
        the tokenizer ahead of the engine's own check (which stays the
        authority: it still refuses what got past this one in the same tick).
        A request for n choices needs n slots."""
        stats = self._engine.stats()
        waiting = stats.waiting + self._tokenizing
        if stats.running + waiting + slots > self._settings.max_batch_size + self._settings.max_waiting:
            raise Overloaded(
                f"server is at capacity ({stats.running} running, {waiting} waiting); retry later", RETRY_AFTER_SECONDS
            )

    async def prepare_async(self, params: ChatParams, timeout: float | None = None) -> PreparedChat:
        """prepare() for transports: checks and admission on the event loop
        (cheap), tokenization on the tokenizer thread; arrival time and
        deadline count from now."""
        arrival = time.monotonic()
        telemetry = self._telemetry.start(arrival)
        try:
            checked = self._check(params)
            self._check_capacity(checked.sampling.n)
            self._tokenizing += 1

            # Schemas are compiled on the tokenizer thread too (milliseconds, cached).
            def encode() -> tuple[list[int], Grammar | None]:
                return self._encode(params, checked)

            try:
                prompt, grammar = await self._on_tokenizer_thread(encode, checked.prompt_bytes)
            finally:
                self._tokenizing -= 1
            deadline = None if timeout is None else arrival + timeout
            prepared = self._build(checked, prompt, grammar, deadline, telemetry)
        except BaseException as exc:
            telemetry.fail(exc)
            raise
        telemetry.prepared(prepared.request, prepared.model)
        return prepared

    def prepare(self, params: ChatParams, timeout: float | None = None) -> PreparedChat:
        """Validate and tokenize on the calling thread, without admission
        (tools and tests; transports use prepare_async). Raises ServiceError
        subclasses. The request's telemetry starts here."""
        arrival = time.monotonic()
        telemetry = self._telemetry.start(arrival)
        try:
            checked = self._check(params)
            prompt, grammar = self._encode(params, checked)
            prepared = self._build(checked, prompt, grammar, None if timeout is None else arrival + timeout, telemetry)
        except BaseException as exc:
            telemetry.fail(exc)
            raise
        telemetry.prepared(prepared.request, prepared.model)
        return prepared

    def _check(self, params: ChatParams) -> _Checked:
        """Everything decided before tokenizing."""
        if self._draining:
            raise Unavailable("server is draining; retry on another replica")
        model = self.resolve_model(params.model)
        sampling = self._sampling(params)
        if params.prompt is not None:  # legacy completion
            texts = (params.prompt, params.suffix or "")
            return _Checked(model, [], sampling, self._prompt_bytes([], texts), ToolChoice(ToolChoiceMode.NONE))
        messages = self._validate_messages(params.messages)
        choice = validate_tools(params.tools, params.tool_choice)
        forced = choice.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.FUNCTION)
        if forced and params.messages[-1].role == "assistant":
            raise InvalidArgument(
                "tool_choice", f"{choice.mode.value!r} cannot continue a prefill (trailing assistant message)"
            )
        if forced and params.response_format is not None and params.response_format.type is not ResponseFormatType.TEXT:
            raise InvalidArgument(
                "tool_choice", f"{choice.mode.value!r} conflicts with response_format; send one of them"
            )
        shown = params.tools if choice.mode is not ToolChoiceMode.NONE else ()
        size = self._prompt_bytes(messages, [t.parameters + t.description for t in shown])
        return _Checked(model, messages, sampling, size, choice, tuple(t.name for t in shown))

    def _build(
        self,
        checked: _Checked,
        prompt: list[int],
        grammar: Grammar | None,
        deadline: float | None,
        telemetry: RequestTelemetry,
    ) -> PreparedChat:
        if len(prompt) >= self._settings.max_model_len:
            raise ContextLengthExceeded(
                "messages",
                f"prompt is {len(prompt)} tokens; the context window is {self._settings.max_model_len} tokens",
            )
        request = GenerationRequest(
            request_id=f"chat-{uuid.uuid4().hex}",
            prompt_token_ids=tuple(prompt),
            sampling=checked.sampling,
            deadline=deadline,
            grammar=grammar,
        )
        return PreparedChat(request=request, model=checked.model, telemetry=telemetry, tool_names=checked.tool_names)

    @staticmethod
    def _expired(request: GenerationRequest) -> bool:
        return request.deadline is not None and time.monotonic() >= request.deadline

    def token_logprob(self, logprobs: TokenLogprobs) -> TokenLogprob:
        """An event's logprobs with each token's text and bytes, for the transports."""

        def token(token_id: int, logprob: float) -> LogprobToken:
            raw = self._engine.token_bytes(token_id)
            return LogprobToken(token_id, raw.decode("utf-8", "backslashreplace"), raw, logprob)

        return TokenLogprob(
            token(logprobs.token_id, logprobs.logprob), tuple(token(i, value) for i, value in logprobs.top)
        )

    async def generate(self, prepared: PreparedChat) -> AsyncIterator[TokenEvent]:
        """The engine's events for a prepared request, with engine failures
        turned into ServiceErrors. Closing the iterator aborts the request.
        Every event is observed (TTFT, inter-token latency, tokens) before it
        is handed on; the final one settles the request's metrics and spans.

        With n > 1 choices every choice has its own final event (its `index`);
        the last event of all carries the request's usage: the prompt counted
        once, the completion tokens of every choice summed."""
        telemetry = prepared.telemetry
        events = self._engine.generate(prepared.request)
        choices_left = prepared.request.sampling.n
        completion_tokens = 0
        try:
            async for event in events:
                if event.finished and prepared.request.sampling.n > 1:
                    choices_left -= 1
                    completion_tokens += event.usage.completion_tokens if event.usage else 0
                    if choices_left and event.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                        yield event  # one choice done; the request goes on
                        continue
                    if event.usage is not None:
                        event = dataclasses.replace(
                            event, usage=dataclasses.replace(event.usage, completion_tokens=completion_tokens)
                        )
                if event.finish_reason is FinishReason.ERROR:
                    raise InternalError(event.error or "generation failed")
                if event.finish_reason is FinishReason.SLOW_CONSUMER:
                    raise SlowConsumer(
                        f"the client fell {self._settings.max_buffered_tokens} tokens behind reading its stream; "
                        "generation was stopped"
                    )
                if event.finish_reason is FinishReason.CANCELLED and self._expired(prepared.request):
                    raise DeadlineExceeded("deadline exceeded")
                telemetry.on_event(event, time.monotonic())
                yield event
        except EngineOverloaded as exc:
            error: ServiceError = Overloaded(str(exc), RETRY_AFTER_SECONDS)
            telemetry.fail(error)
            raise error from exc
        except EngineStopped as exc:
            error = Unavailable(str(exc))
            telemetry.fail(error)
            raise error from exc
        except Exception as exc:  # InternalError above, or a bug
            telemetry.fail(exc)
            raise
        finally:
            telemetry.abandoned()  # no-op unless the consumer left before the final event
            await events.aclose()


def _template_message(message: ChatMessage) -> dict[str, object]:
    """A message as the chat template reads it (OpenAI's shape)."""
    rendered: dict[str, object] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        rendered["tool_calls"] = [call.template_entry() for call in message.tool_calls]
    if message.tool_call_id:
        rendered["tool_call_id"] = message.tool_call_id
    if message.name:
        rendered["name"] = message.name
    return rendered
