"""Faults: a failure inside one request's generation fails only that request
(INTERNAL, logged) while the other streams complete; SIGTERM drains; a
client killed mid-stream frees its slot.

The in-process tests run the whole server (gRPC, ChatService, engine) in this
process and inject the fault by monkeypatching the sampler or the model
runner for one marked request — no test hook exists in the service."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2

from harness import ServerProcess, health_status
from service.cli import Server
from service.config import Settings
from service.pb.qwen import qwen_service_pb2 as pb
from service.pb.qwen import qwen_service_pb2_grpc as pb_grpc

POISON_SEED = 666


def _request(content: str, max_tokens: int, **kwargs) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.Message(role="user", content=content)], max_tokens=max_tokens, **kwargs)


async def _collect(stub, request, timeout: float = 120.0):
    """(responses, status code) of one stream."""
    responses = []
    try:
        async for response in stub.ChatStream(request, timeout=timeout):
            responses.append(response)
    except aio.AioRpcError as exc:
        return responses, exc.code(), exc.details()
    return responses, grpc.StatusCode.OK, ""


@pytest.fixture
async def inprocess_server(tiny_model_dir):
    settings = Settings(
        model=str(tiny_model_dir), host="127.0.0.1", grpc_port=0, max_batch_size=8, max_tokens_limit=200,
        max_tokens_default=64, dtype="float32"
    )
    server = Server(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.drain_and_stop()


async def _run_with_one_poisoned(server: Server, poisoned: pb.ChatRequest, normal_tokens: int = 60):
    async with aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.QwenServiceStub(channel)
        normal = [
            _request(f"stream number {i}", normal_tokens, temperature=0.8, seed=i, repetition_penalty=1.1)
            for i in range(5)
        ]
        return await asyncio.gather(*(_collect(stub, r) for r in [*normal[:2], poisoned, *normal[2:]]))


def _assert_complete(responses, code, tokens: int) -> None:
    assert code == grpc.StatusCode.OK
    final = responses[-1]
    assert final.is_final and final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    if final.finish_reason == pb.FINISH_REASON_LENGTH:
        assert final.usage.completion_tokens == tokens


async def test_sampler_fault_fails_only_its_request(inprocess_server, monkeypatch, caplog):
    from service.engine import sampling

    real_sample_one = sampling.sample_one
    calls = {"poisoned": 0}

    def sample_one(logits, params, generator):
        if params.seed == POISON_SEED:
            calls["poisoned"] += 1
            if calls["poisoned"] == 6:  # mid-stream, inside a batched decode step
                raise RuntimeError("injected sampler fault")
        return real_sample_one(logits, params, generator)

    monkeypatch.setattr(sampling, "sample_one", sample_one)
    caplog.set_level(logging.ERROR, logger="service")
    poisoned = _request("poisoned", 60, temperature=0.8, seed=POISON_SEED)
    results = await _run_with_one_poisoned(inprocess_server, poisoned)

    responses, code, details = results[2]
    assert code == grpc.StatusCode.INTERNAL, (code, details)
    assert details == "internal error while sampling"
    assert 1 <= len(responses) <= 5 and not any(r.is_final for r in responses)  # failed mid-stream
    for responses, code, _ in results[:2] + results[3:]:
        _assert_complete(responses, code, 60)
    errors = [r for r in caplog.records if "sampling failed for chat-" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    assert errors[0].exc_info and "injected sampler fault" in str(errors[0].exc_info[1])
    # The slot came back: the full batch is admitted again.
    monkeypatch.setattr(sampling, "sample_one", real_sample_one)
    results = await _run_with_one_poisoned(inprocess_server, _request("fine", 20, temperature=0.8, seed=POISON_SEED))
    for responses, code, _ in results:
        assert code == grpc.StatusCode.OK and responses[-1].is_final


async def test_prefill_fault_fails_only_its_request(inprocess_server, monkeypatch, caplog):
    engine = inprocess_server.engine
    runner = engine._scheduler._runner  # the model runner of this in-process engine
    marker = "please fail my prefill"
    poisoned_ids = engine.encode_chat([{"role": "user", "content": marker}])
    real_prefill = runner.prefill

    def prefill(slot, token_ids, start):
        if start == 0 and list(token_ids) == poisoned_ids:
            raise RuntimeError("injected prefill fault")
        return real_prefill(slot, token_ids, start)

    monkeypatch.setattr(runner, "prefill", prefill)
    caplog.set_level(logging.ERROR, logger="service")
    results = await _run_with_one_poisoned(inprocess_server, _request(marker, 60, temperature=0.8, seed=1))
    responses, code, details = results[2]
    assert code == grpc.StatusCode.INTERNAL and details == "internal error during prefill"
    assert responses == []
    for responses, code, _ in results[:2] + results[3:]:
        _assert_complete(responses, code, 60)
    assert any("prefill failed for chat-" in r.getMessage() and r.exc_info for r in caplog.records)


# ----- process-level: SIGTERM drain, SIGKILL of a client --------------------
# The real model: its generation is slow enough (tens of tokens/s on this CPU)
# that streams are reliably still running while the test looks at the server.


# Greedy, the real model answers this with hundreds of tokens.
LONG_PROMPT = "Write a long story about the number 3."


def _start_streams(target: str, count: int, max_tokens: int):
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.QwenServiceStub(channel)
    calls = [
        stub.ChatStream(_request(LONG_PROMPT, max_tokens, temperature=0.0), timeout=600) for _ in range(count)
    ]
    firsts = [next(call) for call in calls]  # every stream is running
    return channel, calls, firsts


def _finish(call):
    responses = []
    try:
        for response in call:
            responses.append(response)
    except grpc.RpcError as exc:
        return responses, exc.code()
    return responses, grpc.StatusCode.OK


def _wait_health(target: str, want: int, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if health_status(target, timeout=0.5) == want:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"health never became {want}")


@pytest.mark.real_model
def test_sigterm_drains_running_streams_then_exits_0(real_model_dir):
    from concurrent.futures import ThreadPoolExecutor

    server = ServerProcess(real_model_dir, "--max-batch-size", "4", "--drain-timeout", "300")
    try:
        server.wait_serving(timeout=180)
        channel, calls, firsts = _start_streams(server.target, 3, 48)
        with ThreadPoolExecutor(len(calls)) as pool:
            finishing = [pool.submit(_finish, call) for call in calls]
            server.process.send_signal(signal.SIGTERM)
            _wait_health(server.target, health_pb2.HealthCheckResponse.NOT_SERVING)
            with grpc.insecure_channel(server.target) as fresh:
                with pytest.raises(grpc.RpcError) as refused:
                    pb_grpc.QwenServiceStub(fresh).Chat(_request("hi", 4), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not all(f.done() for f in finishing), "the streams ended before the drain was observed"
            results = [f.result(timeout=300) for f in finishing]
        assert server.process.wait(timeout=60) == 0
        for first, (rest, code) in zip(firsts, results):
            assert code == grpc.StatusCode.OK
            final = rest[-1]
            assert final.is_final and final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
            if final.finish_reason == pb.FINISH_REASON_LENGTH:
                assert final.usage.completion_tokens == 48
            assert "".join(r.content for r in [first, *rest])
        channel.close()
    finally:
        server.close()


@pytest.mark.real_model
def test_sigterm_cancels_streams_past_the_drain_timeout(real_model_dir):
    server = ServerProcess(real_model_dir, "--max-batch-size", "2", "--drain-timeout", "1", "--max-tokens-limit", "1024")
    try:
        server.wait_serving(timeout=180)
        channel, calls, _ = _start_streams(server.target, 2, 1000)  # minutes of work
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for call in calls:
            rest, code = _finish(call)
            # Cancelled by the server, told so in-band: a final message, not an error.
            assert code == grpc.StatusCode.OK
            assert rest[-1].is_final and rest[-1].finish_reason == pb.FINISH_REASON_CANCELLED
        assert server.process.wait(timeout=60) == 0
        assert time.monotonic() - started < 20
        channel.close()
    finally:
        server.close()


_KILLED_CLIENT = textwrap.dedent(
    """
    import sys, time, grpc
    from service.pb.qwen import qwen_service_pb2 as pb, qwen_service_pb2_grpc as pb_grpc
    channel = grpc.insecure_channel(sys.argv[1])
    request = pb.ChatRequest(messages=[pb.Message(role="user", content="Count to ten thousand.")], max_tokens=1000)
    stream = pb_grpc.QwenServiceStub(channel).ChatStream(request)
    next(stream)
    print("streaming", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.real_model
def test_sigkill_of_a_client_mid_stream_frees_its_slot(real_model_dir):
    from harness import REPO_ROOT

    server = ServerProcess(
        real_model_dir, "--max-batch-size", "1", "--max-waiting", "0", "--max-tokens-limit", "1024"
    )
    try:
        server.wait_serving(timeout=180)
        client = subprocess.Popen(
            [sys.executable, "-c", _KILLED_CLIENT, server.target],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout.readline().strip() == "streaming"
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.QwenServiceStub(channel)
            with pytest.raises(grpc.RpcError) as busy:
                stub.Chat(_request("hi", 2), timeout=30)
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the one slot is taken
            client.kill()
            client.wait()
            killed = time.monotonic()
            while True:
                try:
                    reply = stub.Chat(_request("hi", 2), timeout=30)
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() - killed < 3, "the killed client's slot was not freed"
                    time.sleep(0.05)
            freed_after = time.monotonic() - killed
        assert reply.is_final
        # 1000 tokens would have held the slot for far longer than this.
        assert freed_after < 3
        print(f"slot freed {freed_after:.2f} s after SIGKILL of the client")
    finally:
        server.close()
