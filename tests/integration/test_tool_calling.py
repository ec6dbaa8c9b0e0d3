"""Tool calling, assistant prefill and the legacy /v1/completions with the
official openai SDK against a real server process (tiny model, random
weights: forced calls prove the grammar, not the model)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from harness import ServerProcess

from service.tool_calls import MAX_PARALLEL_CALLS

HELLO = [{"role": "user", "content": "What is the weather in Paris?"}]
# Bounded everywhere, so a sampled call closes well within max_tokens.
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_PARAMETERS},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMETERS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)


def assert_valid_calls(calls, names=tuple(SCHEMAS)) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_calls_are_valid_against_their_schema_at_temperature_1(server):
    client = sdk(server)
    for seed in range(12):
        completion = client.chat.completions.create(
            model="",
            messages=HELLO,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=seed % 2 == 0,  # random weights never stop early: up to MAX_PARALLEL_CALLS calls
            temperature=1.0,
            seed=seed,
            max_tokens=500,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.content is None
        assert_valid_calls(choice.message.tool_calls)


def test_a_named_function_is_called_once(server):
    for seed in range(4):
        completion = sdk(server).chat.completions.create(
            model="",
            messages=HELLO,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        calls = completion.choices[0].message.tool_calls
        assert len(calls) == 1
        assert_valid_calls(calls, names=("get_time",))


@pytest.mark.parametrize("parallel", [False, None, True], ids=["false", "unset", "true"])
def test_a_forced_answer_holds_one_call_unless_parallel_calls_are_asked(server, parallel):
    """Unset differs from OpenAI (whose default is true): a small model given
    the choice repeats its call until max_tokens (seen with the real model)."""
    counts = []
    for seed in range(4):
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        completion = sdk(server).chat.completions.create(
            model="",
            messages=HELLO,
            tools=TOOLS,
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=200,
            **extra,
        )
        counts.append(len(completion.choices[0].message.tool_calls))
    if parallel:  # the grammar allows more (tests/unit/test_tool_calls.py); the model decides
        assert all(1 <= count <= MAX_PARALLEL_CALLS for count in counts), counts
    else:
        assert counts == [1, 1, 1, 1]


def test_a_streamed_tool_call_is_reassembled_by_the_sdk(server):
    client = sdk(server)
    request = dict(
        model="", messages=HELLO, tools=TOOLS, tool_choice="required", temperature=1.0, seed=5, max_tokens=200
    )
    whole = client.chat.completions.create(**request)
    with client.chat.completions.stream(**request) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(streamed)
    expected = whole.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in expected
    ]
    chunks = list(client.chat.completions.create(**request, stream=True))
    heads = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert heads[0].id.startswith("call_") and heads[0].function.name == expected[0].function.name
    assert all("<tool_call>" not in (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_tool_choice_none_and_a_history_with_tool_results(server):
    client = sdk(server)
    none = client.chat.completions.create(model="", messages=HELLO, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    history = [
        *HELLO,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(model="", messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > none.usage.prompt_tokens  # the call and its result are in the prompt


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}},
                        },
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"messages": [*HELLO, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ],
)
def test_bad_tool_requests_are_refused_naming_the_param(server, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(server).chat.completions.create(**{"model": "", "messages": HELLO, "max_tokens": 4, **fields})
    assert refused.value.status_code == 400 and refused.value.body["param"] == param


def test_a_trailing_assistant_message_is_continued(server):
    """The prefill's answer is exactly what the model generates after the
    rendered conversation with the assistant's text appended (the same
    prompt through /v1/completions)."""
    client = sdk(server)
    prefill = "The weather is"
    chat = client.chat.completions.create(
        model="", messages=[*HELLO, {"role": "assistant", "content": prefill}], temperature=0, max_tokens=12
    )
    prompt = f"<|im_start|>user\n{HELLO[0]['content']}<|im_end|>\n<|im_start|>assistant\n{prefill}"
    raw = client.completions.create(model="", prompt=prompt, temperature=0, max_tokens=12)
    assert chat.choices[0].message.content == raw.choices[0].text
    assert chat.usage.prompt_tokens == raw.usage.prompt_tokens
    fresh = client.chat.completions.create(model="", messages=HELLO, temperature=0, max_tokens=12)
    assert fresh.usage.prompt_tokens < chat.usage.prompt_tokens


def test_legacy_completions_with_and_without_stream(server):
    client = sdk(server)
    whole = client.completions.create(model="", prompt="def add(a, b):", temperature=0, max_tokens=10, seed=1)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens >= 1
    chunks = list(
        client.completions.create(model="", prompt=["def add(a, b):"], temperature=0, max_tokens=10, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason and chunks[-1].choices[0].text == ""
    echoed = client.completions.create(model="", prompt="def add(a, b):", temperature=0, max_tokens=10, echo=True)
    assert echoed.choices[0].text == "def add(a, b):" + whole.choices[0].text
    usage = list(
        client.completions.create(
            model="", prompt="x", max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    )[-1].usage
    assert usage.completion_tokens == 3


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "return a"}, "suffix"),  # the tiny tokenizer has no fill-in-the-middle tokens
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"n": 2}, "n"),
        ({"logprobs": 2}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_completions_are_refused_naming_the_param(server, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(server).completions.create(**{"model": "", "prompt": "x", "max_tokens": 4, **fields})
    assert refused.value.body["param"] == param


# ------------------------------------------------------------------- gRPC


def grpc_tools() -> list:
    from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb

    return [pb.Tool(name=t["function"]["name"], parameters=json.dumps(t["function"]["parameters"])) for t in TOOLS]


def test_grpc_forced_calls_unary_and_streamed(server, stub):
    from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb

    for seed in range(4):
        request = pb.ChatRequest(
            messages=[pb.Message(**m) for m in HELLO],
            tools=grpc_tools(),
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED),
            temperature=1.0,
            seed=seed,
            max_tokens=500,
        )
        reply = stub.Chat(request, timeout=60)
        assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS and reply.content == ""
        assert_valid_calls([_as_openai(c) for c in reply.tool_calls])
        pieces = list(stub.ChatStream(request, timeout=60))
        assert pieces[-1].is_final and pieces[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
        assert "".join(p.content for p in pieces) == ""  # the markup never shows as content
        streamed = [c for p in pieces for c in p.tool_calls]
        assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in reply.tool_calls]
    named = pb.ToolChoice(mode=pb.ToolChoice.MODE_FUNCTION, function_name="get_time")
    reply = stub.Chat(
        pb.ChatRequest(
            messages=[pb.Message(**m) for m in HELLO], tools=grpc_tools(), tool_choice=named, max_tokens=200
        ),
        timeout=60,
    )
    assert [c.name for c in reply.tool_calls] == ["get_time"]


def _as_openai(call):
    """A gRPC ToolCall in the SDK's shape, for assert_valid_calls."""
    from openai.types.chat import ChatCompletionMessageToolCall

    return ChatCompletionMessageToolCall(
        id=call.id, type="function", function={"name": call.name, "arguments": call.arguments}
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tool_choice": {"mode": 4, "function_name": "nope"}, "with_tools": True}, "tool_choice"),
        ({"tool_choice": {"mode": 3}}, "tool_choice"),
        ({"tool_choice": {"mode": 9}}, "tool_choice.mode"),
        ({"tools": [{"name": "f", "parameters": "{not json"}]}, "tools[0].function.parameters"),
        ({"messages": [*HELLO, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ],
)
def test_grpc_bad_tool_requests_are_invalid_argument_naming_the_field(stub, fields, field):
    import grpc

    from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb

    fields = dict(fields)
    request = pb.ChatRequest(messages=[pb.Message(**m) for m in fields.pop("messages", HELLO)], max_tokens=4)
    if fields.pop("with_tools", False):
        request.tools.extend(grpc_tools())
    for tool in fields.pop("tools", ()):
        request.tools.append(pb.Tool(**tool))
    if "tool_choice" in fields:
        request.tool_choice.CopyFrom(pb.ToolChoice(**fields.pop("tool_choice")))
    with pytest.raises(grpc.RpcError) as refused:
        stub.Chat(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(field)


def test_the_python_sdk_calls_tools_and_sends_the_results_back(server):
    from qwen_grpc_client import QwenClient

    with QwenClient(server.target, timeout=60) as client:
        answer = client.chat(HELLO, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=200)
        assert answer.finish_reason == "tool_calls" and len(answer.tool_calls) == 1
        call = answer.tool_calls[0]
        jsonschema.validate(call.parsed_arguments(), SCHEMAS[call.name])
        history = [
            *HELLO,
            {"role": "assistant", "content": "", "tool_calls": answer.tool_calls},
            {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"},
        ]
        follow_up = client.chat(history, tools=TOOLS, tool_choice="none", max_tokens=4)
        assert follow_up.tool_calls == () and follow_up.prompt_tokens > answer.prompt_tokens
        prefill = client.chat([*HELLO, {"role": "assistant", "content": "It is"}], temperature=0, max_tokens=4)
        assert prefill.finish_reason in ("stop", "length")
