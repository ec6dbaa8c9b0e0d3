"""The prefix cache end to end (tiny model, real server processes): the
second turn of a chat reuses the first turn's prompt and answer, reports it
in gRPC and HTTP usage and in the metrics, and answers exactly as a server
without the cache."""

from __future__ import annotations

import urllib.request

import grpc
import openai
import pytest
from harness import running_server

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

SYSTEM = "You are a careful assistant. The quick brown fox jumps over the lazy dog. Stream tokens over gRPC."
BLOCK = 16


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    with running_server(tiny_model_dir, "--threads", "1") as cached:
        with running_server(tiny_model_dir, "--threads", "1", "--no-prefix-caching") as plain:
            yield cached, plain


def grpc_conversation(server, questions: list[str]) -> list[pb.ChatResponse]:
    messages = [pb.Message(role="system", content=SYSTEM)]
    replies = []
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.QwenServiceStub(channel)
        for question in questions:
            messages.append(pb.Message(role="user", content=question))
            reply = stub.Chat(pb.ChatRequest(messages=messages, temperature=0, max_tokens=24), timeout=60)
            messages.append(pb.Message(role="assistant", content=reply.content))
            replies.append(reply)
    return replies


def metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


def test_grpc_usage_reports_reused_tokens_and_the_answers_do_not_change(servers):
    cached, plain = servers
    questions = ["What is the capital of France?", "And of Germany?", "def add(a, b):"]
    with_cache, without = grpc_conversation(cached, questions), grpc_conversation(plain, questions)
    assert [r.content for r in with_cache] == [r.content for r in without]
    assert [r.usage.prompt_tokens for r in with_cache] == [r.usage.prompt_tokens for r in without]
    assert all(r.usage.cached_prompt_tokens == 0 for r in without)
    assert with_cache[0].usage.cached_prompt_tokens == 0
    for previous, reply in zip(with_cache, with_cache[1:]):
        usage = reply.usage
        # At least the previous turn's prompt, in whole blocks; always one token left to compute.
        assert usage.cached_prompt_tokens >= previous.usage.prompt_tokens // BLOCK * BLOCK
        assert usage.cached_prompt_tokens % BLOCK == 0 and usage.cached_prompt_tokens < usage.prompt_tokens


def test_http_usage_has_openai_cached_tokens_and_metrics_count_them(servers):
    cached, plain = servers
    hits_before = metric(cached, "qwen_prefix_cache_hit_tokens_total")
    client = openai.OpenAI(base_url=cached.http_url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello, world!"}]
    usages = []
    for follow_up in ("Tell me more.", None):
        completion = client.chat.completions.create(model="", messages=messages, max_tokens=16, temperature=0)
        usages.append(completion.usage)
        messages += [{"role": "assistant", "content": completion.choices[0].message.content}]
        if follow_up:
            messages.append({"role": "user", "content": follow_up})
    assert usages[1].prompt_tokens_details.cached_tokens >= usages[0].prompt_tokens // BLOCK * BLOCK > 0
    reused = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    assert metric(cached, "qwen_prefix_cache_hit_tokens_total") - hits_before == reused
    assert 0 < metric(cached, "qwen_prefix_cache_blocks_used") <= metric(cached, "qwen_prefix_cache_blocks_limit")
    assert metric(plain, "qwen_prefix_cache_blocks_limit") == 0
    assert metric(plain, "qwen_prefix_cache_hit_tokens_total") == 0
