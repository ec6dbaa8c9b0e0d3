"""The server's interceptor chain over a real loopback gRPC server."""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc
import pytest
from grpc import aio
from grpc._cython import cygrpc  # ExecuteBatchError: what a send on a call the core has ended raises
from prometheus_client import CollectorRegistry

from service.api.interceptors import ErrorInterceptor, TelemetryInterceptor
from service.api.replica import ReplicaNameInterceptor
from service.observability.metrics import GrpcServerMetrics

SERVICE = "qwen.QwenService"
METHOD = f"/{SERVICE}/ChatStream"


def handled(registry: CollectorRegistry, code: str) -> float:
    labels = {"grpc_type": "server_stream", "grpc_service": SERVICE, "grpc_method": "ChatStream", "grpc_code": code}
    return registry.get_sample_value("grpc_server_handled_total", labels) or 0.0


@pytest.mark.parametrize("shape", ["generator", "writer"])
async def test_a_send_failing_after_the_client_left_is_a_cancellation_not_an_error(shape, caplog):
    """The soak test's race: the client cancels while the replica header's
    send is in grpc's core, and the send fails (ExecuteBatchError) before grpc
    cancels the handler. That is the client's cancellation: logged at DEBUG,
    not as an "unhandled error" (nor by grpc, which logs ExecuteBatchError at
    ERROR), and counted Canceled, not Unknown. The window is microseconds wide, so the
    handler raises grpc's own exception at the point the send would, once the
    client really is gone."""
    caplog.set_level(logging.DEBUG, logger="grpc._cython.cygrpc")
    caplog.set_level(logging.DEBUG, logger="service")
    handler_started = threading.Event()
    client_cancelled = threading.Event()

    def send_after_the_client_left() -> None:
        handler_started.set()
        # Blocking the event loop keeps grpc from cancelling this handler
        # before it fails.
        assert client_cancelled.wait(10)
        raise cygrpc.ExecuteBatchError('Failed "execute_batch": (SendInitialMetadataOperation,)')

    async def generator(request, context):
        send_after_the_client_left()
        yield b"never sent"

    async def writer(request, context):  # as the health Watch, with context.write()
        send_after_the_client_left()

    chat_stream = generator if shape == "generator" else writer

    registry = CollectorRegistry()
    server = aio.server(
        interceptors=[
            TelemetryInterceptor(GrpcServerMetrics(registry)),
            ErrorInterceptor(),
            ReplicaNameInterceptor("replica-0", f"/{SERVICE}/"),
        ]
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {"ChatStream": grpc.unary_stream_rpc_method_handler(chat_stream)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    def client() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream(METHOD)(b"request", timeout=30)
            assert handler_started.wait(10)
            call.cancel()
            client_cancelled.set()

    try:
        await asyncio.to_thread(client)
        for _ in range(200):
            if handled(registry, "Canceled") or handled(registry, "Unknown"):
                break
            await asyncio.sleep(0.05)
    finally:
        await server.stop(grace=None)

    seen = [
        r for r in caplog.records if r.name == "service.api.interceptors" and "ended while sending" in r.getMessage()
    ]
    assert [r.levelno for r in seen] == [logging.DEBUG]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert (handled(registry, "Canceled"), handled(registry, "Unknown")) == (1.0, 0.0)
