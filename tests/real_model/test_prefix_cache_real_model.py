"""The prefix cache with the real weights: a chat's later turns reuse the
earlier turns (the model's own answers included) and answer exactly as
without the cache (greedy)."""

from __future__ import annotations

import pytest

from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.loader import load_model
from service.engine.prefix_cache import BLOCK_SIZE
from service.engine.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.real_model

SYSTEM = "You are a helpful coding assistant. Answer briefly."
QUESTIONS = ["Write a Python function that reverses a string.", "Now make it handle None.", "Add a docstring."]


async def conversation(model_dir, prefix_cache_bytes: int, **options):
    engine = Engine(
        load_model(str(model_dir)),
        EngineConfig.defaults(
            max_batch_size=4,
            max_waiting=4,
            max_model_len=2048,
            prefill_chunk_size=512,
            interleaved_prefill_tokens=128,
            threads=2,
            prefix_cache_bytes=prefix_cache_bytes,
            **options,
        ),
    )
    engine.start()
    messages = [{"role": "system", "content": SYSTEM}]
    turns = []
    try:
        for number, question in enumerate(QUESTIONS):
            messages.append({"role": "user", "content": question})
            request = GenerationRequest(
                f"t{number}", tuple(engine.encode_chat(messages)), SamplingParams(max_tokens=48)
            )
            events = [event async for event in engine.generate(request)]
            text = "".join(event.text for event in events)
            messages.append({"role": "assistant", "content": text})
            turns.append((text, events[-1].usage))
    finally:
        await engine.shutdown()
    return turns


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "bfloat16"])
async def test_multi_turn_greedy_is_identical_with_and_without_the_cache(real_model_dir, kv_cache_dtype):
    without = await conversation(real_model_dir, 0, kv_cache_dtype=kv_cache_dtype)
    with_cache = await conversation(real_model_dir, 256 << 20, kv_cache_dtype=kv_cache_dtype)
    for (_, previous), (_, usage) in zip(with_cache, with_cache[1:]):
        # The previous prompt and the answer (its KV excludes the last token sampled), in whole blocks.
        assert (
            usage.cached_prompt_tokens
            >= (previous.prompt_tokens + previous.completion_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
        )
    assert [text for text, _ in with_cache] == [text for text, _ in without]
