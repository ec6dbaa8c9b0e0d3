"""The real weights over the OpenAI-compatible HTTP API (openai SDK)."""

from __future__ import annotations

import re

import grpc
import openai
import pytest

from harness import running_server
from service.pb.qwen import qwen_service_pb2 as pb
from service.pb.qwen import qwen_service_pb2_grpc as pb_grpc

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
