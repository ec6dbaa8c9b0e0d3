"""Faults: a failure inside one request's generation fails only that request
(INTERNAL, logged) while the other streams complete. (SIGTERM past the drain
timeout and SIGKILLed clients: tests/real_model/test_faults_real_model.py.)

These tests run the whole server (gRPC, ChatService, engine) in this
process and inject the fault by monkeypatching the sampler or the model
runner for one marked request — no test hook exists in the service."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc import aio

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc
from service.cli import Server

POISON_SEED = 666


def _request(content: str, max_tokens: int, **kwargs) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.Message(role="user", content=content)], max_tokens=max_tokens, **kwargs)


async def _collect(stub, request, timeout: float = 120.0):
    """(responses, status code) of one stream."""
    responses = []
    try:
        async for response in stub.ChatStream(request, timeout=timeout):
            responses.append(response)
    except aio.AioRpcError as exc:
        return responses, exc.code(), exc.details()
    return responses, grpc.StatusCode.OK, ""


async def _run_with_one_poisoned(server: Server, poisoned: pb.ChatRequest, normal_tokens: int = 60):
    async with aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.QwenServiceStub(channel)
        normal = [
            _request(f"stream number {i}", normal_tokens, temperature=0.8, seed=i, repetition_penalty=1.1)
            for i in range(5)
        ]
        return await asyncio.gather(*(_collect(stub, r) for r in [*normal[:2], poisoned, *normal[2:]]))


def _assert_complete(responses, code, tokens: int) -> None:
    assert code == grpc.StatusCode.OK
    final = responses[-1]
    assert final.is_final and final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    if final.finish_reason == pb.FINISH_REASON_LENGTH:
        assert final.usage.completion_tokens == tokens


async def test_sampler_fault_fails_only_its_request(inprocess_server, monkeypatch, caplog):
    from service.engine import sampling

    real_sample_one = sampling.sample_one
    calls = {"poisoned": 0}

    def sample_one(logits, params, generator):
        if params.seed == POISON_SEED:
            calls["poisoned"] += 1
            if calls["poisoned"] == 6:  # mid-stream, inside a batched decode step
                raise RuntimeError("injected sampler fault")
        return real_sample_one(logits, params, generator)

    monkeypatch.setattr(sampling, "sample_one", sample_one)
    caplog.set_level(logging.ERROR, logger="service")
    poisoned = _request("poisoned", 60, temperature=0.8, seed=POISON_SEED)
    results = await _run_with_one_poisoned(inprocess_server, poisoned)

    responses, code, details = results[2]
    assert code == grpc.StatusCode.INTERNAL, (code, details)
    assert details == "internal error while sampling"
    assert 1 <= len(responses) <= 5 and not any(r.is_final for r in responses)  # failed mid-stream
    for responses, code, _ in results[:2] + results[3:]:
        _assert_complete(responses, code, 60)
    errors = [r for r in caplog.records if "sampling failed for chat-" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    assert errors[0].exc_info and "injected sampler fault" in str(errors[0].exc_info[1])
    # The slot came back: the full batch is admitted again.
    monkeypatch.setattr(sampling, "sample_one", real_sample_one)
    results = await _run_with_one_poisoned(inprocess_server, _request("fine", 20, temperature=0.8, seed=POISON_SEED))
    for responses, code, _ in results:
        assert code == grpc.StatusCode.OK and responses[-1].is_final


async def test_prefill_fault_fails_only_its_request(inprocess_server, monkeypatch, caplog):
    engine = inprocess_server.engine
    runner = engine._scheduler._runner  # the model runner of this in-process engine
    marker = "please fail my prefill"
    poisoned_ids = engine.encode_chat([{"role": "user", "content": marker}])
    real_step = runner.step

    def step(decode_tokens, decode_positions, chunks, logit_rows=None):
        # The poisoned prompt fails whatever else shares its forward pass. Its
        # chunk may start past 0: the prefix cache holds the chat template's
        # system prompt from earlier tests, so match the chunk that ends it.
        if any(
            chunk.end == len(poisoned_ids) and list(chunk.token_ids) == poisoned_ids[chunk.start :] for chunk in chunks
        ):
            raise RuntimeError("injected prefill fault")
        return real_step(decode_tokens, decode_positions, chunks, logit_rows)

    monkeypatch.setattr(runner, "step", step)
    caplog.set_level(logging.ERROR, logger="service")
    results = await _run_with_one_poisoned(inprocess_server, _request(marker, 60, temperature=0.8, seed=1))
    responses, code, details = results[2]
    assert code == grpc.StatusCode.INTERNAL and details == "internal error during prefill"
    assert responses == []
    for responses, code, _ in results[:2] + results[3:]:
        _assert_complete(responses, code, 60)
    assert any("prefill failed for chat-" in r.getMessage() and r.exc_info for r in caplog.records)
