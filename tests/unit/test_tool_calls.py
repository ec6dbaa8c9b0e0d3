"""Qwen2.5's tool-call format: the incremental parser and the forcing grammar."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest

from service.tool_calls import (
    MAX_PARALLEL_CALLS,
    CallDelta,
    ContentDelta,
    Tool,
    ToolCallParser,
    ToolChoice,
    ToolChoiceMode,
    forced_call_grammar,
)

ANSWER = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)


def run(parser: ToolCallParser, pieces: list[str]) -> list[ContentDelta | CallDelta]:
    out: list[ContentDelta | CallDelta] = []
    for piece in pieces:
        out += parser.feed(piece)
    return out + parser.flush()


@pytest.mark.parametrize("step", [1, 2, 5, len(ANSWER)])
def test_calls_are_split_from_content_however_the_text_is_cut(step):
    parser = ToolCallParser(["get_weather", "get_time"])
    deltas = run(parser, [ANSWER[i : i + step] for i in range(0, len(ANSWER), step)])
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    calls = [d for d in deltas if isinstance(d, CallDelta)]
    assert content == "Let me look.\n"
    assert [(c.index, c.call.name, json.loads(c.call.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"}),
        (1, "get_time", {"zone": "CET"}),
    ]
    assert all(c.call.id.startswith("call_") for c in calls) and calls[0].call.id != calls[1].call.id
    assert parser.calls == [c.call for c in calls]


def test_malformed_or_unknown_calls_and_lookalikes_stay_content():
    text = '<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call> a <tool_cal> b <tool_call>{oops'
    parser = ToolCallParser(["get_weather"])
    deltas = run(parser, list(text))
    assert parser.calls == [] and "".join(d.text for d in deltas if isinstance(d, ContentDelta)) == text


FENCED = '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```'
TWO_BARE = '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}'


@pytest.mark.parametrize("step", [1, 3, 1000])
@pytest.mark.parametrize(
    "text,expected",
    [
        (FENCED, [("get_weather", {"city": "Paris"})]),
        (TWO_BARE, [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]),
    ],
    ids=["fenced", "two-bare"],
)
def test_an_answer_of_tagless_calls_is_calls(step, text, expected):
    """What Qwen2.5-Coder-0.5B answers to tool_choice auto: the call without its tags."""
    parser = ToolCallParser(["get_weather", "get_time"])
    deltas = run(parser, [text[i : i + step] for i in range(0, len(text), step)])
    assert all(isinstance(d, CallDelta) for d in deltas)
    assert [(d.call.name, json.loads(d.call.arguments)) for d in deltas] == expected


@pytest.mark.parametrize(
    "text,released_before_the_end",
    [
        ('{"answer": 42}', '{"ans'),  # JSON that is not a call: released once it cannot be one
        ("```python\nprint(1)\n```", "```pyth"),
        ('Sure: {"name": "get_weather", "arguments": {}}', "Sure: "),  # not the whole answer
        ('{"name": "get_weather", "arguments": {}} and then some text', ""),
        ('{"name": "rm", "arguments": {}}', ""),  # an unknown tool
        ('{"name": "get_weather", "arguments": {"city": "Par', ""),  # cut by max_tokens
    ],
)
def test_other_answers_stay_content_as_written(text, released_before_the_end):
    parser = ToolCallParser(["get_weather"])
    early = [d for piece in text for d in parser.feed(piece)]
    deltas = early + parser.flush()
    assert parser.calls == [] and "".join(d.text for d in deltas if isinstance(d, ContentDelta)) == text
    released = "".join(d.text for d in early if isinstance(d, ContentDelta))
    assert released.startswith(released_before_the_end) and (released_before_the_end or not released)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return hf, llguidance.hf.from_tokenizer(hf, n_vocab=len(hf))


def test_the_grammar_accepts_only_calls_of_the_tools_with_valid_arguments(tokenizer):
    hf, ll_tokenizer = tokenizer
    city = '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}'
    tools = [Tool("get_weather", parameters=city), Tool("get_time")]
    required = forced_call_grammar(tools, ToolChoice(ToolChoiceMode.REQUIRED), parallel=True)
    named = forced_call_grammar(tools, ToolChoice(ToolChoiceMode.FUNCTION, "get_time"), parallel=True)
    single = forced_call_grammar(tools, ToolChoice(ToolChoiceMode.REQUIRED), parallel=False)
    weather = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    time = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'

    def accepts(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar))
        assert not matcher.is_error(), matcher.get_error()
        ids = hf.encode(text, add_special_tokens=False)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    assert accepts(required, weather) and accepts(required, weather + "\n" + time)
    assert not accepts(single, weather + "\n" + time) and accepts(single, time)
    assert accepts(required, "\n".join([time] * MAX_PARALLEL_CALLS))
    assert not accepts(required, "\n".join([time] * (MAX_PARALLEL_CALLS + 1)))
    assert accepts(named, time) and not accepts(named, weather)
    assert not accepts(required, weather.replace('"city": "Oslo"', '"town": "Oslo"'))
    assert not accepts(required, "Sure! " + weather)
    assert not accepts(required, weather[:-3])


def test_with_tag_tokens_in_the_vocabulary_the_grammar_uses_them(tiny_model_dir):
    """Qwen2.5 has <tool_call> and </tool_call> as added tokens; llguidance
    matches those only by id, and the model must be allowed to use them."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    hf.add_tokens(["<tool_call>", "</tool_call>"])
    ll_tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=len(hf))
    tags = hf.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    grammar = forced_call_grammar(
        [Tool("get_time")], ToolChoice(ToolChoiceMode.REQUIRED), parallel=True, tag_tokens=tags
    )
    ids = hf.encode('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', add_special_tokens=False)
    assert ids[0] == tags[0] and ids[-1] == tags[1]
    matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar))
    assert matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()
