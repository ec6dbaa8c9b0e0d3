"""Service-level telemetry in-process: a real engine (tiny model), a real
metrics registry and the OpenTelemetry SDK with an in-memory exporter."""

from __future__ import annotations

import asyncio
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from tiny_model import tiny_engine_config

from service.chat import ChatMessage, ChatParams, ChatService
from service.config import Settings
from service.engine.engine import Engine
from service.engine.loader import load_model
from service.engine.types import FinishReason, GenerationRequest, RequestTiming, SamplingParams, TokenEvent, Usage
from service.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    ModelNotFound,
    Overloaded,
    Unavailable,
)
from service.observability.metrics import FAILURE_REASONS, Metrics
from service.observability.telemetry import Telemetry, failure_reason

MODEL = "tiny"


@pytest.fixture
def loaded(tiny_model_dir):
    """Fresh per test: an Engine takes ownership of the weights it is given."""
    return load_model(str(tiny_model_dir), dtype="float32")


class Recorder:
    """Metrics on a fresh registry plus an SDK tracer that keeps spans in memory."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.model = self.metrics.for_model(MODEL)
        self.spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.telemetry = Telemetry(self.model, provider.get_tracer("test"))

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {"model": MODEL, **labels})
        return 0.0 if value is None else value

    def failed(self) -> dict[str, float]:
        return {
            r: self.sample("qwen_requests_failed_total", reason=r)
            for r in FAILURE_REASONS
            if self.sample("qwen_requests_failed_total", reason=r)
        }

    def span(self, name: str):
        (span,) = [s for s in self.spans.get_finished_spans() if s.name == name]
        return span


def settings(**overrides) -> Settings:
    base = dict(
        model="unused", max_model_len=512, max_tokens_default=16, max_tokens_limit=256, served_model_name=[MODEL]
    )
    return Settings(**{**base, **overrides})


async def run(chat: ChatService, text: str, timeout: float | None = None, **params):
    prepared = chat.prepare(ChatParams(messages=(ChatMessage("user", text),), **params), timeout=timeout)
    return prepared, [event async for event in chat.generate(prepared)]


async def test_a_completed_request_records_every_phase(loaded):
    rec = Recorder()
    engine = Engine(loaded, tiny_engine_config(max_batch_size=2, max_waiting=2), observer=rec.model)
    engine.start()
    try:
        chat = ChatService(engine, settings(), rec.telemetry)
        prepared, events = await run(chat, "Hello there", max_tokens=6, temperature=0.0)
    finally:
        await engine.shutdown()
    final = events[-1]
    assert final.finish_reason is FinishReason.LENGTH and final.usage.completion_tokens == 6
    prompt = len(prepared.request.prompt_token_ids)
    assert rec.sample("qwen_requests_finished_total", finish_reason="length") == 1
    assert rec.failed() == {}
    assert rec.sample("qwen_generation_tokens_total") == 6
    assert rec.sample("qwen_prompt_tokens_total") == prompt
    assert rec.sample("qwen_time_to_first_token_seconds_count") == 1
    assert rec.sample("qwen_inter_token_latency_seconds_count") == 5
    assert rec.sample("qwen_request_generation_tokens_sum") == 6
    assert rec.sample("qwen_request_prompt_tokens_sum") == prompt
    for phase in ("queue", "prefill", "decode"):
        assert rec.sample(f"qwen_request_{phase}_time_seconds_count") == 1
    # The decode batch-size observer ran once per decode step (5 after the prefill's token).
    assert rec.sample("qwen_decode_batch_size_count") == 5
    assert rec.sample("qwen_decode_batch_size_sum") == 5

    timing = final.timing
    assert timing.submitted <= timing.admitted <= timing.first_token <= timing.finished
    chat_span = rec.span(f"chat {MODEL}")
    attrs = chat_span.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.max_tokens"] == 6 and attrs["gen_ai.request.temperature"] == 0.0
    assert attrs["gen_ai.usage.input_tokens"] == prompt and attrs["gen_ai.usage.output_tokens"] == 6
    assert attrs["gen_ai.response.finish_reasons"] == ("length",)
    assert attrs["gen_ai.response.id"] == prepared.request.request_id
    phases = [rec.span(name) for name in ("queue", "prefill", "decode")]
    for span in phases:
        assert span.parent.span_id == chat_span.context.span_id
        assert span.context.trace_id == chat_span.context.trace_id
    # Back to back, inside the chat span, in engine order.
    assert chat_span.start_time <= phases[0].start_time
    assert phases[0].end_time == phases[1].start_time and phases[1].end_time == phases[2].start_time
    assert phases[2].end_time <= chat_span.end_time
    assert phases[2].attributes["gen_ai.usage.output_tokens"] == 6
    assert chat_span.status.status_code is StatusCode.UNSET


async def test_the_queue_time_is_the_wait_for_a_slot(loaded):
    rec = Recorder()
    engine = Engine(loaded, tiny_engine_config(max_batch_size=1, max_waiting=1))
    engine.start()
    try:
        chat = ChatService(engine, settings(), rec.telemetry)
        (_, first), (_, second) = await asyncio.gather(
            run(chat, "first", max_tokens=40, temperature=0.0), run(chat, "second", max_tokens=2, temperature=0.0)
        )
    finally:
        await engine.shutdown()
    # One slot: the second request waited until the first was done.
    assert second[-1].timing.admitted >= first[-1].timing.finished
    queued = second[-1].timing.admitted - second[-1].timing.submitted
    assert queued > 0
    assert rec.sample("qwen_request_queue_time_seconds_sum") == pytest.approx(
        queued + first[-1].timing.admitted - first[-1].timing.submitted
    )


async def test_validation_errors_are_counted_and_traced(loaded):
    rec = Recorder()
    engine = Engine(loaded, tiny_engine_config(max_batch_size=1, max_waiting=0))
    chat = ChatService(engine, settings(), rec.telemetry)  # never started: nothing reaches it
    with pytest.raises(InvalidArgument):
        chat.prepare(ChatParams(messages=(ChatMessage("user", " "),)))
    with pytest.raises(ModelNotFound):
        chat.prepare(ChatParams(messages=(ChatMessage("user", "hi"),), model="gpt-4"))
    chat.begin_drain()
    with pytest.raises(Unavailable):
        chat.prepare(ChatParams(messages=(ChatMessage("user", "hi"),)))
    assert rec.failed() == {"validation": 2, "unavailable": 1}
    spans = rec.spans.get_finished_spans()
    assert [s.attributes["error.type"] for s in spans] == ["validation", "validation", "unavailable"]
    # A bad request is the client's problem; unavailability is the server's.
    assert [s.status.status_code for s in spans] == [StatusCode.UNSET, StatusCode.UNSET, StatusCode.ERROR]


async def test_a_client_that_leaves_early_counts_as_cancelled(loaded):
    rec = Recorder()
    engine = Engine(loaded, tiny_engine_config(max_batch_size=1, max_waiting=0))
    engine.start()
    try:
        chat = ChatService(engine, settings(), rec.telemetry)
        prepared = chat.prepare(ChatParams(messages=(ChatMessage("user", "hi"),), max_tokens=200))
        stream = chat.generate(prepared)
        for _ in range(3):
            await anext(stream)
        await stream.aclose()
    finally:
        await engine.shutdown()
    assert rec.failed() == {"cancelled": 1}
    assert rec.sample("qwen_generation_tokens_total") == 3
    assert rec.sample("qwen_request_generation_tokens_count") == 0  # no final event reached the service
    span = rec.span(f"chat {MODEL}")
    assert span.attributes["error.type"] == "cancelled" and span.attributes["gen_ai.usage.output_tokens"] == 3


async def test_an_expired_deadline_counts_as_deadline(loaded):
    rec = Recorder()
    engine = Engine(loaded, tiny_engine_config(max_batch_size=1, max_waiting=0))
    engine.start()
    try:
        chat = ChatService(engine, settings(), rec.telemetry)
        with pytest.raises(DeadlineExceeded):
            await run(chat, "hi", timeout=0.05, max_tokens=256)
    finally:
        await engine.shutdown()
    assert rec.failed() == {"deadline": 1}
    assert rec.span(f"chat {MODEL}").status.status_code is StatusCode.ERROR


def _request(deadline: float | None) -> GenerationRequest:
    return GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=4), deadline=deadline)


@pytest.mark.parametrize(
    ("deadline_in", "reason"),
    [(None, "cancelled"), (10.0, "cancelled"), (-1.0, "deadline")],
)
def test_leaving_early_is_a_deadline_only_once_it_passed(deadline_in, reason):
    """The transport may notice an expired deadline before the engine does."""
    rec = Recorder()
    request = rec.telemetry.start(time.monotonic())
    request.prepared(_request(None if deadline_in is None else time.monotonic() + deadline_in), MODEL)
    request.abandoned()
    request.abandoned()  # settled once
    assert rec.failed() == {reason: 1}


def test_an_engine_cancel_without_deadline_is_cancelled_and_settles_once():
    """Shutdown cancels running requests with a final CANCELLED event."""
    rec = Recorder()
    request = rec.telemetry.start(time.monotonic())
    request.prepared(_request(None), MODEL)
    now = time.monotonic()
    request.on_event(TokenEvent(text="a"), now)
    timing = RequestTiming(submitted=now - 0.3, admitted=now - 0.2, first_token=now - 0.1, finished=now)
    final = TokenEvent("", FinishReason.CANCELLED, Usage(3, 1), timing=timing)
    request.on_event(final, now + 0.01)
    request.fail(InternalError("late"))  # ignored: already settled
    request.abandoned()
    assert rec.failed() == {"cancelled": 1}
    assert rec.sample("qwen_request_queue_time_seconds_sum") == pytest.approx(0.1)
    assert rec.sample("qwen_request_decode_time_seconds_sum") == pytest.approx(0.1)
    assert rec.sample("qwen_generation_tokens_total") == 1


def test_final_events_that_carry_the_last_token_count_it():
    rec = Recorder()
    request = rec.telemetry.start(time.monotonic())
    request.prepared(_request(None), MODEL)
    now = time.monotonic()
    request.on_event(TokenEvent(text="a"), now)
    request.on_event(TokenEvent(text=""), now + 0.01)  # a token whose text is held back
    request.on_event(TokenEvent("bc", FinishReason.STOP, Usage(3, 3)), now + 0.03)
    assert rec.sample("qwen_generation_tokens_total") == 3
    assert rec.sample("qwen_inter_token_latency_seconds_count") == 2
    assert rec.sample("qwen_inter_token_latency_seconds_sum") == pytest.approx(0.03)
    assert rec.sample("qwen_requests_finished_total", finish_reason="stop") == 1


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (InvalidArgument("x", "bad"), "validation"),
        (ModelNotFound("m"), "validation"),
        (Overloaded("full", 1.0), "overloaded"),
        (Unavailable("draining"), "unavailable"),
        (DeadlineExceeded("late"), "deadline"),
        (InternalError("bug"), "internal"),
        (RuntimeError("bug"), "internal"),
    ],
)
def test_failure_reasons(error, reason):
    assert failure_reason(error) == reason
