"""Process-level faults with the real model, whose generation is slow enough
(tens of tokens/s on this CPU) that streams are reliably still running while
the test acts: SIGTERM with streams longer than the drain timeout, and a
client process SIGKILLed mid-stream. (A drain that lets streams finish:
tests/integration/test_lifecycle.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
from harness import REPO_ROOT, ServerProcess

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.real_model


def _request(content: str, max_tokens: int, **kwargs) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.Message(role="user", content=content)], max_tokens=max_tokens, **kwargs)


# Greedy, the real model answers this with hundreds of tokens.
LONG_PROMPT = "Write a long story about the number 3."


def _start_streams(target: str, count: int, max_tokens: int):
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.QwenServiceStub(channel)
    calls = [stub.ChatStream(_request(LONG_PROMPT, max_tokens, temperature=0.0), timeout=600) for _ in range(count)]
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


def test_sigterm_cancels_streams_past_the_drain_timeout(real_model_dir):
    server = ServerProcess(
        real_model_dir, "--max-batch-size", "2", "--drain-timeout", "1", "--max-tokens-limit", "1024"
    )
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
    from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb, qwen_service_pb2_grpc as pb_grpc
    channel = grpc.insecure_channel(sys.argv[1])
    request = pb.ChatRequest(messages=[pb.Message(role="user", content="Write a long story about the number 3.")], max_tokens=1000)
    stream = pb_grpc.QwenServiceStub(channel).ChatStream(request)
    next(stream)
    print("streaming", flush=True)
    time.sleep(600)
    """
)


def test_sigkill_of_a_client_mid_stream_frees_its_slot(real_model_dir):
    server = ServerProcess(real_model_dir, "--max-batch-size", "1", "--max-waiting", "0", "--max-tokens-limit", "1024")
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
                # The slot was free when the call that got in was sent; the
                # call's own prefill and decode are not part of the wait.
                sent = time.monotonic()
                try:
                    reply = stub.Chat(_request("hi", 2), timeout=30)
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() - killed < 3, "the killed client's slot was not freed"
                    time.sleep(0.05)
            freed_after = sent - killed
        assert reply.is_final
        # 1000 tokens would have held the slot for far longer than this.
        assert freed_after < 3
        print(f"slot freed {freed_after:.2f} s after SIGKILL of the client")
    finally:
        server.close()
