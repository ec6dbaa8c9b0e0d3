"""Grammar-constrained decoding: every constrained answer that ends on its
own is valid against its schema, whatever the sampling; end-of-sequence only
where the grammar may end; unconstrained rows in the same batch unchanged."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import torch
from test_engine import collect, loaded, make_engine, request  # noqa: F401 - fixture

from service.engine.grammar import GrammarCompiler, InvalidGrammar, allocate_bitmask
from service.engine.sampling import select_tokens
from service.engine.types import ConstraintKind, FinishReason, OutputConstraint, SamplingParams

# Bounded everywhere (enums, maxLength, maxItems, integer range), so a
# sampled answer always closes well within max_tokens.
FORM_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "maybe"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["answer", "confidence", "ok", "tags", "note"],
    "additionalProperties": False,
}


def schema_constraint(schema: dict) -> OutputConstraint:
    return OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))


@pytest.fixture
def compiler(loaded):  # noqa: F811
    return GrammarCompiler(loaded.tokenizer, loaded.model.config.vocab_size, loaded.eos_token_ids)


def allowed(matcher, vocab: int) -> torch.Tensor:
    bitmask = allocate_bitmask(1, vocab)
    matcher.fill_mask(bitmask, 0)
    return ((bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten()[:vocab]


def test_end_of_sequence_only_where_the_grammar_may_end(loaded, compiler):  # noqa: F811
    vocab = loaded.model.config.vocab_size
    (eos,) = loaded.eos_token_ids & {loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    matcher = compiler.compile(schema_constraint({"enum": ["yes", "no"]})).matcher()
    first = allowed(matcher, vocab)
    assert not first[eos]
    assert first.sum() < vocab // 4  # only tokens that can start "yes" or "no"
    for token in loaded.tokenizer.encode('"no"'):
        matcher.accept(token)
    after = allowed(matcher, vocab)
    assert after[eos] and after.sum() == 1  # complete: only the end


def test_invalid_schema_is_refused(compiler):
    with pytest.raises(InvalidGrammar, match="foo"):
        compiler.compile(schema_constraint({"type": "foo"}))


def test_a_masked_greedy_row_takes_the_best_allowed_token(loaded, compiler):  # noqa: F811
    vocab = loaded.model.config.vocab_size
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    original = logits.clone()
    matcher = compiler.compile(schema_constraint({"enum": ["yes", "no"]})).matcher()
    mask = allowed(compiler.compile(schema_constraint({"enum": ["yes", "no"]})).matcher(), vocab)
    greedy = SamplingParams(max_tokens=4)
    chosen = select_tokens(logits, [greedy, greedy], [torch.Generator()] * 2, [None, None], [matcher, None])
    assert chosen[0] == int(original[0].masked_fill(~mask, float("-inf")).argmax())
    assert chosen[1] == int(original[1].argmax())  # the unconstrained row is untouched
    assert not mask[int(original[0].argmax())] or chosen[0] == int(original[0].argmax())


async def test_sampled_answers_always_validate(loaded):  # noqa: F811
    """Temperature 1 on random weights: 100 % of the answers validate, and an
    unconstrained greedy request sharing the batch gets its usual text."""
    engine = make_engine(loaded, max_batch_size=8, max_waiting=32)
    try:
        grammar = engine.compile_grammar(schema_constraint(FORM_SCHEMA))
        sampled = SamplingParams(max_tokens=200, temperature=1.0, seed=0)
        plain = SamplingParams(max_tokens=24)
        alone, _ = await collect(engine, request(engine, "Hello, world!", plain))
        requests = [
            request(
                engine, f"Fill the form {i}", dataclasses_replace(sampled, seed=i), rid=f"form-{i}", grammar=grammar
            )
            for i in range(24)
        ]
        results = await asyncio.gather(
            collect(engine, request(engine, "Hello, world!", plain)), *(collect(engine, r) for r in requests)
        )
        assert results[0][0] == alone
        texts = set()
        for text, final in results[1:]:
            assert final.finish_reason is FinishReason.STOP, text
            jsonschema.validate(json.loads(text), FORM_SCHEMA)
            texts.add(text)
        assert len(texts) > 12  # really sampled, not one forced answer
    finally:
        await engine.shutdown()


def dataclasses_replace(params: SamplingParams, **changes) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)
