"""The real weights over the OpenAI-compatible HTTP API (openai SDK)."""

from __future__ import annotations

import json
import re
from typing import Literal

import grpc
import openai
import pytest
from harness import running_server
from pydantic import BaseModel, ConfigDict, Field

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real_server(real_model_dir):
    with running_server(real_model_dir, timeout=120) as server:
        yield server


def test_capital_of_france_over_http(real_server):
    client = openai.OpenAI(base_url=real_server.http_url + "/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model="Qwen2.5-0.5B-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=64,
    )
    assert "Paris" in completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"


def test_chinese_stream_over_http_equals_grpc(real_server):
    """Multi-byte text survives SSE/JSON framing: the streamed pieces join to
    exactly what gRPC answers, and every piece is whole characters."""
    question = "法国的首都是哪里？请用中文回答。"
    client = openai.OpenAI(base_url=real_server.http_url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="Qwen2.5-0.5B-Instruct",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert all("\ufffd" not in piece for piece in pieces)
    text = "".join(pieces)
    assert re.search(r"[\u4e00-\u9fff]", text), text
    request = pb.ChatRequest(messages=[pb.Message(role="user", content=question)], temperature=0, max_tokens=48)
    with grpc.insecure_channel(real_server.target) as channel:
        reply = pb_grpc.QwenServiceStub(channel).Chat(request, timeout=120)
    assert text == reply.content
    assert usage.completion_tokens == reply.usage.completion_tokens


class Lamp(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: Literal["lamp", "heater", "fan"]
    room: str = Field(max_length=20)
    on: bool
    brightness: int = Field(ge=0, le=100)


def test_sdk_parse_fills_a_pydantic_model_at_temperature_1(real_server):
    """chat.completions.parse through the official SDK: every sampled answer
    parses into the model, and the real model fills it sensibly."""
    client = openai.OpenAI(base_url=real_server.http_url + "/v1", api_key="unused", max_retries=0)
    question = "Turn on the kitchen lamp at 80 % brightness. Answer with the device command as JSON."
    parsed = []
    for seed in range(4):
        completion = client.chat.completions.parse(
            model="",
            messages=[{"role": "user", "content": question}],
            response_format=Lamp,
            temperature=1.0,
            seed=seed,
            max_tokens=100,
        )
        assert completion.choices[0].finish_reason == "stop"
        parsed.append(completion.choices[0].message.parsed)
    assert all(isinstance(p, Lamp) for p in parsed)
    assert sum(p.device == "lamp" and p.on for p in parsed) >= 3, parsed


def test_json_mode_answers_a_json_object_over_http_and_grpc(real_server):
    client = openai.OpenAI(base_url=real_server.http_url + "/v1", api_key="unused", max_retries=0)
    question = "Give the capital of France and its population as a JSON object."
    completion = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": question}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=128,
    )
    assert completion.choices[0].finish_reason == "stop"
    answer = json.loads(completion.choices[0].message.content)
    assert isinstance(answer, dict) and "Paris" in json.dumps(answer)
    request = pb.ChatRequest(
        messages=[pb.Message(role="user", content=question)],
        temperature=0,
        max_tokens=128,
        response_format=pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_OBJECT),
    )
    with grpc.insecure_channel(real_server.target) as channel:
        reply = pb_grpc.QwenServiceStub(channel).Chat(request, timeout=120)
    assert reply.content == completion.choices[0].message.content
