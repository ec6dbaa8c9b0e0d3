"""The prefix cache: reused KV is exactly the KV it replaces, greedy output
is the same with and without it, and its bookkeeping holds under eviction,
concurrency, cancellation and failed steps."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from tiny_model import tiny_engine_config

from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.loader import load_model
from service.engine.model_runner import ModelRunner
from service.engine.prefix_cache import BLOCK_SIZE, PrefixCache, block_keys
from service.engine.types import FinishReason, GenerationRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
SYSTEM = (
    "You are a careful assistant for a team that streams tokens over gRPC. Answer briefly, cite the "
    "function you mean, and say so when you do not know. The quick brown fox jumps over the lazy dog."
)
QUESTIONS = ["What is the capital of France?", "def add(a, b):", "法国的首都是哪里？", "Hello, world!"]
CACHE_BYTES = 64 << 20


def tiny_engine(tiny_model_dir, prefix_cache_bytes: int, **overrides) -> Engine:
    loaded = load_model(str(tiny_model_dir), dtype=overrides.pop("dtype", "float32"))
    engine = Engine(loaded, tiny_engine_config(prefix_cache_bytes=prefix_cache_bytes, **overrides))
    engine.start()
    return engine


def chat(engine: Engine, messages: list[dict[str, str]], rid: str, sampling: SamplingParams = GREEDY):
    return GenerationRequest(rid, tuple(engine.encode_chat(messages)), sampling)


async def collect(engine: Engine, req: GenerationRequest):
    events = [event async for event in engine.generate(req)]
    return "".join(e.text for e in events), events[-1]


async def conversation(engine: Engine, turns: int, question: str, tag: str):
    """A chat whose every turn re-sends the whole history, the model's answers included."""
    messages = [{"role": "system", "content": SYSTEM}]
    results = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"{question} (turn {turn})"})
        text, final = await collect(engine, chat(engine, messages, f"{tag}-{turn}"))
        messages.append({"role": "assistant", "content": text})
        results.append((text, final))
    return results


# ----- the block store on its own ---------------------------------------------
@pytest.fixture
def runner(tiny_model_dir) -> ModelRunner:
    return ModelRunner(
        load_model(str(tiny_model_dir), dtype="float32"),
        EngineConfig.defaults(max_batch_size=3, max_model_len=128, quantization="none"),
    )


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    return torch.randint(5, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kv_cache_dtype", ["float32", "bfloat16"])
def test_copied_in_kv_equals_the_recomputed_kv_and_gives_the_same_logits(tiny_model_dir, kv_cache_dtype):
    """int8 (the default) is batch- and chunk-invariant, so the remainder
    prefilled after copied blocks equals the whole prompt prefilled at once,
    bit for bit (float32 without quantization is not: MKL sums one row
    differently from several)."""
    runner = ModelRunner(
        load_model(str(tiny_model_dir), dtype="bfloat16"),
        EngineConfig.defaults(max_batch_size=3, max_model_len=128, quantization="int8", kv_cache_dtype=kv_cache_dtype),
    )
    tokens = prompt_ids(3 * BLOCK_SIZE + 5)
    cache = PrefixCache(runner, capacity_blocks=8)
    expected_logits = runner.prefill(0, tokens, 0)
    keys = block_keys(tokens, 3)
    assert cache.store(keys, slot=0) == 3
    assert cache.match(keys) == keys
    cache.copy_into(keys, slot=2)
    cache.unpin(keys)
    reused = 3 * BLOCK_SIZE
    assert torch.equal(runner.slot_positions(2, 0, reused), runner.slot_positions(0, 0, reused))
    logits = runner.prefill(2, tokens[reused:], reused)
    assert torch.equal(runner.slot_positions(2, 0, len(tokens)), runner.slot_positions(0, 0, len(tokens)))
    assert torch.equal(logits, expected_logits)


def test_keys_name_the_whole_prefix():
    tokens = prompt_ids(3 * BLOCK_SIZE)
    other_start = [tokens[0] + 1] + tokens[1:]
    keys, other = block_keys(tokens, 3), block_keys(other_start, 3)
    assert len(set(keys)) == 3
    assert not set(keys) & set(other), "a block with the same tokens after a different prefix must not match"
    assert block_keys(tokens, 3, known=keys[:2]) == keys
    assert block_keys(tokens + [7] * BLOCK_SIZE, 4)[:3] == keys


def test_match_returns_the_longest_stored_run_from_the_start(runner):
    tokens = prompt_ids(4 * BLOCK_SIZE)
    runner.prefill(0, tokens, 0)
    cache = PrefixCache(runner, capacity_blocks=8)
    keys = block_keys(tokens, 4)
    assert cache.match(keys) == []
    cache.store(keys[:2], slot=0)
    assert cache.match(keys) == keys[:2]
    assert cache.match(block_keys(prompt_ids(4 * BLOCK_SIZE, seed=1), 4)) == []


def test_eviction_under_a_tiny_budget_is_lru_and_spares_pinned_blocks(runner):
    first, second = prompt_ids(2 * BLOCK_SIZE, seed=1), prompt_ids(2 * BLOCK_SIZE, seed=2)
    runner.prefill(0, first, 0)
    runner.prefill(1, second, 0)
    cache = PrefixCache(runner, capacity_blocks=3)
    first_keys, second_keys = block_keys(first, 2), block_keys(second, 2)
    assert cache.store(first_keys, 0) == 2
    # Room for one more block: the second chain's first block; its second would
    # have to evict the first chain's end (LRU), which is fine.
    assert cache.store(second_keys, 1) == 2
    assert cache.blocks_used == 3 and cache.evictions == 1
    assert cache.match(first_keys) == first_keys[:1], "the chain lost its end, not its start"
    # Every block pinned (first chain by the match above, second by a match now): nothing to evict.
    assert cache.match(second_keys) == second_keys
    third = prompt_ids(BLOCK_SIZE, seed=3)
    runner.prefill(2, third, 0)
    assert cache.store(block_keys(third, 1), 2) == 0
    assert cache.blocks_used == 3 and cache.evictions == 1
    cache.unpin(first_keys[:1])
    assert cache.store(block_keys(third, 1), 2) == 1
    assert cache.match(first_keys) == [] and cache.match(second_keys) == second_keys


def test_a_chain_longer_than_the_budget_keeps_its_start(runner):
    tokens = prompt_ids(5 * BLOCK_SIZE)
    runner.prefill(0, tokens, 0)
    cache = PrefixCache(runner, capacity_blocks=2)
    keys = block_keys(tokens, 5)
    assert cache.store(keys, 0) == 2
    assert cache.match(keys) == keys[:2]


# ----- the engine ----------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [{}, {"kv_cache_dtype": "bfloat16"}, {"quantization": "int8"}, {"dtype": "bfloat16"}],
    ids=["float32", "bf16-kv", "int8", "bf16"],
)
async def test_multi_turn_greedy_output_is_identical_with_and_without_the_cache(tiny_model_dir, options):
    plain = tiny_engine(tiny_model_dir, 0, **options)
    cached = tiny_engine(tiny_model_dir, CACHE_BYTES, **options)
    try:
        expected = await conversation(plain, 3, QUESTIONS[0], "plain")
        got = await conversation(cached, 3, QUESTIONS[0], "cached")
        assert [text for text, _ in got] == [text for text, _ in expected]
        assert all(final.usage.cached_prompt_tokens == 0 for _, final in expected)
        assert got[0][1].usage.cached_prompt_tokens == 0
        for turn in (1, 2):
            usage, previous = got[turn][1].usage, got[turn - 1][1].usage
            assert usage.cached_prompt_tokens >= previous.prompt_tokens // BLOCK_SIZE * BLOCK_SIZE
            assert usage.cached_prompt_tokens % BLOCK_SIZE == 0 and usage.cached_prompt_tokens < usage.prompt_tokens
        stats = cached.stats()
        assert stats.prefix_cache_hit_tokens_total == sum(final.usage.cached_prompt_tokens for _, final in got)
        assert stats.prompt_tokens_total == sum(final.usage.prompt_tokens for _, final in got)
    finally:
        await plain.shutdown()
        await cached.shutdown()


async def test_the_answer_is_stored_with_the_prompt(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir, CACHE_BYTES)
    try:
        req = chat(engine, [{"role": "user", "content": QUESTIONS[0]}], "one", SamplingParams(max_tokens=40))
        _, final = await collect(engine, req)
        assert final.finish_reason is FinishReason.LENGTH
        # The last token sampled never entered the KV cache.
        assert engine.stats().prefix_cache_blocks_used == (final.usage.prompt_tokens + 40 - 1) // BLOCK_SIZE
    finally:
        await engine.shutdown()


async def test_concurrent_requests_sharing_a_prefix_match_the_uncached_output(tiny_model_dir):
    plain = tiny_engine(tiny_model_dir, 0)
    cached = tiny_engine(tiny_model_dir, CACHE_BYTES)
    try:
        expected = [
            await collect(
                plain, chat(plain, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], q)
            )
            for q in QUESTIONS
        ]
        # Twice at once: the first wave shares the system prompt while it is being prefilled,
        # the second finds it (and the first wave's prompts) stored.
        for wave in ("a", "b"):
            got = await asyncio.gather(
                *(
                    collect(
                        cached,
                        chat(cached, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], q + wave),
                    )
                    for q in QUESTIONS
                )
            )
            assert [text for text, _ in got] == [text for text, _ in expected]
        assert all(final.usage.cached_prompt_tokens > 0 for _, final in got)
    finally:
        await plain.shutdown()
        await cached.shutdown()


async def test_eviction_under_a_tiny_budget_keeps_outputs_exact(tiny_model_dir):
    plain = tiny_engine(tiny_model_dir, 0)
    block_bytes = plain._scheduler._runner.kv_bytes_per_token * BLOCK_SIZE
    cached = tiny_engine(tiny_model_dir, 6 * block_bytes)
    try:
        for rounds in range(2):
            for q in QUESTIONS:
                messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
                expected, _ = await collect(plain, chat(plain, messages, f"p{rounds}{q}"))
                got, final = await collect(cached, chat(cached, messages, f"c{rounds}{q}"))
                assert got == expected
        stats = cached.stats()
        assert stats.prefix_cache_blocks_capacity == 6 and stats.prefix_cache_blocks_used == 6
        assert stats.prefix_cache_evictions_total > 0
        assert stats.prefix_cache_hit_tokens_total > 0
    finally:
        await plain.shutdown()
        await cached.shutdown()


async def test_cancel_mid_prefill_of_a_shared_prefix(tiny_model_dir, monkeypatch):
    """A request cancelled after its first prompt chunk: its computed blocks
    are kept, and the next request sharing them gets the exact output."""
    real_step = ModelRunner.step
    first_chunk_done = threading.Event()
    cancelled = threading.Event()

    def step(self, decode_tokens, decode_positions, chunks, logit_rows=None):
        out = real_step(self, decode_tokens, decode_positions, chunks, logit_rows)
        if any(c.token_ids and c.start == 0 and c.slot == 0 for c in chunks) and not first_chunk_done.is_set():
            first_chunk_done.set()
            cancelled.wait(5)  # the abort arrives before the next step
        return out

    plain = tiny_engine(tiny_model_dir, 0)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[1]}]
    expected, _ = await collect(plain, chat(plain, messages, "plain"))
    await plain.shutdown()
    monkeypatch.setattr(ModelRunner, "step", step)
    cached = tiny_engine(tiny_model_dir, CACHE_BYTES)
    try:
        doomed = chat(cached, messages, "doomed")
        stream = cached.generate(doomed)
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.to_thread(first_chunk_done.wait, 5)
        cached.abort("doomed")
        cancelled.set()
        final = await task
        assert final.finish_reason is FinishReason.CANCELLED and final.usage.completion_tokens == 0
        assert cached.stats().prefix_cache_blocks_used == 1, "the one block computed before the cancel is kept"
        text, final = await collect(cached, chat(cached, messages, "next"))
        assert text == expected
        assert final.usage.cached_prompt_tokens == BLOCK_SIZE
    finally:
        await cached.shutdown()


async def test_a_failed_step_after_the_copy_redoes_it(tiny_model_dir, monkeypatch):
    """Two prompts start after their reused prefixes in one pass; the part in
    slot 1 fails (alone too), the other is redone: copy and all."""
    real_step = ModelRunner.step
    failures = []

    def step(self, decode_tokens, decode_positions, chunks, logit_rows=None):
        if any(c.slot == 1 and c.start > 0 for c in chunks):
            failures.append(len(chunks))
            raise RuntimeError("injected failure")
        return real_step(self, decode_tokens, decode_positions, chunks, logit_rows)

    plain = tiny_engine(tiny_model_dir, 0)
    messages = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS[:2]]
    expected, _ = await collect(plain, chat(plain, messages[0], "plain"))
    await plain.shutdown()
    cached = tiny_engine(tiny_model_dir, CACHE_BYTES, prefill_chunk_size=512)
    try:
        first, _ = await collect(cached, chat(cached, messages[0], "first"))
        assert first == expected
        blocks = cached.stats().prefix_cache_blocks_used
        monkeypatch.setattr(ModelRunner, "step", step)
        (text, final), (_, failed) = await asyncio.gather(
            collect(cached, chat(cached, messages[0], "again")), collect(cached, chat(cached, messages[1], "doomed"))
        )
        assert failures == [2, 1], "the combined pass fails, then the doomed part alone"
        assert failed.finish_reason is FinishReason.ERROR
        assert final.finish_reason is FinishReason.LENGTH and text == expected
        assert final.usage.cached_prompt_tokens > 0
        assert cached.stats().prefix_cache_blocks_used == blocks, "the failed request stored nothing"
    finally:
        await cached.shutdown()
