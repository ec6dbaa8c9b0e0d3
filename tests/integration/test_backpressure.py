"""Backpressure: a client that does not read its stream has its generation
ended once it falls --max-buffered-tokens behind, which frees its slot; over
HTTP the stalled connection is also closed after --http-write-timeout.
One slot and no queue, so a slot still held shows as RESOURCE_EXHAUSTED."""

from __future__ import annotations

import json
import socket
import time

import grpc
import pytest
from harness import running_server

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

BUFFERED = 32
LONG = pb.ChatRequest(messages=[pb.Message(role="user", content="Tell me a long story.")], max_tokens=8000)
SHORT = pb.ChatRequest(messages=[pb.Message(role="user", content="hi")], max_tokens=2)
# The client's HTTP/2 receive windows stay small and fixed (no BDP probing),
# so a client that does not read really stops the server's writes.
NO_READ_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.max_frame_size", 16384)]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = (
        "--threads",
        "1",
        "--max-batch-size",
        "1",
        "--max-waiting",
        "0",
        "--max-model-len",
        "8192",
        "--max-tokens-limit",
        "8000",
        "--max-buffered-tokens",
        str(BUFFERED),
        "--http-write-timeout",
        "2",
    )
    with running_server(tiny_model_dir, *args) as srv:
        yield srv


def _admitted_within(stub, seconds: float) -> float | None:
    """Seconds until a short call is admitted (the slot is free), or None."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            stub.Chat(SHORT, timeout=30)
            return time.monotonic() - started
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            time.sleep(0.1)
    return None


def test_a_grpc_client_that_does_not_read_loses_its_slot(server):
    with (
        grpc.insecure_channel(server.target, options=NO_READ_OPTIONS) as lazy,
        grpc.insecure_channel(server.target) as other,
    ):
        stream = pb_grpc.QwenServiceStub(lazy).ChatStream(LONG, timeout=120)  # started, never read (yet)
        # Headers come with the first token: the stream holds the only slot
        # before the short calls start (else one of them could take it first).
        stream.initial_metadata()
        stub = pb_grpc.QwenServiceStub(other)
        # The slot comes free: not by finishing 8000 tokens (the stream, read
        # below, ends short of that and not final) but by the buffer bound.
        # No tighter time bound: this machine may be busy with other work.
        assert _admitted_within(stub, 60) is not None
        # The client, reading at last, gets what was buffered, then the reason.
        received = []
        with pytest.raises(grpc.RpcError) as ended:
            for response in stream:
                received.append(response)
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "behind reading its stream" in ended.value.details()
        assert 0 < len(received) < 8000 and not any(r.is_final for r in received)


def test_a_grpc_client_that_reads_gets_its_whole_answer(server):
    with grpc.insecure_channel(server.target, options=NO_READ_OPTIONS) as channel:
        request = pb.ChatRequest(messages=LONG.messages, max_tokens=2000, temperature=0.0)
        final = list(pb_grpc.QwenServiceStub(channel).ChatStream(request, timeout=120))[-1]
        assert final.is_final and final.usage.completion_tokens == 2000


def test_an_http_client_that_does_not_read_is_disconnected_and_loses_its_slot(server):
    body = json.dumps(
        {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 8000, "stream": True}
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small receive window
    sock.connect((server.host, server.http_port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    try:
        with grpc.insecure_channel(server.target) as channel:
            # Freed by the bound, not by the end of 8000 tokens: no [DONE] below.
            assert _admitted_within(pb_grpc.QwenServiceStub(channel), 60) is not None
        # Reading now: what was sent, then the end of the connection (closed by the write timeout).
        sock.settimeout(10)
        started, received = time.monotonic(), b""
        while time.monotonic() - started < 10:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        assert b"[DONE]" not in received
        assert time.monotonic() - started < 10, "the stalled connection was not closed"
    finally:
        sock.close()
