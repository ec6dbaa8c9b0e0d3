"""logprobs, n, presence/frequency penalties and logit_bias over both
transports (tiny model server subprocess): the official `openai` SDK over
HTTP, the generated stubs over gRPC."""

from __future__ import annotations

import re
import urllib.request

import grpc
import openai
import pytest
from harness import ServerProcess, running_server

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

HELLO = [{"role": "user", "content": "Hello, world! Stream tokens to the edge."}]
MODEL = "Qwen2.5-0.5B-Instruct"
BATCH = 4


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, "--max-batch-size", str(BATCH), "--threads", "1") as srv:
        yield srv


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.QwenServiceStub(channel)


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)


def create(server: ServerProcess, **kwargs):
    return sdk(server).chat.completions.create(**{"model": MODEL, "messages": HELLO, "max_tokens": 8, **kwargs})


def metric(server: ServerProcess, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


# ------------------------------------------------------------------ HTTP


def test_logprobs_in_openai_shape(server):
    answer = create(server, temperature=0, logprobs=True, top_logprobs=3)
    choice = answer.choices[0]
    assert choice.finish_reason == "length"
    entries = choice.logprobs.content
    assert len(entries) == answer.usage.completion_tokens == 8
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)
        assert entry.bytes == list(entry.token.encode()) or "\\x" in entry.token
    assert create(server).choices[0].logprobs is None


def test_streamed_logprobs_equal_the_unary_ones(server):
    unary = create(server, temperature=0, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    streamed = []
    for chunk in create(server, temperature=0, logprobs=True, top_logprobs=2, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed += choice.logprobs.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in unary]


def test_n_choices_are_seeded_reproducible_and_count_the_prompt_once(server):
    single = create(server, temperature=1.0, seed=11)
    prompt_before = metric(server, "qwen_prompt_tokens_total")
    answer = create(server, n=3, temperature=1.0, seed=11)
    assert metric(server, "qwen_prompt_tokens_total") - prompt_before == single.usage.prompt_tokens
    assert [c.index for c in answer.choices] == [0, 1, 2]
    contents = [c.message.content for c in answer.choices]
    assert contents[0] == single.choices[0].message.content  # choice 0 uses the seed itself
    assert len(set(contents)) == 3
    assert answer.usage.prompt_tokens == single.usage.prompt_tokens
    assert answer.usage.completion_tokens == 3 * 8
    again = create(server, n=3, temperature=1.0, seed=11)
    assert [c.message.content for c in again.choices] == contents

    streamed = {0: "", 1: "", 2: ""}
    finishes = {}
    for chunk in create(server, n=3, temperature=1.0, seed=11, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert [streamed[i] for i in range(3)] == contents
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert usage.prompt_tokens == single.usage.prompt_tokens and usage.completion_tokens == 24


def test_logit_bias_forces_a_token(server):
    answer = create(server, logit_bias={"300": 100}, logprobs=True)
    tokens = [entry.token for entry in answer.choices[0].logprobs.content]
    assert len(tokens) == 8 and len(set(tokens)) == 1
    banned = create(server, logit_bias={"300": -100}, logprobs=True, top_logprobs=20)
    assert all(
        top.logprob < -50 or top.token != tokens[0]
        for e in banned.choices[0].logprobs.content
        for top in e.top_logprobs
    )


def test_penalties_are_accepted_and_change_a_biased_answer(server):
    repetitive = create(server, max_tokens=20, logit_bias={"300": 10}).choices[0].message.content
    varied = create(server, max_tokens=20, logit_bias={"300": 10}, frequency_penalty=2).choices[0].message.content
    assert varied != repetitive
    assert create(server, presence_penalty=-2, frequency_penalty=2).choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"n": BATCH + 1}, "n"),  # more choices than batch slots
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs, as OpenAI
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),  # not below the vocabulary size
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ],
)
def test_bad_values_are_400_naming_the_param(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as exc_info:
        create(server, **kwargs)
    assert exc_info.value.status_code == 400
    assert exc_info.value.body["param"] == param


# ------------------------------------------------------------------ gRPC


def grpc_request(**fields) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.Message(role="user", content=HELLO[0]["content"])], max_tokens=8, **fields)


def test_grpc_n_choices_and_logprobs(stub, server):
    unary = stub.Chat(grpc_request(n=2, temperature=1.0, seed=11, logprobs=True, top_logprobs=2))
    assert [c.index for c in unary.choices] == [0, 1]
    assert unary.content == unary.choices[0].content
    assert unary.content == create(server, temperature=1.0, seed=11).choices[0].message.content
    assert list(unary.logprobs) == list(unary.choices[0].logprobs) and len(unary.logprobs) == 8
    assert all(len(entry.top_logprobs) == 2 for entry in unary.logprobs)
    assert unary.usage.completion_tokens == 16

    texts, finishes, logprobs = {0: "", 1: ""}, {}, {0: [], 1: []}
    stream = list(stub.ChatStream(grpc_request(n=2, temperature=1.0, seed=11, logprobs=True, top_logprobs=2)))
    for message in stream:
        texts[message.choice_index] += message.content
        logprobs[message.choice_index] += list(message.logprobs)
        if message.finish_reason:
            finishes[message.choice_index] = message.finish_reason
    assert [m.is_final for m in stream].count(True) == 1 and stream[-1].is_final
    assert stream[-1].usage.completion_tokens == 16
    assert texts == {c.index: c.content for c in unary.choices}
    assert logprobs == {c.index: list(c.logprobs) for c in unary.choices}
    assert finishes == {0: pb.FINISH_REASON_LENGTH, 1: pb.FINISH_REASON_LENGTH}


def test_grpc_logit_bias_and_old_style_requests(stub):
    forced = stub.Chat(grpc_request(logit_bias={300: 100.0}, logprobs=True))
    assert {entry.token_id for entry in forced.logprobs} == {300}
    plain = stub.Chat(grpc_request())
    assert not plain.logprobs and not plain.choices and plain.usage.completion_tokens == 8


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"n": 9}, "n"),
        ({"n": BATCH + 1}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {10**9: 1.0}}, "logit_bias"),
        ({"logit_bias": {1: 1000.0}}, "logit_bias"),
    ],
)
def test_grpc_bad_values_are_invalid_argument_naming_the_field(stub, fields, field):
    with pytest.raises(grpc.RpcError) as exc_info:
        stub.Chat(grpc_request(**fields))
    assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in exc_info.value.details()


def test_python_sdk_exposes_choices_and_logprobs(server):
    from qwen_grpc_client import QwenClient, build_request

    plain = build_request(HELLO)
    assert not plain.HasField("n") and not plain.logprobs and not plain.logit_bias  # old behaviour unless asked
    with QwenClient(server.target, timeout=60) as client:
        result = client.chat(HELLO, n=2, temperature=1.0, seed=11, max_tokens=8, logprobs=True, top_logprobs=3)
        assert [c.index for c in result.choices] == [0, 1]
        assert result.choices[0].content == result.content and result.choices[0].logprobs == result.logprobs
        assert all(len(entry.top_logprobs) == 3 for c in result.choices for entry in c.logprobs)
        assert result.completion_tokens == 16
        single = client.chat(HELLO, max_tokens=8, temperature=0, frequency_penalty=1.5, logit_bias={300: 100})
        assert len(single.choices) == 1 and single.choices[0].content == single.content and not single.logprobs
        pieces = list(client.stream(HELLO, n=2, temperature=1.0, seed=11, max_tokens=8, logprobs=True))
        assert {p.choice_index for p in pieces} == {0, 1}
        assert "".join(p.content for p in pieces if p.choice_index == 1) == result.choices[1].content
