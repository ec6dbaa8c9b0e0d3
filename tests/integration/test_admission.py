"""Admission before tokenizing: huge prompts, bursts against a full server and
a flooded tokenizer are refused at once, and a small request behind them
stays fast. Real server, tiny model (its tokenizer takes ~0.2 s per 150 KB
and ~1.7 s per MB on this machine, so queueing would show)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc import aio
from harness import running_server

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

MB_PROMPT = ("The quick brown fox jumps over the lazy dog. " * 23000)[:1_000_000]
PROMPT_150KB = MB_PROMPT[:150_000]  # below the byte bound (8192 tokens x 24 bytes): must be tokenized


def _chat(content: str, max_tokens: int = 1) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.Message(role="user", content=content)], max_tokens=max_tokens)


async def _timed(call) -> tuple[str, float]:
    started = time.monotonic()
    try:
        await call
        code = "OK"
    except aio.AioRpcError as exc:
        code = exc.code().name
    return code, time.monotonic() - started


@pytest.fixture(scope="module")
def roomy_server(tiny_model_dir):
    """Free slots, a tokenizer queue of 310 KB (two 150 KB prompts and small ones)."""
    args = (
        "--threads",
        "1",
        "--max-batch-size",
        "4",
        "--max-waiting",
        "16",
        "--max-model-len",
        "8192",
        "--max-tokens-limit",
        "8000",
        "--max-tokenizer-queue-bytes",
        "310000",
    )
    with running_server(tiny_model_dir, *args) as server:
        yield server


def test_prompts_too_long_by_their_bytes_are_refused_without_tokenizing(roomy_server):
    async def run():
        async with aio.insecure_channel(roomy_server.target) as channel:
            stub = pb_grpc.QwenServiceStub(channel)
            huge = [asyncio.ensure_future(_timed(stub.Chat(_chat(MB_PROMPT), timeout=60))) for _ in range(16)]
            await asyncio.sleep(0.2)
            small = await _timed(stub.Chat(_chat("hi"), timeout=60))
            count = await _timed(
                stub.CountTokens(pb.CountTokensRequest(messages=[pb.Message(role="user", content="hi")]), timeout=60)
            )
            return await asyncio.gather(*huge), small, count

    huge, small, count = asyncio.run(run())
    assert {code for code, _ in huge} == {"INVALID_ARGUMENT"}
    assert max(seconds for _, seconds in huge) < 1.0, huge  # 16 x 1.7 s if tokenized
    assert small[0] == "OK" and small[1] < 1.0, small
    assert count[0] == "OK" and count[1] < 0.5, count


def test_a_flooded_tokenizer_refuses_at_once_and_small_requests_stay_fast(roomy_server):
    async def run():
        async with aio.insecure_channel(roomy_server.target) as channel:
            stub = pb_grpc.QwenServiceStub(channel)
            burst = [
                asyncio.ensure_future(
                    _timed(
                        stub.CountTokens(
                            pb.CountTokensRequest(messages=[pb.Message(role="user", content=PROMPT_150KB)]), timeout=60
                        )
                    )
                )
                for _ in range(12)
            ]
            await asyncio.sleep(0.05)
            small = await _timed(stub.Chat(_chat("hi"), timeout=60))
            return await asyncio.gather(*burst), small

    burst, small = asyncio.run(run())
    refused = [seconds for code, seconds in burst if code == "RESOURCE_EXHAUSTED"]
    counted = [seconds for code, seconds in burst if code == "OK"]
    assert len(refused) >= 8 and len(counted) >= 2, burst
    assert max(refused) < 0.3, refused  # at once, not after waiting for the tokenizer
    assert small[0] == "OK" and small[1] < 1.0, small  # at most 300 KB of tokenizing ahead of it


def test_a_full_server_refuses_before_tokenizing_on_grpc_and_http(single_slot_server):
    """One slot, no queue: while a long stream holds the slot, a burst of
    150 KB prompts is refused at once (not each after its tokenization)."""
    server = single_slot_server
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.QwenServiceStub(channel)
        holder = stub.ChatStream(_chat("Tell me a long story.", max_tokens=8000), timeout=120)
        next(holder)  # the slot is taken

        async def burst():
            async with aio.insecure_channel(server.target) as aio_channel:
                aio_stub = pb_grpc.QwenServiceStub(aio_channel)
                return await asyncio.gather(
                    *(_timed(aio_stub.Chat(_chat(PROMPT_150KB), timeout=60)) for _ in range(12))
                )

        results = asyncio.run(burst())
        body = json.dumps({"messages": [{"role": "user", "content": PROMPT_150KB}], "max_tokens": 1}).encode()
        request = urllib.request.Request(
            server.http_url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        http_seconds = time.monotonic() - started
        holder.cancel()
    assert {code for code, _ in results} == {"RESOURCE_EXHAUSTED"}, results
    assert max(seconds for _, seconds in results) < 0.5, results  # 12 x 0.2 s if tokenized first
    assert refused.value.code == 429 and refused.value.headers["Retry-After"] == "1"
    assert http_seconds < 0.5
