"""The OpenAI-compatible HTTP API against a real server subprocess (tiny
model), with the official `openai` SDK as the client, plus raw requests for
what an SDK never sends (malformed JSON, wrong types, disconnects)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2
from harness import ONE_SLOT_ARGS, ServerProcess, free_port, health_status, running_server

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

HELLO = [{"role": "user", "content": "Hello, world! Stream tokens to the edge."}]
MODEL = "Qwen2.5-0.5B-Instruct"  # the legacy name every replica also answers to


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir) as srv:
        yield srv


def sdk(server: ServerProcess, **kwargs) -> openai.OpenAI:
    # max_retries=0: a test must see the server's first answer (429/503).
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, **kwargs)


def raw(server: ServerProcess, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection(server.host, server.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def error_of(body: bytes) -> dict:
    payload = json.loads(body)
    assert set(payload) == {"error"}, payload
    assert {"message", "type", "param", "code"} <= set(payload["error"]), payload
    return payload["error"]


# ------------------------------------------------------------ happy paths


def test_models_list_and_retrieve(server):
    client = sdk(server)
    ids = [m.id for m in client.models.list().data]
    assert len(ids) == 2 and ids[1] == "Qwen2.5-0.5B-Instruct"
    with grpc.insecure_channel(server.target) as channel:
        grpc_ids = [m.id for m in pb_grpc.QwenServiceStub(channel).ListModels(pb.ListModelsRequest()).models]
    assert ids == grpc_ids
    assert client.models.retrieve(ids[1]).id == ids[1]
    with pytest.raises(openai.NotFoundError) as exc_info:
        client.models.retrieve("no-such-model")
    assert exc_info.value.body["code"] == "model_not_found"


def test_non_streaming_answer_equals_grpc(server):
    completion = sdk(server).chat.completions.create(
        model="Qwen2.5-0.5B-Instruct", messages=HELLO, max_tokens=24, temperature=0
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "Qwen2.5-0.5B-Instruct"
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 24
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 24
    request = pb.ChatRequest(
        messages=[pb.Message(**m) for m in HELLO], model="Qwen2.5-0.5B-Instruct", max_tokens=24, temperature=0
    )
    with grpc.insecure_channel(server.target) as channel:
        reply = pb_grpc.QwenServiceStub(channel).Chat(request, timeout=30)
    assert choice.message.content == reply.content
    assert completion.usage.prompt_tokens == reply.usage.prompt_tokens


def test_streaming_with_usage_equals_non_streaming(server):
    client = sdk(server)
    whole = client.chat.completions.create(messages=HELLO, model="", max_tokens=32, temperature=0)
    chunks = list(
        client.chat.completions.create(
            messages=HELLO, model="", max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len(chunks) > 3
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 32
    assert all(c.usage is None for c in content_chunks)
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == whole.choices[0].message.content
    assert usage_chunk.usage == whole.usage


def test_stream_without_usage_is_plain_sse_ending_in_done(server):
    body = json.dumps({"messages": HELLO, "max_tokens": 8, "stream": True}).encode()
    status, headers, payload = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = payload.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_seed_and_stop(server):
    client = sdk(server)

    def ask(**kw):
        return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, **kw).choices[0]

    first, second = ask(temperature=1.0, seed=7), ask(temperature=1.0, seed=7)
    assert first.message.content == second.message.content
    greedy = ask(temperature=0).message.content
    stop = greedy[10:13]
    assert stop.strip(), "the tiny model's greedy answer is expected to be long enough"
    for form in (stop, [stop, "never-there"]):
        stopped = ask(temperature=0, stop=form)
        assert stopped.finish_reason == "stop"
        assert stopped.message.content == greedy[: greedy.index(stop)]


def test_developer_role_and_text_parts(server):
    client = sdk(server)
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *HELLO], max_tokens=8, temperature=0
    )
    parts = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            *HELLO,
        ],
        max_tokens=8,
        temperature=0,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens


def test_web_page_is_served_without_external_assets(server):
    status, headers, body = raw(server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    html = body.decode()
    assert "/v1/chat/completions" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must work offline"
    assert "url(http" not in html and "@import" not in html


# --------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
        ({"n": 9}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
        ({"extra_body": {"top_k": -1}}, "top_k"),
        ({"extra_body": {"frobnicate": True}}, "frobnicate"),
    ],
)
def test_invalid_arguments_are_400_naming_the_param(server, kwargs, param):
    args = {"model": MODEL, "messages": HELLO, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as exc_info:
        sdk(server).chat.completions.create(**args)
    assert exc_info.value.status_code == 400
    assert exc_info.value.body["param"] == param
    assert exc_info.value.body["type"] == "invalid_request_error"
    assert param in exc_info.value.body["message"]


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as exc_info:
        sdk(server).chat.completions.create(messages=HELLO, model="gpt-4o", max_tokens=4)
    assert exc_info.value.body["param"] == "model"
    assert exc_info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"messages": [', "body"),
        (b"", "body"),
        (b"[1, 2]", "body"),
        (b'{"messages": "hi"}', "messages"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "messages[0].content[0].type"),
        (b'{"messages": [{"content": "hi"}]}', "messages[0].role"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "0.5"}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": true}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": 5}', "stop"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}}',
            "stream_options",
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    ],
)
def test_malformed_requests_are_400_naming_the_param(server, body, param):
    status, headers, payload = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 400, payload
    assert headers["content-type"] == "application/json"
    error = error_of(payload)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_oversized_body_is_413(server):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}).encode()
    status, _, payload = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 413
    assert error_of(payload)["code"] == "request_too_large"


def test_unknown_route_and_method_use_the_error_shape(server):
    status, _, payload = raw(server, "GET", "/v1/nothing-here")
    assert status == 404 and error_of(payload)["code"] == "not_found"
    status, _, payload = raw(server, "GET", "/v1/completions")
    assert status == 405 and error_of(payload)["code"] == "method_not_allowed"
    status, _, payload = raw(server, "GET", "/v1/chat/completions")
    assert status == 405 and error_of(payload)["code"] == "method_not_allowed"


# ------------------------------------------------- health, drain, startup


def http_health(url: str) -> int | None:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=1)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = json.loads(response.read())
        assert body["status"] == ("SERVING" if response.status == 200 else "NOT_SERVING")
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def test_health_mirrors_grpc_while_loading(tiny_model_dir):
    server = ServerProcess(tiny_model_dir)
    try:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert server.process.poll() is None, server.log
            grpc_before = health_status(server.target, timeout=0.5)
            http = http_health(server.http_url)
            grpc_after = health_status(server.target, timeout=0.5)
            if http is not None and grpc_before == grpc_after:
                # The transports agree whenever gRPC was stable around the probe.
                serving = grpc_after == health_pb2.HealthCheckResponse.SERVING
                assert http == (200 if serving else 503), (http, grpc_after)
                seen.append(http)
                if serving:
                    break
            time.sleep(0.02)
        assert 503 in seen, f"never saw the loading phase: {seen}"
        assert seen[-1] == 200
        # Requests while loading are refused with 503, not hung (checked above
        # through /health); once serving, a chat works.
        assert sdk(server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices[0].finish_reason
    finally:
        server.close()


class RawStream:
    """A streaming POST on a plain socket, so the test decides exactly when
    the client disconnects."""

    def __init__(self, server: ServerProcess, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.sock = socket.create_connection((server.host, server.http_port), timeout=30)
        self.sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        self.received = b""

    def read_until(self, marker: bytes, count: int = 1, timeout: float = 30) -> None:
        self.sock.settimeout(timeout)
        while self.received.count(marker) < count:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"server closed the stream: {self.received[-500:]!r}")
            self.received += data

    def nothing_for(self, seconds: float) -> bool:
        """True if the server sends nothing (and keeps the connection) for `seconds`."""
        self.sock.settimeout(seconds)
        try:
            self.received += self.sock.recv(65536)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        # RST instead of FIN: the harshest way a client can vanish.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.sock.close()


LONG = {"messages": HELLO, "max_tokens": 20000, "temperature": 0.8}
# An aborted request frees its slot before the next engine step (milliseconds);
# one that is not aborted holds it for the ~minute its 20000 tokens take. The
# bound is generous for a loaded CI machine and still far from that minute.
SLOT_FREED_WITHIN = 10.0


@pytest.fixture(scope="module")
def one_slot_server(tiny_model_dir):
    """One running request at most and no queue: a second request is refused
    while the first holds the slot."""
    with running_server(tiny_model_dir, *ONE_SLOT_ARGS) as srv:
        yield srv


def admitted_within(server: ServerProcess, seconds: float) -> float:
    """Seconds until a short request is served; fails if it is still refused
    with 429 after `seconds`."""
    client = sdk(server)
    started = time.monotonic()
    while True:
        try:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
            return time.monotonic() - started
        except openai.RateLimitError:
            if time.monotonic() - started > seconds:
                raise
            time.sleep(0.02)


def test_overload_is_429_with_retry_after(one_slot_server):
    stream = RawStream(one_slot_server, {**LONG, "stream": True})
    try:
        stream.read_until(b"data: ", 3)
        with pytest.raises(openai.RateLimitError) as exc_info:
            sdk(one_slot_server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert exc_info.value.status_code == 429
        assert exc_info.value.response.headers["retry-after"] == "1"
        assert exc_info.value.body["code"] == "server_overloaded"
        # Streaming requests are refused the same way, before any 200 is sent.
        status, headers, payload = raw(
            one_slot_server, "POST", "/v1/chat/completions", json.dumps({**LONG, "stream": True}).encode()
        )
        assert status == 429 and headers["retry-after"] == "1"
        assert error_of(payload)["type"] == "rate_limit_error"
        # The same replica says RESOURCE_EXHAUSTED over gRPC.
        with grpc.insecure_channel(one_slot_server.target) as channel:
            with pytest.raises(grpc.RpcError) as rpc_error:
                pb_grpc.QwenServiceStub(channel).Chat(pb.ChatRequest(messages=[pb.Message(**HELLO[0])]), timeout=10)
        assert rpc_error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        stream.close()
    admitted_within(one_slot_server, 5)


def test_disconnect_mid_stream_frees_the_slot(one_slot_server):
    stream = RawStream(one_slot_server, {**LONG, "stream": True})
    stream.read_until(b"data: ", 5)
    # The slot is taken: without the abort the next request would be refused
    # for the ~minute the 20000-token answer takes.
    with pytest.raises(openai.RateLimitError):
        sdk(one_slot_server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    stream.close()
    assert admitted_within(one_slot_server, SLOT_FREED_WITHIN) < SLOT_FREED_WITHIN


def test_disconnect_during_non_streaming_request_frees_the_slot(one_slot_server):
    stream = RawStream(one_slot_server, LONG)  # stream=false: nothing is sent until the end
    deadline = time.monotonic() + 10
    while True:  # wait until it holds the slot
        try:
            sdk(one_slot_server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        except openai.RateLimitError:
            break
        assert time.monotonic() < deadline, "the long request never took the slot"
        time.sleep(0.05)
    assert stream.nothing_for(0.2)
    stream.close()
    assert admitted_within(one_slot_server, SLOT_FREED_WITHIN) < SLOT_FREED_WITHIN


def test_disconnect_while_queued_leaves_the_queue(tiny_model_dir):
    args = ("--max-batch-size", "1", "--max-waiting", "1", "--max-model-len", "32768", "--max-tokens-limit", "30000")
    with running_server(tiny_model_dir, *args) as server:
        running = RawStream(server, {**LONG, "stream": True})
        running.read_until(b"data: ", 3)
        queued = RawStream(server, {"messages": HELLO, "max_tokens": 4, "stream": True})
        assert queued.nothing_for(0.5), "a queued stream gets no headers until it is admitted"
        with pytest.raises(openai.RateLimitError):  # 1 running + 1 waiting: full
            sdk(server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        queued.close()
        # The queue place is free again: this one waits instead of getting 429...
        deadline = time.monotonic() + SLOT_FREED_WITHIN
        while True:
            waiting = RawStream(server, {"messages": HELLO, "max_tokens": 4, "stream": True})
            if waiting.nothing_for(0.3):
                break
            assert b" 429 " in waiting.received or waiting.received == b"", waiting.received
            waiting.close()
            assert time.monotonic() < deadline, "the disconnected request kept its queue place"
        # ...and gets its answer once the running one leaves too.
        running.close()
        waiting.read_until(b"data: [DONE]")
        assert waiting.received.startswith(b"HTTP/1.1 200 ")
        waiting.close()


def test_sigterm_drains_http_like_grpc(tiny_model_dir):
    args = ("--drain-timeout", "1.5", "--max-model-len", "32768", "--max-tokens-limit", "30000")
    with running_server(tiny_model_dir, *args) as server:
        stream = RawStream(server, {**LONG, "stream": True})
        stream.read_until(b"data: ", 3)
        server.process.terminate()  # SIGTERM
        deadline = time.monotonic() + 5
        while http_health(server.http_url) != 503:
            assert time.monotonic() < deadline, "HTTP /health did not turn 503 on SIGTERM"
            time.sleep(0.02)
        assert health_status(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(openai.InternalServerError) as exc_info:
            sdk(server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert exc_info.value.status_code == 503
        assert exc_info.value.body["code"] == "unavailable"
        # The running stream is cut at the drain timeout with an in-band error
        # (no [DONE]: the answer is incomplete).
        stream.read_until(b'"error"', timeout=10)
        assert b"data: [DONE]" not in stream.received
        stream.close()
        assert server.process.wait(15) == 0, server.log


def test_no_http_flag_and_port_conflicts(tiny_model_dir):
    port = free_port()
    with running_server(tiny_model_dir, "--no-http", "--http-port", str(port)) as server:
        assert "HTTP listening" not in server.log
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = ServerProcess(tiny_model_dir, "--http-port", str(taken.getsockname()[1]))
        try:
            assert server.process.wait(60) == 2  # a startup failure, like a taken gRPC port
            assert "cannot bind HTTP" in server.log and "--model" not in server.log
        finally:
            server.close()
