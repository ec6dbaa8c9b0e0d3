"""The slot-KV forward pass must reproduce transformers' own greedy decoding,
whatever the chunking of the prompt and whoever shares the batch."""

from __future__ import annotations

import pytest
import torch

from service.engine import native
from service.engine.config import EngineConfig
from service.engine.loader import load_model
from service.engine.model_runner import ModelRunner, PrefillChunk
from service.engine.threads import WINDOW

PROMPTS = ["What is the capital of France?", "def add", "法国的首都是哪里？"]


def _prompt_ids(loaded, text: str) -> list[int]:
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_chunked_decoding_matches_transformers_generate(tiny_model_dir, dtype):
    loaded = load_model(str(tiny_model_dir), dtype=dtype)
    steps = 16
    prompts = [_prompt_ids(loaded, p) for p in PROMPTS]
    expected = [
        loaded.model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, eos_token_id=None)[
            0, len(ids) :
        ].tolist()
        for ids in prompts
    ]
    runner = ModelRunner(
        loaded, EngineConfig.defaults(max_batch_size=4, max_model_len=256, quantization="none")
    )  # repacks the model's weights
    outputs, positions = [], []
    for slot, ids in enumerate(prompts):
        # Uneven chunks, including a chunk of one token.
        runner.prefill(slot, ids[:3], 0)
        runner.prefill(slot, ids[3:4], 3)
        logits = runner.prefill(slot, ids[4:], 4)
        outputs.append([int(logits.argmax())])
        positions.append(len(ids))
    for _ in range(steps - 1):
        logits = runner.decode([o[-1] for o in outputs], positions)
        for row, out in enumerate(outputs):
            out.append(int(logits[row].argmax()))
            positions[row] += 1
    assert outputs == expected
    assert len(set(map(tuple, outputs))) == len(outputs), "prompts should decode differently"


def test_a_mixed_step_equals_separate_passes(tiny_model_dir):
    """Decode rows and several prompt chunks (one cut short) in one forward
    pass give the logits each would get in a pass of its own."""
    a, b, c = (_prompt_ids(load_model(str(tiny_model_dir)), p) for p in PROMPTS)
    mixed = ModelRunner(
        load_model(str(tiny_model_dir), dtype="float32"),
        EngineConfig.defaults(max_batch_size=3, max_model_len=128, quantization="none"),
    )
    alone = ModelRunner(
        load_model(str(tiny_model_dir), dtype="float32"),
        EngineConfig.defaults(max_batch_size=3, max_model_len=128, quantization="none"),
    )
    token = int(mixed.prefill(0, a, 0).argmax())
    alone.prefill(0, a, 0)
    got = mixed.step([token], [len(a)], [PrefillChunk(1, b, 0), PrefillChunk(2, c[:4], 0)])
    want = [alone.decode([token], [len(a)])[0], alone.prefill(1, b, 0), alone.prefill(2, c[:4], 0)]
    assert got.shape == (3, mixed.vocab_size)
    for row, expected in enumerate(want):
        assert torch.allclose(got[row], expected, atol=1e-4), row
    # The cut-short prompt continues where it stopped, next to two decoders.
    tokens = [int(got[0].argmax()), int(got[1].argmax())]
    got = mixed.step(tokens, [len(a) + 1, len(b)], [PrefillChunk(2, c[4:], 4)])
    want = [*alone.decode(tokens, [len(a) + 1, len(b)]), alone.prefill(2, c[4:], 4)]
    for row, expected in enumerate(want):
        assert torch.allclose(got[row], expected, atol=1e-4), row


def test_move_slot_keeps_a_sequence_decodable(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="float32")
    runner = ModelRunner(loaded, EngineConfig.defaults(max_batch_size=3, max_model_len=128, quantization="none"))
    ids = _prompt_ids(loaded, PROMPTS[0])
    first = runner.prefill(2, ids, 0)
    runner.move_slot(2, 0, len(ids))
    token = int(first.argmax())
    moved = runner.decode([token], [len(ids)])
    runner.prefill(1, ids, 0)
    reference = runner.decode([token, token], [len(ids), len(ids)])
    assert torch.allclose(moved[0], reference[1], atol=1e-5)


@pytest.mark.parametrize(
    ("quantization", "mean_similarity", "min_similarity", "min_agreement"),
    # 4 bits of random Gaussian weights lose far more than a trained model's (whose
    # perplexity the real-model quality guard bounds), hence int4's looser bounds here.
    [
        ("int8", 0.98, 0.8, 0.6),
        ("int5", 0.95, 0.7, 0.5),
        ("int8-weight-only", 0.98, 0.8, 0.6),
        ("int4", 0.85, 0.45, 0.3),
    ],
)
def test_int8_runner_tracks_the_float_model(
    tiny_model_dir, quantization, mean_similarity, min_similarity, min_agreement
):
    """Quantization perturbs the logits a little: they stay strongly correlated
    with float32 ones. (The random tiny model has near-tied top tokens, so
    top-1 agreement is a weak signal here; the real-model quality check is in
    tests/real_model.)"""
    reference = ModelRunner(
        load_model(str(tiny_model_dir), dtype="float32"),
        EngineConfig.defaults(max_batch_size=1, max_model_len=128, quantization="none"),
    )
    quantized = ModelRunner(
        load_model(str(tiny_model_dir), dtype="float32"),
        EngineConfig.defaults(max_batch_size=1, max_model_len=128, quantization=quantization),
    )
    loaded = load_model(str(tiny_model_dir))
    agree = total = 0
    similarities = []
    for text in PROMPTS:
        ids = _prompt_ids(loaded, text)
        for end in range(4, len(ids) + 1):
            want = reference.prefill(0, ids[:end], 0)
            got = quantized.prefill(0, ids[:end], 0)
            assert got.dtype == torch.float32 and torch.isfinite(got).all()
            similarities.append(float(torch.nn.functional.cosine_similarity(want, got, dim=0)))
            agree += int(want.argmax() == got.argmax())
            total += 1
    assert sum(similarities) / len(similarities) > mean_similarity and min(similarities) > min_similarity, similarities
    assert agree / total >= min_agreement, f"{quantization} top-1 agreement {agree}/{total}"


def test_a_bfloat16_kv_cache_tracks_the_float32_one(tiny_model_dir):
    reference = ModelRunner(
        load_model(str(tiny_model_dir), dtype="float32"),
        EngineConfig.defaults(max_batch_size=2, max_model_len=128, quantization="none"),
    )
    halved = ModelRunner(
        load_model(str(tiny_model_dir), dtype="float32"),
        EngineConfig.defaults(max_batch_size=2, max_model_len=128, kv_cache_dtype="bfloat16", quantization="none"),
    )
    assert halved.kv_bytes_per_token * 2 == reference.kv_bytes_per_token
    ids = _prompt_ids(load_model(str(tiny_model_dir)), PROMPTS[0])
    for runner in (reference, halved):
        runner.prefill(0, ids[:-4], 0)
        runner.prefill(1, ids, 0)
    want = reference.step([ids[-4]], [len(ids) - 4], [PrefillChunk(1, ids[-2:], len(ids) - 2)])
    got = halved.step([ids[-4]], [len(ids) - 4], [PrefillChunk(1, ids[-2:], len(ids) - 2)])
    assert got.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(want, got, dim=-1).min() > 0.99


def test_unknown_kv_cache_dtype_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="KV cache dtype"):
        ModelRunner(
            load_model(str(tiny_model_dir)),
            EngineConfig.defaults(max_batch_size=1, max_model_len=64, kv_cache_dtype="int4", quantization="none"),
        )


def test_unknown_quantization_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="quantization"):
        ModelRunner(
            load_model(str(tiny_model_dir)),
            EngineConfig.defaults(max_batch_size=1, max_model_len=64, quantization="int3"),
        )


@pytest.mark.skipif(not native.available(), reason="no AVX2 kernels on this machine")
@pytest.mark.parametrize("kv_cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quantization", ["int8", "int5"])
def test_the_native_layers_compute_what_the_torch_layers_do(tiny_model_dir, quantization, kv_cache_dtype):
    """The decoder layers in one native call (norms, rotary embedding, the
    cache write, attention, SiLU) against the same packed weights through
    torch: a mixed step of decoders and prompt chunks, past a tail of keys
    that is not a multiple of 8, gives the same logits and cache. With a
    bfloat16 cache the two round at different places inside attention, and
    the random model's int8 activations magnify that: there the first
    layer's cache (before any attention) must agree to bfloat16's precision
    and the logits closely."""
    config = EngineConfig.defaults(
        max_batch_size=3, max_model_len=128, quantization=quantization, kv_cache_dtype=kv_cache_dtype
    )
    native_runner = ModelRunner(load_model(str(tiny_model_dir)), config)
    torch_runner = ModelRunner(load_model(str(tiny_model_dir)), config, native_forward=False)
    assert native_runner.native_layers and not torch_runner.native_layers
    a, b, c = (_prompt_ids(load_model(str(tiny_model_dir)), p) for p in PROMPTS)
    for runner in (native_runner, torch_runner):
        runner.prefill(0, a, 0)
    steps = [
        ([7], [len(a)], [PrefillChunk(1, b, 0), PrefillChunk(2, c[:5], 0)]),
        ([9, 11], [len(a) + 1, len(b)], [PrefillChunk(2, c[5:], 5)]),
    ]
    exact = kv_cache_dtype == "float32"
    for step in steps:
        got, want = native_runner.step(*step), torch_runner.step(*step)
        if exact:
            assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
        else:
            assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.99
    length = max(len(a) + 2, len(b) + 1, len(c))
    got_cache = native_runner.slot_positions(2, 0, length).float()
    want_cache = torch_runner.slot_positions(2, 0, length).float()
    if exact:
        assert torch.allclose(got_cache, want_cache, atol=1e-4, rtol=0)
    else:
        # The same rounding: all but the rare values on a rounding boundary are equal.
        assert torch.allclose(got_cache[0], want_cache[0], atol=1e-3, rtol=2**-7)
        assert (got_cache[0] == want_cache[0]).float().mean() > 0.97


@pytest.mark.skipif(not native.available(), reason="no AVX2 kernels on this machine")
def test_the_native_layers_refuse_rows_outside_the_cache(tiny_model_dir):
    runner = ModelRunner(
        load_model(str(tiny_model_dir)), EngineConfig.defaults(max_batch_size=2, max_model_len=64, quantization="int5")
    )
    assert runner.native_layers
    runner.decode([5], [63])  # the last position is fine
    with pytest.raises(ValueError, match="positions out of range"):
        runner.decode([5], [64])
    with pytest.raises(ValueError, match="slots out of range"):
        runner.step([], [], [PrefillChunk(2, [5, 6], 0)])


@pytest.mark.skipif(not native.available(), reason="no AVX2 kernels on this machine")
def test_the_runner_reports_the_threads_its_governor_chose(tiny_model_dir):
    """What qwen_engine_compute_threads shows: --threads, then fewer after hindered passes."""
    runner = ModelRunner(
        load_model(str(tiny_model_dir)),
        EngineConfig.defaults(max_batch_size=1, max_model_len=64, quantization="int8", threads=2),
    )
    assert runner.compute_threads == 2
    for _ in range(WINDOW):
        runner._governor.record(0.3, 1.0)  # a thread kept off its core for most of each pass
    assert runner.compute_threads == 1
    threads = torch.get_num_threads()
    try:
        runner.decode([5], [0])  # the next pass runs on that count
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not native.available(), reason="no AVX2 kernels on this machine")
def test_a_native_pass_reports_how_much_of_it_its_threads_ran(tiny_model_dir):
    """The share the thread governor decides on (service/engine/threads.py)."""
    runner = ModelRunner(
        load_model(str(tiny_model_dir)), EngineConfig.defaults(max_batch_size=1, max_model_len=64, quantization="int8")
    )
    stack = runner._stack
    assert stack is not None
    hidden = torch.randn(3, 64)
    for threads in (1, 2):
        share = stack.forward(hidden, [0, 1, 2], [0, 0, 0], threads)
        assert 0 < share <= 1.05
        assert torch.isfinite(hidden).all()
