"""The OpenAI wire module on its own: request mapping, settings, and the
shapes we emit checked against the official SDK's own types."""

from __future__ import annotations

import json

import pytest
from openai.types.chat import ChatCompletion as SDKChatCompletion
from openai.types.chat import ChatCompletionChunk as SDKChatCompletionChunk

from service.api import openai_protocol as oai
from service.config import load_settings
from service.errors import InvalidArgument


def parse(**fields):
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return oai.to_chat_params(oai.parse_request(json.dumps(body).encode()))


def test_mapping_to_chat_params():
    params = parse(
        model="m", temperature=0, top_p=0.5, max_completion_tokens=7, stop="END", seed=3, top_k=5,
        repetition_penalty=1.1, user="u", metadata={"a": "b"}, n=1, presence_penalty=0, tool_choice="none",
    )  # fmt: skip
    assert (params.model, params.temperature, params.top_p, params.max_tokens) == ("m", 0, 0.5, 7)
    assert (params.stop, params.seed, params.top_k, params.repetition_penalty) == (("END",), 3, 5, 1.1)
    assert parse(stop=["a", "b"]).stop == ("a", "b")
    assert parse().max_tokens is None and parse().temperature is None  # unset -> server defaults
    developer = oai.parse_request(b'{"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}]}')
    assert [m.role for m in oai.to_chat_params(developer).messages] == ["system", "user"]
    assistant = oai.parse_request(b'{"messages": [{"role": "assistant", "content": null}, {"role": "user", "content": "y"}]}')
    assert oai.to_chat_params(assistant).messages[0].content == ""


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 3}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format.type"),
        ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
        ({"logit_bias": {"1": 2.0}}, "logit_bias"),
    ],
)
def test_unsupported_features_are_refused_by_name(fields, param):
    with pytest.raises(InvalidArgument) as exc_info:
        parse(**fields)
    assert exc_info.value.field == param


def test_emitted_shapes_validate_against_the_openai_sdk_types():
    writer = oai.ChunkWriter("chatcmpl-1", "m", include_usage=True)
    usage = oai.Usage(
        prompt_tokens=3, completion_tokens=2, total_tokens=5, prompt_tokens_details=oai.PromptTokensDetails(cached_tokens=1)
    )
    events = [writer.role(), writer.content("Hel"), writer.finish("lo", "length"), writer.usage(usage)]
    chunks = [SDKChatCompletionChunk.model_validate_json(e.removeprefix(b"data: ").strip()) for e in events]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:3]) == "Hello"
    assert chunks[2].choices[0].finish_reason == "length"
    assert chunks[3].choices == [] and chunks[3].usage.total_tokens == 5
    assert chunks[3].usage.prompt_tokens_details.cached_tokens == 1
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    plain = oai.ChunkWriter("chatcmpl-1", "m", include_usage=False).content("x")
    assert "usage" not in json.loads(plain.removeprefix(b"data: "))
    completion = oai.ChatCompletion(
        id="chatcmpl-1", created=1, model="m", usage=usage,
        choices=[oai.Choice(message=oai.AssistantMessage(content="Hello"), finish_reason="stop")],
    )  # fmt: skip
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
