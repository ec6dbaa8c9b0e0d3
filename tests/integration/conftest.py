from __future__ import annotations

import grpc
import pytest
from harness import running_server

from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc
from service.cli import Server
from service.config import Settings


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """A tiny-model server shared by a test module."""
    with running_server(tiny_model_dir, "--max-batch-size", "4", "--max-waiting", "8", "--threads", "1") as srv:
        yield srv


@pytest.fixture(scope="module")
def single_slot_server(tiny_model_dir):
    """One slot, no queue, long generations allowed: a leaked slot shows at once
    as RESOURCE_EXHAUSTED for the next request."""
    args = [
        "--max-batch-size",
        "1",
        "--max-waiting",
        "0",
        "--max-model-len",
        "8192",
        "--max-tokens-limit",
        "8000",
        "--threads",
        "1",
    ]
    with running_server(tiny_model_dir, *args) as srv:
        yield srv


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.QwenServiceStub(channel)


@pytest.fixture
async def inprocess_server(tiny_model_dir):
    """The whole server (gRPC, ChatService, engine) in this process, on the
    test's event loop, so a test can monkeypatch its parts."""
    settings = Settings(
        model=str(tiny_model_dir),
        host="127.0.0.1",
        grpc_port=0,
        max_batch_size=8,
        max_tokens_limit=200,
        max_tokens_default=64,
        dtype="float32",
        metrics_port=0,
    )
    server = Server(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.drain_and_stop()
