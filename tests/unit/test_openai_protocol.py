"""The OpenAI wire module on its own: request mapping, settings, and the
shapes we emit checked against the official SDK's own types."""

from __future__ import annotations

import json

import pytest
from openai.types.chat import ChatCompletion as SDKChatCompletion
from openai.types.chat import ChatCompletionChunk as SDKChatCompletionChunk

from service.api import openai_protocol as oai
from service.chat import ResponseFormat, ResponseFormatType
from service.config import load_settings
from service.errors import InvalidArgument


def parse(**fields):
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return oai.to_chat_params(oai.parse_request(json.dumps(body).encode()))


def test_mapping_to_chat_params():
    params = parse(
        model="m",
        temperature=0,
        top_p=0.5,
        max_completion_tokens=7,
        stop="END",
        seed=3,
        top_k=5,
        repetition_penalty=1.1,
        user="u",
        metadata={"a": "b"},
        n=1,
        presence_penalty=0,
        tool_choice="none",
    )
    assert (params.model, params.temperature, params.top_p, params.max_tokens) == ("m", 0, 0.5, 7)
    assert (params.stop, params.seed, params.top_k, params.repetition_penalty) == (("END",), 3, 5, 1.1)
    assert parse(stop=["a", "b"]).stop == ("a", "b")
    assert parse().max_tokens is None and parse().temperature is None  # unset -> server defaults
    developer = oai.parse_request(
        b'{"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}]}'
    )
    assert [m.role for m in oai.to_chat_params(developer).messages] == ["system", "user"]
    assistant = oai.parse_request(
        b'{"messages": [{"role": "assistant", "content": null}, {"role": "user", "content": "y"}]}'
    )
    assert oai.to_chat_params(assistant).messages[0].content == ""


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 1.5}, "n"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "f", "schema": []}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_object", "json_schema": {"name": "f"}}}, "response_format.json_schema"),
        ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
        ({"logit_bias": {"a1": 2.0}}, "logit_bias"),
        ({"logit_bias": {"-1": 2.0}}, "logit_bias"),
        ({"logit_bias": {"1": "2"}}, "logit_bias"),
    ],
)
def test_unsupported_features_are_refused_by_name(fields, param):
    with pytest.raises(InvalidArgument) as exc_info:
        parse(**fields)
    assert exc_info.value.field == param


def test_sampling_extensions_map_to_chat_params():
    params = parse(
        n=3,
        logprobs=True,
        top_logprobs=5,
        presence_penalty=0.5,
        frequency_penalty=-1,
        logit_bias={"17": 100, "4": -2.5},
    )
    assert (params.n, params.logprobs, params.top_logprobs) == (3, True, 5)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.logit_bias == {17: 100.0, 4: -2.5}
    unset = parse(n=None, logprobs=None, top_logprobs=None, logit_bias=None)
    assert (unset.n, unset.logprobs, unset.top_logprobs, unset.logit_bias) == (None, False, None, None)


def test_response_format_and_nulls_map_as_openai_sends_them():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = parse(
        response_format={"type": "json_schema", "json_schema": {"name": "form", "schema": schema, "strict": True}}
    )
    assert fmt.response_format == ResponseFormat(ResponseFormatType.JSON_SCHEMA, json.dumps(schema))
    no_schema = parse(response_format={"type": "json_schema", "json_schema": {"name": "any"}})
    assert no_schema.response_format.json_schema == "{}"
    assert parse(response_format={"type": "json_object"}).response_format == ResponseFormat(
        ResponseFormatType.JSON_OBJECT
    )
    assert parse(response_format={"type": "text"}).response_format == ResponseFormat()
    assert parse().response_format is None
    nulls = dict.fromkeys(["stream", "stream_options", "temperature", "seed", "stop", "response_format", "n", "user"])
    wire = oai.parse_request(json.dumps({"messages": [{"role": "user", "content": "hi"}], **nulls}).encode())
    assert not wire.stream and oai.to_chat_params(wire).seed is None


def sse_events(data: bytes) -> list[bytes]:
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    return [event.removeprefix(b"data: ") for event in data.split(b"\n\n")[:-1]]


def test_emitted_shapes_validate_against_the_openai_sdk_types():
    writer = oai.ChunkWriter("chatcmpl-1", "m", include_usage=True)
    usage = oai.Usage(
        prompt_tokens=3,
        completion_tokens=2,
        total_tokens=5,
        prompt_tokens_details=oai.PromptTokensDetails(cached_tokens=1),
    )
    data = writer.role() + writer.content("Hel") + writer.finish("lo", "length") + writer.usage(usage)
    chunks = [SDKChatCompletionChunk.model_validate_json(event) for event in sse_events(data)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:4]) == "Hello"
    # As OpenAI: the last text in its own chunk, the finish reason with an empty delta.
    assert chunks[2].choices[0].finish_reason is None and chunks[2].choices[0].delta.content == "lo"
    assert chunks[3].choices[0].finish_reason == "length"
    assert json.loads(sse_events(data)[3])["choices"][0]["delta"] == {}
    assert chunks[4].choices == [] and chunks[4].usage.total_tokens == 5
    assert chunks[4].usage.prompt_tokens_details.cached_tokens == 1
    assert len(sse_events(writer.finish("", "stop"))) == 1
    plain = oai.ChunkWriter("chatcmpl-1", "m", include_usage=False).content("x")
    assert "usage" not in json.loads(plain.removeprefix(b"data: "))
    completion = oai.ChatCompletion(
        id="chatcmpl-1",
        created=1,
        model="m",
        usage=usage,
        choices=[oai.Choice(message=oai.AssistantMessage(content="Hello"), finish_reason="stop")],
    )
    parsed = SDKChatCompletion.model_validate_json(completion.model_dump_json())
    assert parsed.choices[0].message.content == "Hello" and parsed.usage.completion_tokens == 2
    assert parsed.usage.prompt_tokens_details.cached_tokens == 1


def test_http_settings(monkeypatch):
    assert load_settings([]).http is True and load_settings([]).http_port == 8000
    assert load_settings(["--no-http"]).http is False
    monkeypatch.setenv("QWEN_HTTP_PORT", "9001")
    monkeypatch.setenv("QWEN_HTTP", "false")
    assert (load_settings([]).http_port, load_settings([]).http) == (9001, False)
    assert load_settings(["--http-port", "9002", "--http"]).http_port == 9002
    with pytest.raises(ValueError):
        load_settings(["--http-port", "70000"])
