from __future__ import annotations

import grpc
import pytest

from harness import running_server
from service.pb.qwen import qwen_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """A tiny-model server shared by a test module."""
    with running_server(tiny_model_dir, "--max-batch-size", "4", "--max-waiting", "8", "--threads", "1") as srv:
        yield srv


@pytest.fixture(scope="module")
def single_slot_server(tiny_model_dir):
    """One slot, no queue, long generations allowed: a leaked slot shows at once
    as RESOURCE_EXHAUSTED for the next request."""
    args = ["--max-batch-size", "1", "--max-waiting", "0", "--max-model-len", "8192",
            "--max-tokens-limit", "8000", "--threads", "1"]  # fmt: skip
    with running_server(tiny_model_dir, *args) as srv:
        yield srv


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.QwenServiceStub(channel)
