"""Service layer: model names, server defaults, and one named error per bad field."""

from __future__ import annotations

import math

import pytest
from tiny_model import tiny_engine_config

from service.chat import ChatMessage, ChatParams, ChatService, ResponseFormat, ResponseFormatType
from service.config import LEGACY_MODEL_NAME, Settings
from service.engine.engine import Engine
from service.engine.loader import load_model
from service.errors import ContextLengthExceeded, InvalidArgument, ModelNotFound, Unavailable
from service.tool_calls import Tool, ToolCall, ToolChoice, ToolChoiceMode

USER = (ChatMessage("user", "Hello"),)
WEATHER = Tool(
    "get_weather", "The weather in a city.", '{"type": "object", "properties": {"city": {"type": "string"}}}'
)
CALL = ToolCall("call_1", "get_weather", '{"city": "Paris"}')


def schema_format(text: str) -> ResponseFormat:
    return ResponseFormat(ResponseFormatType.JSON_SCHEMA, text)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="float32")
    # Never started: these tests only validate and tokenize.
    return Engine(loaded, tiny_engine_config(max_batch_size=1, max_waiting=0, max_model_len=256, prefill_chunk_size=64))


def service(engine, **overrides) -> ChatService:
    base = dict(model="unused", max_model_len=256, max_tokens_default=32, max_tokens_limit=128, max_messages=8)
    return ChatService(engine, Settings(**{**base, **overrides}))


def test_default_names_are_the_model_and_the_legacy_name(engine):
    chat = service(engine)
    assert chat.served_model_names == (engine.model_name, LEGACY_MODEL_NAME)
    assert chat.resolve_model("") == engine.model_name
    assert chat.resolve_model(LEGACY_MODEL_NAME) == LEGACY_MODEL_NAME
    with pytest.raises(ModelNotFound):
        chat.resolve_model("gpt-4")


def test_configured_names_replace_the_defaults(engine):
    chat = service(engine, served_model_name=["edge", "edge-v2"])
    assert chat.resolve_model("") == "edge"
    with pytest.raises(ModelNotFound):
        chat.resolve_model(LEGACY_MODEL_NAME)


def test_unset_fields_take_server_defaults_and_zero_temperature_is_greedy(engine):
    chat = service(engine, temperature_default=0.6, top_p_default=0.9, top_k_default=7, repetition_penalty_default=1.1)
    sampling = chat.prepare(ChatParams(messages=USER)).request.sampling
    assert (sampling.temperature, sampling.max_tokens, sampling.top_p, sampling.top_k) == (0.6, 32, 0.9, 7)
    assert sampling.repetition_penalty == 1.1 and sampling.seed is None
    explicit = chat.prepare(ChatParams(messages=USER, temperature=0.0, max_tokens=5, seed=3, stop=("x",)))
    assert explicit.request.sampling.greedy and explicit.request.sampling.max_tokens == 5
    assert explicit.request.sampling.seed == 3 and explicit.request.sampling.stop == ("x",)


def test_the_prompt_is_the_chat_template_applied(engine):
    chat = service(engine)
    prepared = chat.prepare(ChatParams(messages=(ChatMessage("system", "Be brief."), *USER)))
    text = engine.loaded.tokenizer.decode(prepared.request.prompt_token_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "params, field",
    [
        (ChatParams(messages=()), "messages"),
        (ChatParams(messages=USER * 9), "messages"),
        (ChatParams(messages=(ChatMessage("robot", "hi"),)), "messages[0].role"),
        (ChatParams(messages=(ChatMessage("user", "hi"), ChatMessage("tool", "42"))), "messages[1].tool_call_id"),
        (ChatParams(messages=(ChatMessage("user", "hi", tool_calls=(CALL,)),)), "messages[0].tool_calls"),
        (ChatParams(messages=(*USER, ChatMessage("assistant", "x", tool_calls=(CALL,)))), "messages[1].tool_calls"),
        (ChatParams(messages=USER, tool_choice=ToolChoice(ToolChoiceMode.REQUIRED)), "tool_choice"),
        (
            ChatParams(messages=USER, tools=(WEATHER,), tool_choice=ToolChoice(ToolChoiceMode.FUNCTION, "nope")),
            "tool_choice",
        ),
        (ChatParams(messages=USER, tools=(WEATHER, WEATHER)), "tools[1].function.name"),
        (ChatParams(messages=USER, tools=(Tool("bad name"),)), "tools[0].function.name"),
        (ChatParams(messages=USER, tools=(Tool("f", parameters='{"type": "array"}'),)), "tools[0].function.parameters"),
        (
            ChatParams(
                messages=USER,
                tools=(Tool("f", parameters='{"type": "object", "properties": {"a": {"type": "nope"}}}'),),
            ),
            "tools[0].function.parameters",
        ),
        (
            ChatParams(
                messages=(*USER, ChatMessage("assistant", "Sure")),
                tools=(WEATHER,),
                tool_choice=ToolChoice(ToolChoiceMode.REQUIRED),
            ),
            "tool_choice",
        ),
        (
            ChatParams(
                messages=USER,
                tools=(WEATHER,),
                tool_choice=ToolChoice(ToolChoiceMode.REQUIRED),
                response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT),
            ),
            "tool_choice",
        ),
        (ChatParams(messages=(), prompt="x", suffix="y"), "suffix"),
        (ChatParams(messages=(ChatMessage("user", "  \n"),)), "messages[0].content"),
        (ChatParams(messages=USER, max_tokens=-1), "max_tokens"),
        (ChatParams(messages=USER, max_tokens=0), "max_tokens"),
        (ChatParams(messages=USER, max_tokens=129), "max_tokens"),
        (ChatParams(messages=USER, temperature=-0.1), "temperature"),
        (ChatParams(messages=USER, temperature=math.nan), "temperature"),
        (ChatParams(messages=USER, temperature=math.inf), "temperature"),
        (ChatParams(messages=USER, temperature=2.5), "temperature"),
        (ChatParams(messages=USER, top_p=0.0), "top_p"),
        (ChatParams(messages=USER, top_p=1.5), "top_p"),
        (ChatParams(messages=USER, top_p=math.nan), "top_p"),
        (ChatParams(messages=USER, top_k=-1), "top_k"),
        (ChatParams(messages=USER, repetition_penalty=0.0), "repetition_penalty"),
        (ChatParams(messages=USER, repetition_penalty=math.inf), "repetition_penalty"),
        (ChatParams(messages=USER, stop=("",)), "stop[0]"),
        (ChatParams(messages=USER, stop=("ok", "x" * 300)), "stop[1]"),
        (ChatParams(messages=USER, stop=tuple("abcdefghijklmnopq")), "stop"),
        (ChatParams(messages=(ChatMessage("user", "word " * 400),)), "messages"),
        (ChatParams(messages=USER, seed=2**64 + 42), "seed"),
        (ChatParams(messages=USER, seed=2**63), "seed"),
        (ChatParams(messages=USER, seed=-(2**63) - 1), "seed"),
        (ChatParams(messages=USER, response_format=schema_format('{"type": "object"')), "response_format"),
        (ChatParams(messages=USER, response_format=schema_format("[1, 2]")), "response_format"),
        (ChatParams(messages=USER, response_format=schema_format('{"type": "foo"}')), "response_format"),
        (ChatParams(messages=USER, response_format=schema_format('{"$ref": "#/$defs/missing"}')), "response_format"),
        (ChatParams(messages=USER, response_format=schema_format(" " * 70_000 + "{}")), "response_format"),
        (ChatParams(messages=USER, n=0), "n"),
        (ChatParams(messages=USER, n=9), "n"),
        (ChatParams(messages=USER, logprobs=True, top_logprobs=21), "top_logprobs"),
        (ChatParams(messages=USER, top_logprobs=1), "top_logprobs"),
        (ChatParams(messages=USER, presence_penalty=2.5), "presence_penalty"),
        (ChatParams(messages=USER, frequency_penalty=math.nan), "frequency_penalty"),
        (ChatParams(messages=USER, logit_bias={1: 100.5}), "logit_bias"),
        (ChatParams(messages=USER, logit_bias={-1: 1.0}), "logit_bias"),
        (ChatParams(messages=USER, logit_bias={10**6: 1.0}), "logit_bias"),  # beyond the vocabulary
        (ChatParams(messages=USER, logit_bias=dict.fromkeys(range(301), 1.0)), "logit_bias"),
    ],
)
def test_each_bad_field_is_named(engine, params, field):
    with pytest.raises(InvalidArgument) as error:
        service(engine).prepare(params)
    assert error.value.field == field
    assert error.value.message.startswith(field + ":")


def test_n_is_bounded_by_the_batch_size_and_sampling_extensions_pass_through(engine):
    with pytest.raises(InvalidArgument) as error:
        service(engine, max_batch_size=2).prepare(ChatParams(messages=USER, n=3))
    assert error.value.field == "n" and "batch size 2" in error.value.message
    params = ChatParams(
        messages=USER,
        n=2,
        logprobs=True,
        top_logprobs=20,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        logit_bias={engine.vocab_size - 1: -100.0, 0: 100.0},
    )
    sampling = service(engine, max_batch_size=2).prepare(params).request.sampling
    assert (sampling.n, sampling.logprobs, sampling.top_logprobs) == (2, True, 20)
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (-2.0, 2.0)
    assert sampling.logit_bias == ((0, 100.0), (engine.vocab_size - 1, -100.0))


def test_count_tokens_matches_the_prompt(engine):
    chat = service(engine)
    assert chat.count_tokens(USER) == len(chat.prepare(ChatParams(messages=USER)).request.prompt_token_ids)


def test_draining_refuses_new_requests(engine):
    chat = service(engine)
    chat.begin_drain()
    with pytest.raises(Unavailable):
        chat.prepare(ChatParams(messages=USER))


def test_int64_seeds_and_valid_response_formats_are_accepted(engine):
    chat = service(engine)
    for seed in (-(2**63), 2**63 - 1):
        assert chat.prepare(ChatParams(messages=USER, seed=seed)).request.sampling.seed == seed
    assert chat.prepare(ChatParams(messages=USER)).request.grammar is None
    assert chat.prepare(ChatParams(messages=USER, response_format=ResponseFormat())).request.grammar is None
    json_mode = chat.prepare(ChatParams(messages=USER, response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT)))
    assert json_mode.request.grammar is not None
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'
    prepared = chat.prepare(ChatParams(messages=USER, response_format=schema_format(schema)))
    assert prepared.request.grammar is not None and prepared.request.grammar.constraint.source == schema


def test_a_prompt_over_the_context_window_is_context_length_exceeded(engine):
    with pytest.raises(ContextLengthExceeded) as error:
        service(engine).prepare(ChatParams(messages=(ChatMessage("user", "word " * 400),)))
    assert error.value.field == "messages"


def test_a_trailing_assistant_message_is_continued(engine):
    chat = service(engine)
    prepared = chat.prepare(ChatParams(messages=(*USER, ChatMessage("assistant", "The answer is"))))
    text = engine.loaded.tokenizer.decode(prepared.request.prompt_token_ids)
    assert text.endswith("<|im_start|>assistant\nThe answer is")


def test_tools_and_tool_messages_reach_the_template_and_forced_calls_get_a_grammar(engine):
    chat = service(engine)
    history = (
        *USER,
        ChatMessage("assistant", "", tool_calls=(CALL,)),
        ChatMessage("tool", "sunny", tool_call_id="call_1"),
    )
    auto = chat.prepare(ChatParams(messages=history, tools=(WEATHER,)))
    assert auto.tool_names == ("get_weather",) and auto.request.grammar is None
    text = engine.loaded.tokenizer.decode(auto.request.prompt_token_ids)
    assert "<|im_start|>tool\nsunny<|im_end|>" in text  # the tiny ChatML template: role and content
    none = chat.prepare(ChatParams(messages=USER, tools=(WEATHER,), tool_choice=ToolChoice(ToolChoiceMode.NONE)))
    assert none.tool_names == () and none.request.grammar is None
    forced = chat.prepare(ChatParams(messages=USER, tools=(WEATHER,), tool_choice=ToolChoice(ToolChoiceMode.REQUIRED)))
    assert forced.request.grammar is not None and "<tool_call>" in forced.request.grammar.constraint.source


def test_a_raw_prompt_skips_the_chat_template(engine):
    prepared = service(engine).prepare(ChatParams(messages=(), prompt="def add(a, b):"))
    assert engine.loaded.tokenizer.decode(prepared.request.prompt_token_ids) == "def add(a, b):"
