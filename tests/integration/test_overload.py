"""Overload: bounded admission end to end, and the request size limit.

200 concurrent streams against a server that allows 16 running + 32 waiting:
every call ends with a full answer or RESOURCE_EXHAUSTED (at once, with a
retry hint, before any message), nothing hangs, and afterwards the server is
SERVING, its running and waiting gauges (/metrics) read 0, and it admits a
full 16 + 32 again — so no slot leaked."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2
from harness import REPO_ROOT, health_status, load_script, running_server

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

RUNNING, WAITING = 16, 32
STREAMS = 200
CONNECTIONS = 10
MAX_TOKENS = 64


def _request(i: int) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=[pb.Message(role="user", content=f"Request {i}: tell me about the fox.")],
        max_tokens=MAX_TOKENS,
        temperature=0.7,
        seed=i,
    )


async def _one(stub, request, timeout: float = 120.0) -> dict:
    started = time.monotonic()
    responses = []
    call = stub.ChatStream(request, timeout=timeout)
    try:
        async for response in call:
            responses.append(response)
        code, trailing = grpc.StatusCode.OK, ()
    except aio.AioRpcError as exc:
        code, trailing = exc.code(), exc.trailing_metadata() or ()
    return {"code": code, "responses": responses, "seconds": time.monotonic() - started, "trailing": dict(trailing)}


async def _storm(target: str, requests: list[pb.ChatRequest]) -> list[dict]:
    # Several connections, as several clients would have.
    channels = [
        aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CONNECTIONS)
    ]
    try:
        stubs = [pb_grpc.QwenServiceStub(channel) for channel in channels]
        for channel in channels:
            await channel.channel_ready()
        return await asyncio.gather(*(_one(stubs[i % CONNECTIONS], r) for i, r in enumerate(requests)))
    finally:
        for channel in channels:
            await channel.close()


def _assert_full_answer(result: dict) -> None:
    final = result["responses"][-1]
    assert final.is_final and all(not r.is_final for r in result["responses"][:-1])
    assert final.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    if final.finish_reason == pb.FINISH_REASON_LENGTH:
        assert final.usage.completion_tokens == MAX_TOKENS


def _gauges(server) -> dict[str, float]:
    """The running and waiting gauges from the server's /metrics."""
    return load_script(REPO_ROOT / "bench" / "soak.py").engine_gauges(server.metrics_url)


def test_200_streams_get_an_answer_or_resource_exhausted(tiny_model_dir):
    with running_server(
        tiny_model_dir, "--max-batch-size", str(RUNNING), "--max-waiting", str(WAITING), "--max-tokens-default", "64"
    ) as server:
        results = asyncio.run(_storm(server.target, [_request(i) for i in range(STREAMS)]))
        ok = [r for r in results if r["code"] == grpc.StatusCode.OK]
        refused = [r for r in results if r["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED]
        others = [(r["code"], r["seconds"]) for r in results if r not in ok and r not in refused]
        assert not others, others
        # The first RUNNING + WAITING arrivals always fit; 200 at once cannot all fit.
        assert len(ok) >= RUNNING + WAITING and refused
        for result in ok:
            _assert_full_answer(result)
        for result in refused:
            assert result["responses"] == []  # refused before any work, not mid-stream
            assert int(result["trailing"]["grpc-retry-pushback-ms"]) > 0
        slowest_refusal = max(r["seconds"] for r in refused)
        median_answer = sorted(r["seconds"] for r in ok)[len(ok) // 2]
        print(
            f"\n{len(ok)} answered, {len(refused)} refused; slowest refusal {slowest_refusal:.2f} s, "
            f"median answer {median_answer:.2f} s"
        )
        # "At once": a refusal never waits for a slot, so it comes back well
        # before a typical admitted stream has finished.
        assert slowest_refusal < median_answer

        assert health_status(server.target) == health_pb2.HealthCheckResponse.SERVING
        assert _gauges(server) == {"qwen_requests_running": 0.0, "qwen_requests_waiting": 0.0}
        # No slot leaked: exactly RUNNING + WAITING concurrent calls are all admitted again.
        again = asyncio.run(_storm(server.target, [_request(1000 + i) for i in range(RUNNING + WAITING)]))
        assert [r["code"] for r in again] == [grpc.StatusCode.OK] * (RUNNING + WAITING)
        for result in again:
            _assert_full_answer(result)
        assert "Traceback" not in server.log


def test_request_over_the_size_limit_is_refused_before_parsing(tiny_model_dir):
    limit = 64 * 1024
    with running_server(tiny_model_dir, "--max-request-bytes", str(limit)) as server:
        options = [("grpc.max_send_message_length", 16 * 1024 * 1024)]
        with grpc.insecure_channel(server.target, options=options) as channel:
            stub = pb_grpc.QwenServiceStub(channel)
            big = pb.ChatRequest(messages=[pb.Message(role="user", content="x" * limit)], max_tokens=4)
            assert big.ByteSize() > limit
            for call in (stub.Chat, lambda r, **kw: list(stub.ChatStream(r, **kw))):
                with pytest.raises(grpc.RpcError) as info:
                    call(big, timeout=30)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as info:
                stub.CountTokens(pb.CountTokensRequest(messages=big.messages), timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # The same limit for HTTP bodies: 413 in the OpenAI error shape.
            import json
            import urllib.error
            import urllib.request

            body = json.dumps({"messages": [{"role": "user", "content": "x" * limit}]}).encode()
            post = urllib.request.Request(
                server.http_url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
            )
            with pytest.raises(urllib.error.HTTPError) as http_error:
                urllib.request.urlopen(post, timeout=30)
            assert http_error.value.code == 413
            assert json.loads(http_error.value.read())["error"]["code"] == "request_too_large"
            # Just under the limit is parsed (and answered: the prompt fits the context or is INVALID_ARGUMENT).
            fits = pb.ChatRequest(messages=[pb.Message(role="user", content="hello " * 1000)], max_tokens=4)
            assert fits.ByteSize() < limit
            assert stub.Chat(fits, timeout=60).is_final


async def test_slow_tokenization_does_not_stall_running_streams(inprocess_server, monkeypatch):
    """Tokenizing a prompt near --max-request-bytes takes a good fraction of
    a second of CPU. It runs on the tokenizer thread, not the event loop, so
    running streams keep flowing meanwhile (stood in for here by a tokenizer
    call that takes 1.5 s for one marked prompt)."""
    import threading

    engine = inprocess_server.engine
    real_encode = engine.encode_chat
    threads: list[str] = []

    def encode_chat(messages, *args, **kwargs):
        threads.append(threading.current_thread().name)
        if messages[-1]["content"] == "slow to tokenize":
            time.sleep(1.5)
        return real_encode(messages, *args, **kwargs)

    monkeypatch.setattr(engine, "encode_chat", encode_chat)
    async with aio.insecure_channel(f"127.0.0.1:{inprocess_server.grpc_port}") as channel:
        stub = pb_grpc.QwenServiceStub(channel)
        slow = pb.ChatRequest(messages=[pb.Message(role="user", content="slow to tokenize")], max_tokens=4)
        stream_request = pb.ChatRequest(
            messages=[pb.Message(role="user", content="keep streaming")], max_tokens=200, temperature=0.0
        )
        arrivals: list[float] = []

        async def stream():
            async for _ in stub.ChatStream(stream_request, timeout=60):
                arrivals.append(time.monotonic())

        streaming = asyncio.create_task(stream())
        while len(arrivals) < 3:
            if streaming.done():  # its error (or a too-short answer), not a wait until the test's timeout
                streaming.result()
                raise AssertionError(f"the stream ended after {len(arrivals)} messages")
            await asyncio.sleep(0.005)
        started = time.monotonic()
        await stub.CountTokens(pb.CountTokensRequest(messages=slow.messages), timeout=60)
        tokenized = time.monotonic()
        await streaming
    during = [t for t in arrivals if started <= t <= tokenized]
    assert tokenized - started >= 1.5
    if arrivals[-1] > tokenized:  # the stream outlived the slow call: it must have flowed throughout
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:]) if a >= started and b <= tokenized]
        assert during and max(gaps, default=0.0) < 0.5, (len(during), max(gaps, default=0.0))
    else:
        assert len(during) > 0
    assert threads and all(name.startswith("qwen-tokenize") for name in threads), threads
