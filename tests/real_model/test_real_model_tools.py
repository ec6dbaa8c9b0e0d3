"""Tool calling, prefill and fill-in-the-middle with the real weights."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from harness import running_server

pytestmark = pytest.mark.real_model

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
LIGHT = {
    "type": "object",
    "properties": {"room": {"type": "string", "maxLength": 30}, "on": {"type": "boolean"}},
    "required": ["room", "on"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {"name": "set_light", "description": "Switch a room's light", "parameters": LIGHT},
    },
]
SCHEMAS = {"get_weather": WEATHER, "set_light": LIGHT}


@pytest.fixture(scope="module")
def client(real_model_dir):
    with running_server(real_model_dir, timeout=300) as server:
        yield openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.timeout(3600)  # 20 answers of up to 200 tokens: minutes on a busy 2-core machine
def test_twenty_sampled_required_calls_are_valid_against_their_schemas(client):
    """The acceptance test of issue #13: constrained calls at temperature 1 are valid 100 % of the time."""
    questions = ["What's the weather in Paris?", "Turn off the kitchen light.", "Is it raining in Oslo?"]
    for seed in range(20):
        completion = client.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": questions[seed % len(questions)]}],
            tools=TOOLS,
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_auto_calls_the_right_tool_and_uses_its_result(client):
    messages = [{"role": "user", "content": "What's the weather in Paris? Use celsius."}]
    first = client.chat.completions.create(model="", messages=messages, tools=TOOLS, temperature=0, max_tokens=100)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "Paris"
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 23, "unit": "celsius"}'},
    ]
    second = client.chat.completions.create(model="", messages=messages, tools=TOOLS, temperature=0, max_tokens=60)
    assert second.choices[0].finish_reason == "stop" and "23" in second.choices[0].message.content


def test_a_prefill_is_continued(client):
    answer = client.chat.completions.create(
        model="",
        messages=[
            {"role": "user", "content": "Name the capital of France."},
            {"role": "assistant", "content": "The capital of France is"},
        ],
        temperature=0,
        max_tokens=10,
    )
    assert answer.choices[0].message.content.lstrip().startswith("Paris")


def test_fill_in_the_middle_with_suffix(client):
    completion = client.completions.create(
        model="",
        prompt="def add(a, b):\n    ",
        suffix="\n\nprint(add(1, 2))\n",
        temperature=0,
        max_tokens=16,
    )
    assert "return a + b" in completion.choices[0].text
