"""logprobs, n choices from one prefill, presence/frequency penalties and
logit_bias in the engine, and SamplingParams' own validation."""

from __future__ import annotations

import asyncio
import itertools
import json
import math

import pytest
import torch
from batch_invariance import arrangements, assert_all_equal
from tiny_model import tiny_engine_config

from service.engine.engine import Engine
from service.engine.loader import load_model
from service.engine.sampling import token_logprobs
from service.engine.types import (
    LOGPROB_FLOOR,
    MAX_LOGIT_BIAS_ENTRIES,
    ConstraintKind,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    InvalidSamplingParams,
    OutputConstraint,
    SamplingParams,
    TokenEvent,
)

PROMPT = "What is the capital of France?"
_ids = itertools.count()


def make_engine(model_dir, **overrides) -> Engine:
    """int8 over bfloat16: a batch-invariant configuration (test_batch_invariance.py)."""
    config = tiny_engine_config(
        **{"max_batch_size": 8, "prefill_chunk_size": 64, "interleaved_prefill_tokens": 64, "quantization": "int8"}
        | overrides
    )
    engine = Engine(load_model(str(model_dir), dtype="bfloat16"), config)
    engine.start()
    return engine


@pytest.fixture
async def engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    yield engine
    await engine.shutdown()


def request(engine: Engine, sampling: SamplingParams, text: str = PROMPT, **kw) -> GenerationRequest:
    ids = tuple(engine.encode_chat([{"role": "user", "content": text}]))
    return GenerationRequest(f"f-{next(_ids)}", ids, sampling, **kw)


async def events_of(engine: Engine, req: GenerationRequest) -> list[TokenEvent]:
    return [event async for event in engine.generate(req)]


def token_ids(events: list[TokenEvent]) -> list[int]:
    return [e.logprobs.token_id for e in events if e.logprobs is not None]


# ----------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_k", -1),
        ("repetition_penalty", 0.0),
        ("seed", 2**64 + 42),
        ("n", 0),
        ("n", 9),
        ("n", True),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
        ("presence_penalty", 2.01),
        ("frequency_penalty", -2.5),
        ("frequency_penalty", math.inf),
        ("logit_bias", ((5, 100.5),)),
        ("logit_bias", ((-1, 1.0),)),
        ("logit_bias", ((5, 1.0), (5, 2.0))),
        ("logit_bias", tuple((i, 1.0) for i in range(MAX_LOGIT_BIAS_ENTRIES + 1))),
        ("stop", ("",)),
        ("max_tokens", 0),
    ],
)
def test_invalid_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidSamplingParams) as raised:
        SamplingParams(**{"max_tokens": 4, field: value})
    assert raised.value.field.split("[")[0] == field


def test_tied_alternatives_are_listed_by_token_id_so_greedy_comes_first():
    """bf16 logits tie often; argmax takes the lowest id among equal ones."""
    logits = torch.full((2, 64), -5.0)
    logits[:, [40, 7, 33, 12]] = 3.0  # four tokens tie for first place
    logits[:, 50] = 2.0
    greedy = SamplingParams(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=5)
    chosen = logits.argmax(-1).tolist()
    for entry in token_logprobs(logits, [greedy, greedy], chosen):
        assert entry is not None
        assert [token for token, _ in entry.top] == [7, 12, 33, 40, 50]
        assert entry.top[0] == (entry.token_id, entry.logprob)


def test_top_logprobs_needs_logprobs():
    with pytest.raises(InvalidSamplingParams) as raised:
        SamplingParams(max_tokens=4, top_logprobs=3)
    assert raised.value.field == "top_logprobs"


def test_valid_extremes_are_accepted():
    params = SamplingParams(
        max_tokens=4,
        n=8,
        logprobs=True,
        top_logprobs=20,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        logit_bias=tuple((i, 100.0 if i % 2 else -100.0) for i in range(MAX_LOGIT_BIAS_ENTRIES)),
    )
    assert (params.n, params.top_logprobs, len(params.logit_bias)) == (8, 20, MAX_LOGIT_BIAS_ENTRIES)


# ------------------------------------------------------------- logprobs


async def test_greedy_logprobs_are_the_best_of_their_alternatives(engine):
    events = await events_of(engine, request(engine, SamplingParams(max_tokens=12, logprobs=True, top_logprobs=5)))
    entries = [e.logprobs for e in events if e.logprobs is not None]
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert len(entries) == 12  # one per generated token (no end-of-sequence token here)
    for entry in entries:
        assert len(entry.top) == 5
        values = [value for _, value in entry.top]
        assert values == sorted(values, reverse=True)
        assert entry.top[0] == (entry.token_id, entry.logprob)
        assert LOGPROB_FLOOR <= entry.logprob <= 0.0
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-5
    # The text is the tokens' text: the logprobs' token ids decode to it.
    text = "".join(e.text for e in events)
    assert engine.loaded.tokenizer.decode([e.token_id for e in entries], skip_special_tokens=True) == text


async def test_logprobs_without_alternatives_and_none_when_not_asked(engine):
    events = await events_of(engine, request(engine, SamplingParams(max_tokens=6, logprobs=True)))
    assert all(e.logprobs is not None and e.logprobs.top == () for e in events)
    events = await events_of(engine, request(engine, SamplingParams(max_tokens=6)))
    assert all(e.logprobs is None for e in events)


async def test_sampled_logprobs_are_before_temperature(engine):
    """The same seeded draws report the same distribution at any temperature
    for the first token (same logits): logprobs ignore temperature."""
    first = {}
    for temperature in (0.3, 1.7):
        sampling = SamplingParams(max_tokens=1, temperature=temperature, seed=7, logprobs=True, top_logprobs=3)
        (event,) = await events_of(engine, request(engine, sampling))
        first[temperature] = event.logprobs.top
    assert first[0.3] == first[1.7]


# --------------------------------------------------- penalties and bias


async def test_logit_bias_forces_and_bans_tokens(engine):
    greedy = token_ids(await events_of(engine, request(engine, SamplingParams(max_tokens=10, logprobs=True))))
    forced_token = engine.loaded.tokenizer.convert_tokens_to_ids("Paris") or 300
    forced = SamplingParams(max_tokens=10, logprobs=True, logit_bias=((forced_token, 100.0),))
    assert token_ids(await events_of(engine, request(engine, forced))) == [forced_token] * 10
    banned = SamplingParams(max_tokens=10, logprobs=True, logit_bias=((greedy[0], -100.0),))
    without = token_ids(await events_of(engine, request(engine, banned)))
    assert greedy[0] not in without
    assert without != greedy


async def test_penalties_change_a_repetitive_greedy_answer(engine):
    """A +10 bias makes the tiny model repeat one token; the penalties, which
    grow with each repetition (frequency) or apply once (presence), break it."""
    repeated = 300

    async def count(**penalties: float) -> int:
        sampling = SamplingParams(max_tokens=40, logprobs=True, logit_bias=((repeated, 10.0),), **penalties)
        return token_ids(await events_of(engine, request(engine, sampling))).count(repeated)

    plain = await count()
    assert plain >= 35
    assert await count(frequency_penalty=2.0) <= 10
    assert await count(presence_penalty=2.0) < plain
    assert await count(presence_penalty=-2.0) >= plain  # a negative penalty rewards repeating


# ------------------------------------------------------------------- n


async def test_n_choices_share_one_prefill_and_follow_the_seed_stream(engine, monkeypatch):
    runner = engine._scheduler._runner
    real_step = runner.step
    prompt_tokens_computed = []

    def counting_step(tokens, positions, chunks):
        prompt_tokens_computed.extend(len(chunk.token_ids) for chunk in chunks)
        return real_step(tokens, positions, chunks)

    monkeypatch.setattr(runner, "step", counting_step)
    sampling = SamplingParams(max_tokens=12, temperature=1.0, seed=42, n=3, logprobs=True)
    req = request(engine, sampling)
    before = engine.stats().prompt_tokens_total
    events = await events_of(engine, req)
    assert sum(prompt_tokens_computed) == len(req.prompt_token_ids)  # one prefill for three choices
    assert engine.stats().prompt_tokens_total - before == len(req.prompt_token_ids)
    finals = [e for e in events if e.finished]
    assert sorted(e.index for e in finals) == [0, 1, 2]
    texts = {i: "".join(e.text for e in events if e.index == i) for i in range(3)}
    assert len(set(texts.values())) == 3
    # Choice i is what a single request seeded with seed + i generates.
    for index in range(3):
        alone = SamplingParams(max_tokens=12, temperature=1.0, seed=42 + index, logprobs=True)
        single = await events_of(engine, request(engine, alone))
        assert "".join(e.text for e in single) == texts[index]
        assert token_ids(single) == [e.logprobs.token_id for e in events if e.index == index and e.logprobs]
    # Reproducible.
    again = await events_of(engine, request(engine, sampling))
    assert {i: "".join(e.text for e in again if e.index == i) for i in range(3)} == texts


async def test_n_choices_beside_other_streams_and_a_cut_prompt(tiny_model_dir):
    """n choices fork while other prompts are prefilled in the same pass
    (one cut short, whose KV must move with the fork)."""
    engine = make_engine(tiny_model_dir, prefill_chunk_size=40)
    try:
        sampling = SamplingParams(max_tokens=10, temperature=1.0, seed=3, n=4)
        alone = await events_of(engine, request(engine, sampling, "Hi"))
        others = [request(engine, SamplingParams(max_tokens=10), text) for text in ("Hello, world!", "fox " * 30)]
        together = await asyncio.gather(
            events_of(engine, request(engine, sampling, "Hi")), *(events_of(engine, r) for r in others)
        )
        reference = [await events_of(engine, r) for r in others]

        def texts(events):
            return sorted(
                (e.index, "".join(x.text for x in events if x.index == e.index)) for e in events if e.finished
            )

        assert texts(together[0]) == texts(alone)
        assert [texts(t) for t in together[1:]] == [texts(t) for t in reference]
        assert engine.stats().running == 0
    finally:
        await engine.shutdown()


async def test_n_needs_that_many_slots(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_batch_size=2, max_waiting=1)
    try:
        with pytest.raises(EngineOverloaded):
            await anext(engine.generate(request(engine, SamplingParams(max_tokens=4, n=4))))
        # Three slots of admission capacity: n=2 waits for both slots, then runs.
        events = await events_of(engine, request(engine, SamplingParams(max_tokens=4, n=2)))
        assert sorted(e.index for e in events if e.finished) == [0, 1]
        assert engine.stats().running == 0
    finally:
        await engine.shutdown()


async def test_aborting_n_choices_ends_them_all(engine):
    req = request(engine, SamplingParams(max_tokens=400, n=3, temperature=1.0))
    events = engine.generate(req)
    await anext(events)
    await events.aclose()
    for _ in range(200):
        if engine.stats().running == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats().running == 0


# --------------------------------------------------- batch invariance


SEEDED_ALL = SamplingParams(
    max_tokens=20,
    temperature=0.9,
    seed=99,
    logprobs=True,
    top_logprobs=4,
    frequency_penalty=0.5,
    presence_penalty=0.3,
    logit_bias=((10, 2.0), (11, -3.0)),
)
OTHERS = [
    ("The quick brown fox " * 10, SamplingParams(max_tokens=40, logprobs=True, top_logprobs=20)),
    ("Hello, world!", SamplingParams(max_tokens=40, temperature=0.7, seed=5, frequency_penalty=1.0)),
    ("def add(a, b):", SamplingParams(max_tokens=30, logit_bias=((12, 5.0),))),
    ("法国的首都是哪里？", SamplingParams(max_tokens=30, temperature=0.9, n=2)),
]


@pytest.mark.parametrize("sampling", [SEEDED_ALL, SamplingParams(max_tokens=20, logprobs=True, top_logprobs=20)])
async def test_tokens_and_logprobs_do_not_depend_on_the_batch(engine, sampling):
    results = await arrangements(engine, (PROMPT, sampling), OTHERS, copies=3)
    assert "logprobs" in results["alone"][0]
    assert_all_equal(results)


# ------------------------------------------------------------- grammar


async def test_grammar_wins_over_logit_bias_and_logprobs_follow_the_mask(engine):
    schema = json.dumps(
        {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"], "additionalProperties": False}
    )
    grammar = engine.compile_grammar(OutputConstraint(ConstraintKind.JSON_SCHEMA, schema))
    letter = engine.loaded.tokenizer.convert_tokens_to_ids("x")
    sampling = SamplingParams(
        max_tokens=40, temperature=1.0, seed=1, logprobs=True, top_logprobs=20, logit_bias=((letter, 100.0),)
    )
    events = await events_of(engine, request(engine, sampling, grammar=grammar))
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason is FinishReason.STOP
    assert isinstance(json.loads(text)["a"], bool)
    # The first token must open the object: every alternative the grammar forbids is at the floor.
    first = next(e.logprobs for e in events if e.logprobs is not None)
    allowed = [token for token, value in first.top if value > LOGPROB_FLOOR]
    assert allowed and all(engine.loaded.tokenizer.decode([t]).startswith("{") for t in allowed)
