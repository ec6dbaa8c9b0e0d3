"""A request's tokens do not depend on what else is batched with it, nor on
how its prompt is split into prefill chunks (README: `seed`)."""

from __future__ import annotations

import pytest
import torch
from batch_invariance import arrangements, assert_all_equal

from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.loader import load_model
from service.engine.model_runner import ModelRunner, PrefillChunk
from service.engine.types import SamplingParams

GREEDY = SamplingParams(max_tokens=30, temperature=0.0)
SEEDED = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.95, seed=1234)
# Two of the other streams have prompts longer than one attention block of
# keys (512), so the batch's span of keys is longer than the target's own.
OTHERS = [
    ("The quick brown fox " * 40, SamplingParams(max_tokens=60, temperature=0.0)),
    ("Hello, world!", SamplingParams(max_tokens=60, temperature=0.7, seed=5)),
    ("def add(a, b):\n    return a + b\n" * 30, SamplingParams(max_tokens=30, temperature=0.0)),
    ("法国的首都是哪里？", SamplingParams(max_tokens=30, temperature=0.9)),
]
# (quantization, dtype) pairs that are batch-invariant; float32 without
# quantization is not (MKL's float32 matrix product sums a row differently
# for one row than for several), which is why it is not offered as a default.
INVARIANT = [
    ("int8", "bfloat16"),
    ("int5", "bfloat16"),
    ("int8-weight-only", "bfloat16"),
    ("int4", "bfloat16"),
    ("none", "bfloat16"),
]


def make_engine(model_dir, quantization: str, dtype: str, **overrides) -> Engine:
    options = dict(
        max_batch_size=8,
        max_waiting=8,
        max_model_len=1024,
        prefill_chunk_size=64,
        interleaved_prefill_tokens=16,
        threads=1,
        quantization=quantization,
    )
    options.update(overrides)
    engine = Engine(load_model(str(model_dir), dtype=dtype), EngineConfig.defaults(prefix_cache_bytes=0, **options))
    engine.start()
    return engine


@pytest.mark.parametrize("quantization,dtype", INVARIANT)
@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_output_is_the_same_alone_beside_others_and_as_copies(tiny_model_dir, quantization, dtype, sampling):
    engine = make_engine(tiny_model_dir, quantization, dtype)
    try:
        results = await arrangements(engine, ("What is the capital of France?", sampling), OTHERS, copies=4)
    finally:
        await engine.shutdown()
    assert_all_equal(results)


@pytest.mark.parametrize("quantization,dtype", INVARIANT)
async def test_output_does_not_depend_on_prefill_chunking(tiny_model_dir, quantization, dtype):
    """One pass for the whole prompt, or chunks of 7 tokens (beside a decoding
    stream, which switches to the interleaved budget of 5)."""
    prompt = "def add(a, b):\n    return a + b\n" * 3
    texts = []
    for chunking in (dict(prefill_chunk_size=512), dict(prefill_chunk_size=7, interleaved_prefill_tokens=5)):
        engine = make_engine(tiny_model_dir, quantization, dtype, **chunking)
        try:
            results = await arrangements(engine, (prompt, SEEDED), OTHERS[1:2], copies=2)
        finally:
            await engine.shutdown()
        assert_all_equal(results)
        texts.append(results["alone"][0])
    assert texts[0] == texts[1]


@pytest.mark.parametrize("quantization,dtype", INVARIANT)
def test_decoded_tokens_equal_prefilled_ones(tiny_model_dir, quantization, dtype):
    """The keys, values and logits of a token computed in a decode step are
    bitwise those of the same token prefilled (what a prefix cache reuses)."""
    loaded = load_model(str(tiny_model_dir), dtype=dtype)
    runner = ModelRunner(loaded, EngineConfig.defaults(max_batch_size=2, max_model_len=1024, quantization=quantization))
    prompt = list(loaded.tokenizer.encode("The quick brown fox " * 30))
    tokens, decoded_logits = [int(runner.prefill(0, prompt, 0).argmax())], []
    for position in range(len(prompt), len(prompt) + 12):
        decoded_logits.append(runner.decode([tokens[-1]], [position])[0])
        tokens.append(int(decoded_logits[-1].argmax()))
    text = prompt + tokens[:-1]
    prefilled_logits = runner.step([], [], [PrefillChunk(1, text, 0)], logit_rows=range(len(prompt), len(text)))
    assert torch.equal(torch.stack(decoded_logits), prefilled_logits)
    cache = runner._kv_cache[:, :, :, :, : len(text)]
    assert torch.equal(cache[:, 0], cache[:, 1])
