"""Speculative decoding with the real weights and the default quantization: greedy
and seeded output is exactly the output without it, alone and batched, and
prompt-lookup drafts are accepted on code-editing prompts, also under the
server's default repetition penalty."""

from __future__ import annotations

import asyncio

import pytest

from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.loader import load_model
from service.engine.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.real_model

CODE = """def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)
"""
CASES = [
    (f"Rename `values` to `items` in this function and return the whole function:\n\n{CODE}", 0.0, None, 1.0),
    ("Write a haiku about the sea.", 0.0, None, 1.0),
    (f"Add a docstring to this function and return the whole function:\n\n{CODE}", 0.7, 11, 1.0),
    # The server's default repetition penalty: such requests speculate too.
    (f"Rename `total` to `sum_` in this function and return the whole function:\n\n{CODE}", 0.7, 5, 1.05),
]


async def outputs(engine: Engine, together: bool) -> list[tuple[str, int]]:
    async def one(index: int, text: str, temperature: float, seed: int | None, penalty: float) -> tuple[str, int]:
        prompt = tuple(engine.encode_chat([{"role": "user", "content": text}]))
        sampling = SamplingParams(
            max_tokens=32, temperature=temperature, top_p=0.9, seed=seed, repetition_penalty=penalty
        )
        events = [event async for event in engine.generate(GenerationRequest(f"r{index}", prompt, sampling))]
        return "".join(event.text for event in events), events[-1].usage.completion_tokens

    calls = [one(index, *case) for index, case in enumerate(CASES)]
    if together:
        return list(await asyncio.gather(*calls))
    return [await call for call in calls]


@pytest.mark.timeout(1200)
async def test_output_is_unchanged_and_drafts_are_accepted(real_model_dir):
    results = {}
    for tokens in (0, 4):
        # One thread: on a busy shared machine two OpenMP threads wait on each other in every op.
        config = EngineConfig.defaults(
            max_batch_size=4,
            max_waiting=4,
            max_model_len=1024,
            interleaved_prefill_tokens=512,
            threads=1,
            prefix_cache_bytes=0,
            speculative_tokens=tokens,
            speculative_max_batch=4,
        )
        engine = Engine(lambda _quantization: load_model(str(real_model_dir)), config)
        engine.start()
        try:
            results[tokens] = (await outputs(engine, False), await outputs(engine, True))
            stats = engine.stats()
        finally:
            await engine.shutdown()
    assert results[4] == results[0]
    assert results[0][0] == results[0][1]
    assert stats.accepted_draft_tokens_total > stats.draft_tokens_total / 4
