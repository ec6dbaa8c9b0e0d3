"""The gRPC API end to end against the real server process (tiny model)."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import REPO_ROOT

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc
from service.config import LEGACY_MODEL_NAME, Settings


def ask(text: str = "What is the capital of France?", **fields) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.Message(role="user", content=text)], **fields)


def test_unary_chat_returns_the_whole_answer_with_usage(stub):
    reply = stub.Chat(ask(temperature=0, max_tokens=12), timeout=30)
    assert reply.is_final and reply.index == 0
    assert reply.id.startswith("chat-")
    assert reply.content
    assert reply.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == stub.ListModels(pb.ListModelsRequest(), timeout=5).models[0].id


def test_stream_pieces_add_up_to_the_unary_answer(stub):
    request = ask(temperature=0, max_tokens=16)
    unary = stub.Chat(request, timeout=30)
    messages = list(stub.ChatStream(request, timeout=30))
    assert [m.index for m in messages] == list(range(len(messages)))
    assert len({m.id for m in messages}) == 1
    assert [m.is_final for m in messages] == [False] * (len(messages) - 1) + [True]
    final = messages[-1]
    assert final.usage == unary.usage and final.finish_reason == unary.finish_reason
    assert "".join(m.content for m in messages) == unary.content
    assert not any(m.HasField("usage") for m in messages[:-1])


def test_legacy_clients_name_and_defaults_work(stub):
    # What a field client sends: the legacy model name, no new fields, temperature/max_tokens unset.
    reply = stub.Chat(
        pb.ChatRequest(messages=[pb.Message(role="user", content="Hi")], model=LEGACY_MODEL_NAME), timeout=60
    )
    assert reply.is_final and reply.model == LEGACY_MODEL_NAME
    assert reply.usage.completion_tokens > 0


def test_seed_makes_sampling_reproducible(stub):
    request = ask(temperature=1.0, top_p=0.95, top_k=40, seed=42, max_tokens=12)
    assert stub.Chat(request, timeout=30).content == stub.Chat(request, timeout=30).content


def test_stop_sequence_cuts_the_answer(stub):
    full = stub.Chat(ask(temperature=0, max_tokens=16), timeout=30).content
    stop = full[4:7]
    assert stop.strip()
    reply = stub.Chat(ask(temperature=0, max_tokens=16, stop=[stop]), timeout=30)
    assert reply.finish_reason == pb.FINISH_REASON_STOP
    assert reply.content == full[: full.index(stop)]


def test_list_models_and_count_tokens(stub):
    models = stub.ListModels(pb.ListModelsRequest(), timeout=5).models
    assert [m.id for m in models][1:] == [LEGACY_MODEL_NAME]
    defaults = Settings()
    assert all(
        m.max_context_tokens == defaults.max_model_len and m.max_output_tokens == defaults.max_tokens_limit
        for m in models
    )
    counted = stub.CountTokens(
        pb.CountTokensRequest(messages=[pb.Message(role="user", content="Hello there")]), timeout=5
    )
    reply = stub.Chat(ask("Hello there", max_tokens=1), timeout=30)
    assert counted.prompt_tokens == reply.usage.prompt_tokens
    assert counted.remaining_tokens == counted.max_context_tokens - counted.prompt_tokens


INVALID = [
    (pb.ChatRequest(), "messages"),
    (pb.ChatRequest(messages=[pb.Message(role="wizard", content="hi")]), "messages[0].role"),
    (pb.ChatRequest(messages=[pb.Message(role="user", content="")]), "messages[0].content"),
    (
        pb.ChatRequest(messages=[pb.Message(role="user", content="a"), pb.Message(role="assistant", content="b")]),
        "messages[1].role",
    ),
    (ask(max_tokens=-5), "max_tokens"),
    (ask(max_tokens=100_000), "max_tokens"),
    (ask(temperature=-1), "temperature"),
    (ask(temperature=float("nan")), "temperature"),
    (ask(temperature=float("inf")), "temperature"),
    (ask(top_p=0), "top_p"),
    (ask(top_p=1.01), "top_p"),
    (ask(top_k=-3), "top_k"),
    (ask(repetition_penalty=-1), "repetition_penalty"),
    (ask(stop=[""]), "stop[0]"),
    (ask("lorem ipsum " * 3000), "messages"),
]


@pytest.mark.parametrize("request_, field", INVALID, ids=[f for _, f in INVALID])
def test_bad_input_is_invalid_argument_naming_the_field(stub, request_, field):
    for call in (lambda: stub.Chat(request_, timeout=10), lambda: list(stub.ChatStream(request_, timeout=10))):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(field + ":")


def test_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.Chat(ask(model="gpt-4"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert LEGACY_MODEL_NAME in error.value.details()


def test_server_is_healthy_and_correct_after_bad_input(server, stub):
    for request_, _ in INVALID:
        with pytest.raises(grpc.RpcError):
            stub.Chat(request_, timeout=10)
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    first = stub.Chat(ask(temperature=0, max_tokens=8), timeout=30)
    assert first.content and first.content == stub.Chat(ask(temperature=0, max_tokens=8), timeout=30).content


def _admitted_soon(stub, seconds: float = 3.0) -> bool:
    """True when a short request gets the single slot within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            stub.Chat(ask(max_tokens=2), timeout=10)
            return True
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            time.sleep(0.05)
    return False


def test_cancelled_stream_frees_its_slot(single_slot_server):
    with grpc.insecure_channel(single_slot_server.target) as channel:
        stub = pb_grpc.QwenServiceStub(channel)
        call = stub.ChatStream(ask(temperature=0, max_tokens=8000), timeout=120)
        next(call), next(call)
        # While it runs, the only slot is taken.
        with pytest.raises(grpc.RpcError) as busy:
            stub.Chat(ask(max_tokens=2), timeout=10)
        assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("grpc-retry-pushback-ms", "1000") in busy.value.trailing_metadata()
        call.cancel()
        assert _admitted_soon(stub), "the cancelled stream kept its slot (still generating)"


def test_deadline_exceeded_frees_its_slot(single_slot_server):
    with grpc.insecure_channel(single_slot_server.target) as channel:
        stub = pb_grpc.QwenServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            stub.Chat(ask(temperature=0, max_tokens=8000), timeout=0.5)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 3
        assert _admitted_soon(stub), "the expired request kept its slot"


def test_qwen_chat_cli_streams_an_answer(server):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_grpc_client.cli",
            "--target",
            server.target,
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--system",
            "Be brief.",
            "--usage",
            "Hello",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "finish=" in result.stderr and "completion=" in result.stderr
