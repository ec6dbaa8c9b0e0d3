"""QwenHealthServicer over a real loopback gRPC server: Check, Watch, and a
drain that ends every Watch stream with OK right after its NOT_SERVING."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.grpc_server import LIVENESS_SERVICE_NAME, SERVICE_NAME, QwenHealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


@contextlib.asynccontextmanager
async def health_server():
    server = aio.server()
    servicer = QwenHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield servicer, health_pb2_grpc.HealthStub(channel)
    finally:
        await server.stop(grace=None)


class Watcher:
    """Reads one Watch stream in the background; `arrived` is set at each message."""

    def __init__(self, stub: health_pb2_grpc.HealthStub, service: str = "") -> None:
        self.statuses: list[int] = []
        self.arrived = asyncio.Event()
        self._call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=20)
        self.ended = asyncio.ensure_future(self._read())

    async def _read(self) -> str:
        try:
            async for reply in self._call:
                self.statuses.append(reply.status)
                self.arrived.set()
            return "OK"
        except grpc.RpcError as error:
            return error.code().name

    async def next_status(self) -> int:
        await asyncio.wait_for(self.arrived.wait(), 10)
        self.arrived.clear()
        return self.statuses[-1]


async def test_a_drain_ends_every_watch_stream_ok_after_not_serving():
    """With grpcio-health's servicer cancelled inside its write, 3 of 1200
    such streams hung until their deadline; 20 drains of 60 watchers each."""
    for _ in range(20):
        async with health_server() as (servicer, stub):
            watchers = [Watcher(stub) for _ in range(60)]
            assert [await w.next_status() for w in watchers] == [SERVING] * 60
            await servicer.begin_drain()
            ended = await asyncio.wait_for(asyncio.gather(*(w.ended for w in watchers)), 10)
            assert ended == ["OK"] * 60
            assert all(w.statuses == [SERVING, NOT_SERVING] for w in watchers), [w.statuses for w in watchers]


async def test_watch_follows_changes_and_a_drain_is_for_good():
    async with health_server() as (servicer, stub):
        whole, named, unknown = Watcher(stub), Watcher(stub, SERVICE_NAME), Watcher(stub, "no.such.Service")
        assert await named.next_status() == SERVICE_UNKNOWN  # not set yet
        assert await unknown.next_status() == SERVICE_UNKNOWN
        assert await whole.next_status() == SERVING

        await servicer.set(SERVICE_NAME, SERVING)
        assert await named.next_status() == SERVING
        await servicer.set("", NOT_SERVING)
        assert await whole.next_status() == NOT_SERVING
        await servicer.set("", SERVING)
        assert await whole.next_status() == SERVING
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert reply.status == SERVING

        await servicer.begin_drain()
        assert await asyncio.gather(whole.ended, named.ended, unknown.ended) == ["OK"] * 3
        assert whole.statuses[-1] == named.statuses[-1] == unknown.statuses[-1] == NOT_SERVING
        await servicer.set("", SERVING)  # ignored: draining
        for service in ("", SERVICE_NAME, LIVENESS_SERVICE_NAME):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == NOT_SERVING, service


async def test_check_of_an_unknown_service_is_not_found():
    async with health_server() as (_, stub):
        assert (await stub.Check(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE_NAME))).status == SERVING
        try:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("Check of an unknown service answered")
