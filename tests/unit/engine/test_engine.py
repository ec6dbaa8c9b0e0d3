"""The engine's contract: generate() -> events, abort(), bounded admission,
continuous batching that does not change greedy results."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from tiny_model import tiny_engine_config

from service.engine import native
from service.engine.engine import Engine
from service.engine.loader import load_model
from service.engine.types import (
    EngineOverloaded,
    EngineSetup,
    EngineStats,
    FinishReason,
    GenerationRequest,
    SamplingParams,
)

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
PROMPTS = [
    "What is the capital of France?",
    "def add(a, b):",
    "法国的首都是哪里？",
    "Hello, world!",
    "The quick brown fox",
    "Stream tokens over gRPC to the edge.",
]


@pytest.fixture
def loaded(tiny_model_dir):
    """A fresh model per test: an engine takes ownership of (repacks) its model."""
    return load_model(str(tiny_model_dir), dtype="float32")


def make_engine(loaded, **overrides) -> Engine:
    engine = Engine(loaded, tiny_engine_config(**overrides))
    engine.start()
    return engine


def request(engine: Engine, text: str, sampling: SamplingParams = GREEDY, rid: str | None = None, **kw):
    ids = tuple(engine.encode_chat([{"role": "user", "content": text}]))
    return GenerationRequest(rid or f"r-{text[:8]}-{time.monotonic_ns()}", ids, sampling, **kw)


async def collect(engine: Engine, req: GenerationRequest):
    events = [event async for event in engine.generate(req)]
    return "".join(e.text for e in events), events[-1]


async def until(engine: Engine, condition: Callable[[EngineStats], bool], timeout: float = 5.0) -> None:
    """Wait for the engine's state to satisfy `condition` (the compute thread
    changes it; nothing here waits for time to pass)."""
    deadline = time.monotonic() + timeout
    while not condition(engine.stats()):
        assert time.monotonic() < deadline, f"engine never reached the state: {engine.stats()}"
        await asyncio.sleep(0.01)


async def wait_idle(engine: Engine, timeout: float = 5.0) -> None:
    await until(engine, lambda stats: stats.running == 0 and stats.waiting == 0, timeout)


async def test_concurrent_greedy_equals_sequential_greedy(loaded):
    engine = make_engine(loaded, max_batch_size=3)
    try:
        sequential = [await collect(engine, request(engine, p)) for p in PROMPTS]
        # Six requests on three slots: they join and leave mid-flight, with
        # different prompt lengths and chunked prefill.
        concurrent = await asyncio.gather(*(collect(engine, request(engine, p)) for p in PROMPTS))
        assert [text for text, _ in concurrent] == [text for text, _ in sequential]
        assert len({text for text, _ in sequential}) == len(PROMPTS)
        for _, final in concurrent:
            assert final.finish_reason is FinishReason.LENGTH
            assert final.usage.completion_tokens == GREEDY.max_tokens
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("quantization", ["none", "int8"])
async def test_setup_tells_the_quantization_and_layers_the_engine_runs(loaded, quantization):
    engine = make_engine(loaded, quantization=quantization)
    try:
        # The tiny model's shapes are the native layers' (multiples of 32): int8 takes them where they are built.
        native_layers = quantization == "int8" and native.available()
        kernels = native.instruction_set() if native_layers else "torch"
        assert engine.setup == EngineSetup(quantization, quantization, native_layers, "float32", kernels)
    finally:
        await engine.shutdown()


@pytest.mark.skipif(not native.available(), reason="auto resolves to int5 only where the native kernels are built")
async def test_setup_tells_what_auto_resolved_to(loaded):
    engine = make_engine(loaded, quantization="auto")
    try:
        assert engine.setup.requested_quantization == "auto"
        # int5, unless the start-up probe found torch's int8-weight-only clearly faster on this CPU.
        setup = engine.setup
        assert (setup.quantization, setup.native_layers, setup.kernels) in {
            ("int5", True, native.instruction_set()),
            ("int8-weight-only", False, "torch"),
        }
    finally:
        await engine.shutdown()


async def test_usage_counts_prompt_and_completion(loaded):
    engine = make_engine(loaded)
    try:
        req = request(engine, PROMPTS[0], SamplingParams(max_tokens=5, temperature=0.0))
        _, final = await collect(engine, req)
        assert final.usage.prompt_tokens == len(req.prompt_token_ids)
        assert final.usage.completion_tokens == 5
        assert final.usage.total_tokens == len(req.prompt_token_ids) + 5
    finally:
        await engine.shutdown()


async def test_abort_frees_the_slot_before_the_next_step(loaded):
    engine = make_engine(loaded, max_batch_size=1, max_waiting=0)
    try:
        long = request(engine, PROMPTS[0], SamplingParams(max_tokens=400, temperature=0.0))
        stream = engine.generate(long)
        await stream.__anext__()
        await stream.__anext__()
        before = engine.stats().generated_tokens_total
        await stream.aclose()  # what a cancelled RPC does
        await wait_idle(engine)
        after_abort = engine.stats().generated_tokens_total
        assert after_abort - before <= 2, "at most the step in flight may finish"
        # The single slot is free again: a new request is admitted, not refused,
        # and every step since the abort was its own (the aborted one generated nothing more).
        text, final = await collect(engine, request(engine, PROMPTS[1], SamplingParams(max_tokens=3, temperature=0)))
        assert final.usage.completion_tokens == 3
        assert engine.stats().generated_tokens_total == after_abort + 3, "the aborted request kept generating"
    finally:
        await engine.shutdown()


async def test_a_burst_of_prompts_is_prefilled_in_one_pass_next_to_the_decoders(loaded, monkeypatch):
    """Newcomers do not queue for one prefill pass each: the next forward
    pass carries all their prompts (within the token budget) and the running
    stream's next token."""
    import threading

    from service.engine.model_runner import ModelRunner

    passes: list[tuple[int, list[int]]] = []
    burst_queued = threading.Event()
    real_step = ModelRunner.step

    def recording_step(self, decode_tokens, decode_positions, chunks, logit_rows=None):
        passes.append((len(decode_tokens), [len(c.token_ids) for c in chunks]))
        if len(passes) >= 2:
            burst_queued.wait(5)  # the newcomers arrive while a decoding pass runs
        return real_step(self, decode_tokens, decode_positions, chunks, logit_rows)

    monkeypatch.setattr(ModelRunner, "step", recording_step)
    engine = make_engine(loaded, prefill_chunk_size=512)
    try:
        first = engine.generate(request(engine, PROMPTS[0], SamplingParams(max_tokens=8, temperature=0.0)))
        await first.__anext__()  # prefilled; now decoding
        burst = [request(engine, p, SamplingParams(max_tokens=4, temperature=0.0)) for p in PROMPTS[1:4]]
        tasks = [asyncio.create_task(collect(engine, r)) for r in burst]
        await asyncio.sleep(0)  # each task runs up to its first wait: all three are queued
        burst_queued.set()
        results = await asyncio.gather(*tasks)
        async for _ in first:
            pass
        assert all(final.finish_reason is FinishReason.LENGTH for _, final in results)
        prompt_lengths = sorted(len(r.prompt_token_ids) for r in burst)
        assert (1, prompt_lengths) in [(decoders, sorted(chunks)) for decoders, chunks in passes], passes
    finally:
        await engine.shutdown()


async def test_prompt_tokens_next_to_running_streams_stay_within_the_interleaved_budget(loaded, monkeypatch):
    from service.engine.model_runner import ModelRunner

    passes: list[tuple[int, int]] = []
    real_step = ModelRunner.step

    def recording_step(self, decode_tokens, decode_positions, chunks, logit_rows=None):
        passes.append((len(decode_tokens), sum(len(c.token_ids) for c in chunks)))
        return real_step(self, decode_tokens, decode_positions, chunks, logit_rows)

    monkeypatch.setattr(ModelRunner, "step", recording_step)
    engine = make_engine(loaded, prefill_chunk_size=512, interleaved_prefill_tokens=5)
    try:
        first = request(engine, PROMPTS[0], SamplingParams(max_tokens=40, temperature=0.0))
        second = request(engine, PROMPTS[1], SamplingParams(max_tokens=4, temperature=0.0))
        stream = engine.generate(first)
        await stream.__anext__()
        _, final = await collect(engine, second)
        async for _ in stream:
            pass
        assert final.finish_reason is FinishReason.LENGTH
        assert passes[0] == (0, len(first.prompt_token_ids)), "alone, a prompt goes in whole"
        mixed = [tokens for decoders, tokens in passes if decoders and tokens]
        assert sum(mixed) == len(second.prompt_token_ids) and max(mixed) <= 5, passes
    finally:
        await engine.shutdown()


async def test_cancelling_the_consumer_task_aborts(loaded):
    engine = make_engine(loaded, max_batch_size=1, max_waiting=0)
    try:
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(request(engine, PROMPTS[0], SamplingParams(max_tokens=400, temperature=0))):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine)
    finally:
        await engine.shutdown()


async def test_overflow_is_refused_at_once(loaded):
    engine = make_engine(loaded, max_batch_size=1, max_waiting=1)
    try:
        slow = SamplingParams(max_tokens=300, temperature=0.0)
        first = engine.generate(request(engine, PROMPTS[0], slow))
        await first.__anext__()
        second = engine.generate(request(engine, PROMPTS[1], slow))
        second_task = asyncio.create_task(second.__anext__())
        await until(engine, lambda stats: stats.waiting == 1)  # the second is queued for the slot
        third = engine.generate(request(engine, PROMPTS[2], slow))
        with pytest.raises(EngineOverloaded):
            await third.__anext__()
        await first.aclose()
        await second_task  # the waiting request is admitted when the slot frees
        await second.aclose()
        await wait_idle(engine)
    finally:
        await engine.shutdown()


async def test_admission_is_fifo(loaded):
    engine = make_engine(loaded, max_batch_size=1, max_waiting=8)
    try:
        order: list[int] = []

        async def run(index: int):
            async for event in engine.generate(
                request(engine, PROMPTS[index], SamplingParams(max_tokens=2, temperature=0))
            ):
                if event.finished:
                    order.append(index)

        tasks = []
        for index in range(5):
            tasks.append(asyncio.create_task(run(index)))
            await asyncio.sleep(0)  # the task runs up to its first wait: it is submitted before the next one
        await asyncio.gather(*tasks)
        assert order == list(range(5))
    finally:
        await engine.shutdown()


async def test_deadline_cancels_waiting_and_running_requests(loaded):
    engine = make_engine(loaded, max_batch_size=1, max_waiting=4, max_model_len=4096)
    try:
        long = SamplingParams(max_tokens=4000, temperature=0.0)
        running = request(engine, PROMPTS[1], long, deadline=time.monotonic() + 0.3)
        waiting = request(engine, PROMPTS[0], long, deadline=time.monotonic() + 0.1)
        (_, running_final), (_, waiting_final) = await asyncio.gather(
            collect(engine, running), collect(engine, waiting)
        )
        assert running_final.finish_reason is FinishReason.CANCELLED
        assert 0 < running_final.usage.completion_tokens < 4000
        # Its deadline passed while it waited for the only slot.
        assert waiting_final.finish_reason is FinishReason.CANCELLED
        assert waiting_final.usage.completion_tokens == 0
        await wait_idle(engine)
    finally:
        await engine.shutdown()


async def test_stop_string_finishes_with_stop(loaded):
    engine = make_engine(loaded)
    try:
        text, _ = await collect(engine, request(engine, PROMPTS[0], SamplingParams(max_tokens=24, temperature=0)))
        stop = text[5:9]
        assert stop.strip(), "the tiny model should produce some text"
        stopped_text, final = await collect(
            engine, request(engine, PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, stop=(stop,)))
        )
        assert final.finish_reason is FinishReason.STOP
        assert stopped_text == text[: text.index(stop)]
    finally:
        await engine.shutdown()


async def test_context_window_ends_generation_with_length(loaded):
    engine = make_engine(loaded, max_model_len=64)
    try:
        req = request(engine, PROMPTS[0], SamplingParams(max_tokens=1000, temperature=0))
        _, final = await collect(engine, req)
        assert final.finish_reason is FinishReason.LENGTH
        assert final.usage.total_tokens == 64
    finally:
        await engine.shutdown()


async def test_seeded_sampling_is_reproducible_in_any_batch(loaded):
    engine = make_engine(loaded)
    try:
        sampled = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
        alone, _ = await collect(engine, request(engine, PROMPTS[0], sampled))
        crowd = await asyncio.gather(
            collect(engine, request(engine, PROMPTS[0], sampled)),
            *(
                collect(engine, request(engine, p, SamplingParams(max_tokens=16, temperature=1.0)))
                for p in PROMPTS[1:4]
            ),
        )
        assert crowd[0][0] == alone
    finally:
        await engine.shutdown()


async def test_a_failing_request_does_not_hurt_the_others(loaded, monkeypatch):
    from service.engine import scheduler as scheduler_module

    real_select = scheduler_module.select_tokens

    def flaky_select(logits, params, *args):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("injected sampling failure")
        return real_select(logits, params, *args)

    monkeypatch.setattr(scheduler_module, "select_tokens", flaky_select)
    engine = make_engine(loaded)
    try:
        good = SamplingParams(max_tokens=20, temperature=0.0)
        bad = SamplingParams(max_tokens=20, temperature=0.5, seed=666)
        results = await asyncio.gather(
            collect(engine, request(engine, PROMPTS[0], good)),
            collect(engine, request(engine, PROMPTS[1], bad)),
            collect(engine, request(engine, PROMPTS[2], good)),
        )
        reasons = [final.finish_reason for _, final in results]
        assert reasons == [FinishReason.LENGTH, FinishReason.ERROR, FinishReason.LENGTH]
        await wait_idle(engine)
    finally:
        await engine.shutdown()


async def test_a_consumer_that_falls_behind_is_ended_with_slow_consumer(loaded):
    """The consumer stops reading after one event: once max_buffered_tokens
    events wait for it, the request is aborted (slot freed); reading on, it
    gets exactly those events, then SLOW_CONSUMER. An answer within the same
    bound arrives whole."""
    engine = make_engine(loaded, max_batch_size=1, max_waiting=0, max_buffered_tokens=8)
    try:
        stream = engine.generate(request(engine, PROMPTS[0], SamplingParams(max_tokens=400, temperature=0.0)))
        await stream.__anext__()  # submitted, then not read
        await wait_idle(engine)  # ended long before 400 tokens
        rest = [event async for event in stream]
        assert len(rest) == 8 + 1 and rest[-1].finish_reason is FinishReason.SLOW_CONSUMER
        assert not any(event.finished for event in rest[:-1])
        # An answer that fits the bound is never cut, however late it is read
        # (whether a longer one is depends on how fast this loop runs beside the engine).
        _, final = await collect(engine, request(engine, PROMPTS[1], SamplingParams(max_tokens=8, temperature=0.0)))
        assert final.finish_reason is FinishReason.LENGTH and final.usage.completion_tokens == 8
    finally:
        await engine.shutdown()
