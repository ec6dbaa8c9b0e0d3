"""Smaller findings of the hostile-load review: errors that echoed unbounded
input, startup failures that ended in tracebacks, a SIGTERM that waited for
the model load, and the web page with API keys on."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest
from harness import ServerProcess

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc


def test_errors_quote_a_bounded_part_of_huge_inputs(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.QwenServiceStub(channel)
        for name in ("m" * 100_000, "m" * 900_000):
            request = pb.ChatRequest(messages=[pb.Message(role="user", content="hi")], model=name, max_tokens=1)
            with pytest.raises(grpc.RpcError) as missing:
                stub.Chat(request, timeout=30)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND, missing.value.details()[:200]
            assert len(missing.value.details()) < 500 and f"({len(name)} characters)" in missing.value.details()
    for path, body in (
        ("/v1/models/" + "m" * 900_000, None),
        ("/v1/chat/completions", json.dumps({"model": "m" * 900_000, "messages": [{"role": "user", "content": "hi"}]})),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "k" * 500_000: 1})),
    ):
        request = urllib.request.Request(
            server.http_url + path, data=body and body.encode(), headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        reply = refused.value.read()
        assert refused.value.code in (400, 404) and len(reply) < 1000, (refused.value.code, reply[:200])


def _exit_of(server: ServerProcess, timeout: float = 60) -> tuple[int, str]:
    try:
        code = server.process.wait(timeout)
        return code, server.log
    finally:
        server.close()


def test_a_taken_grpc_port_exits_2_without_a_traceback(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The last --grpc-port wins over the harness's free one.
        code, log = _exit_of(ServerProcess(tiny_model_dir, "--threads", "1", "--grpc-port", str(port)))
    assert code == 2, log
    assert f"cannot bind gRPC to 127.0.0.1:{port}" in log and "Traceback" not in log, log
    assert "--model" not in log, log  # the port is at fault, not the model


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_a_damaged_weights_file_exits_2_naming_it(tiny_model_dir, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(range(256)) * 64)
    code, log = _exit_of(ServerProcess(model, "--threads", "1"))
    assert code == 2, log
    assert f"cannot read the weights file {weights}" in log and "Traceback" not in log, log


@pytest.mark.real_model
def test_sigterm_while_the_model_loads_exits_promptly(real_model_dir):
    server = ServerProcess(real_model_dir, "--threads", "1")
    try:
        server.wait_port_open()  # up, NOT_SERVING: the model is loading
        # The weights are in; the tokenizer's vocabulary and llguidance's
        # token trie are being built for seconds, in calls that hold the GIL
        # up to a second each: where a SIGTERM handled in Python waited longest.
        deadline = time.monotonic() + 120
        while (
            "service.engine.loader: loaded" not in server.log
            and server.process.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        time.sleep(0.5)
        assert "SERVING" not in server.log.replace("NOT_SERVING", ""), server.log
        server.process.terminate()
        started = time.monotonic()
        code = server.process.wait(30)
        # The exit itself (unmapping the model) takes ~0.1 s.
        assert time.monotonic() - started < 1.5, server.log
        assert code == 0 and "stopped while loading the model" in server.log, server.log
    finally:
        server.close()
