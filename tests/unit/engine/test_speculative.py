"""Speculative decoding (prompt-lookup drafts): the output is exactly what the
engine gives without it, greedy or seeded-sampled, whatever ends the request
inside an accepted run; the drafts themselves; the acceptance rule's
statistics."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import time

import pytest
import torch
from tiny_model import tiny_engine_config

from service.engine import scheduler as scheduler_module
from service.engine import speculative
from service.engine.engine import Engine
from service.engine.loader import load_model
from service.engine.sampling import make_generator, sample_one
from service.engine.scheduler import Scheduler
from service.engine.speculative import (
    DRAFT_MAX_NGRAM,
    DRAFT_MIN_NGRAM,
    FIRST_DRAFT_LENGTH,
    MAX_DRAFT_PAUSE,
    DraftPacing,
    PromptLookup,
    propose_draft,
)
from service.engine.types import FinishReason, GenerationRequest, SamplingParams

# Repetitive prompts, so that prompt lookup finds matches.
PROMPTS = [
    "def add(a, b):\n    return a + b\n" * 6,
    "The quick brown fox " * 12,
    "Hello, world!",
    "法国的首都是哪里？",
]
GREEDY = SamplingParams(max_tokens=40, temperature=0.0)
# Low temperature, so that sampled tokens agree with drafts now and then (the tiny model is nearly uniform).
SAMPLED = SamplingParams(max_tokens=40, temperature=0.05, top_p=0.95, top_k=40, seed=7)


def test_draft_is_what_followed_the_longest_recent_match():
    assert propose_draft([1, 2, 3, 9, 9, 1, 2, 3], 3) == [9, 9, 1]
    # The 3-gram (5, 1, 2) occurs nowhere earlier, (1, 2) twice: the most recent one wins.
    assert propose_draft([1, 2, 7, 1, 2, 8, 5, 1, 2], 2) == [8, 5]
    # Limited by the text after the match, then by `limit`.
    assert propose_draft([4, 5, 6, 4, 5], 5) == [6, 4, 5]
    assert propose_draft([4, 5, 6, 4, 5], 1) == [6]
    assert propose_draft([4, 5, 6, 4], 5) == []  # a one-token match is not enough
    assert propose_draft([1, 2, 3, 4], 4) == []
    assert propose_draft([7], 4) == []
    assert propose_draft([1, 2, 1, 2], 0) == []
    # A run of one token: the most recent match is followed by one token only, so the earliest is taken.
    assert propose_draft([3, 3, 3, 3, 3], 2) == [3, 3]


def _scanned_draft(tokens: list[int], limit: int) -> list[int]:
    """The rule of propose_draft, by scanning every earlier window."""
    for n in range(min(DRAFT_MAX_NGRAM, len(tokens) - 1), DRAFT_MIN_NGRAM - 1, -1):
        found = [i for i in range(len(tokens) - n) if tokens[i : i + n] == tokens[len(tokens) - n :]]
        if found:
            full = [i for i in found if i + n + limit <= len(tokens)]
            follow = (full[-1] if full else found[0]) + n
            return tokens[follow : follow + limit]
    return []


def test_a_growing_lookup_drafts_what_a_scan_of_the_whole_text_would():
    """The scheduler extends one PromptLookup per request by the tokens of each step."""
    rng = random.Random(0)
    for _ in range(50):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 60))]  # 4 symbols: many repeats
        lookup, done = PromptLookup(), 0
        while done < len(tokens):
            step = rng.randrange(1, 5)  # a prompt, then accepted runs of drafts
            lookup.extend(tokens[done : done + step])
            done = min(done + step, len(tokens))
            for limit in (0, 1, 4):
                assert lookup.draft(limit) == _scanned_draft(tokens[:done], limit), (tokens[:done], limit)


def test_rejected_drafts_pause_drafting_longer_each_time_and_an_accepted_one_ends_it():
    pacing = DraftPacing()

    def drafting_steps(steps: int) -> list[bool]:
        return [pacing.may_draft() for _ in range(steps)]

    assert drafting_steps(3) == [True] * 3  # nothing rejected yet
    pauses = []
    for _ in range(7):  # a draft rejected at every chance
        pacing.drafted(2, 0)
        steps = drafting_steps(MAX_DRAFT_PAUSE + 1)
        pauses.append(steps.index(True))
        assert all(steps[pauses[-1] :])
    assert pauses == [1, 2, 4, 8, 16, 16, 16]
    pacing.drafted(1, 1)  # a draft at the step after the pause is accepted: no pause
    assert drafting_steps(3) == [True] * 3
    pacing.drafted(3, 0)  # and the next rejection pauses 1 step again
    assert drafting_steps(2) == [False, True]


def test_a_draft_kept_whole_lengthens_the_next_and_one_cut_short_shortens_it():
    pacing = DraftPacing()
    assert pacing.length(16) == FIRST_DRAFT_LENGTH == 2
    pacing.drafted(2, 2)
    assert (pacing.length(16), pacing.length(3)) == (4, 3)  # capped by the step's limit
    pacing.drafted(4, 4)
    assert pacing.length(16) == 6
    pacing.drafted(6, 1)
    assert pacing.length(16) == 5
    for expected in (4, 3, 2, 1, 1):  # wholly rejected: shorter too, never below 1
        pacing.drafted(pacing.length(16), 0)
        assert pacing.length(16) == expected
    pacing.drafted(1, 1)  # a draft kept whole: 2 more than it had
    assert pacing.length(16) == 3
    pacing.drafted(1, 1)  # also when the lookup found fewer tokens than allowed
    assert pacing.length(16) == 3


def test_acceptance_rule_keeps_the_distribution():
    """Accepting a fixed draft x iff it equals the token drawn as without
    speculation: accepted with probability p(x); on rejection, distributed
    as p without x, renormalised."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    params = SamplingParams(max_tokens=1, temperature=0.9, top_k=4)
    scaled = (logits / params.temperature).topk(4)
    p = torch.zeros(5).index_put_((scaled.indices,), scaled.values.softmax(-1))
    generator = make_generator(3)
    draft, draws = 1, 40_000
    tokens = [sample_one(logits.clone(), params, generator) for _ in range(draws)]
    counts = collections.Counter(tokens)
    accepted = counts[draft] / draws
    # Binomial standard deviation here is ~0.0024: 5 sigma.
    assert abs(accepted - float(p[draft])) < 0.012
    rejected = draws - counts[draft]
    rest = p.clone()
    rest[draft] = 0
    rest /= rest.sum()
    for token in range(5):
        if token != draft:
            assert abs(counts[token] / rejected - float(rest[token])) < 0.012
    assert counts[4] == 0  # outside top_k: never drawn


class OracleDrafts:
    """Drafts from a recorded run without speculation (the tiny random model
    rarely repeats itself, so prompt lookup seldom drafts what it will say):
    the request's true continuation with every third token wrong, so a pass
    accepts a run of tokens and then rejects one."""

    def __init__(self) -> None:
        self.futures: list[tuple[int, ...]] = []

    def record(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_release = Scheduler._release

        def release(scheduler, seq, *args, **kwargs):
            self.futures.append(seq.token_ids())
            real_release(scheduler, seq, *args, **kwargs)

        monkeypatch.setattr(Scheduler, "_release", release)

    def draft(self, token_ids, limit: int) -> list[int]:
        now = tuple(token_ids)
        for future in self.futures:
            if future[: len(now)] == now:
                draft = list(future[len(now) : len(now) + limit])
                return [token + 1 if (len(now) + i) % 3 == 2 else token for i, token in enumerate(draft)]
        return []


class _OracleLookup(PromptLookup):
    """A request's PromptLookup that drafts from the oracle instead."""

    def __init__(self, drafts: OracleDrafts) -> None:
        super().__init__()
        self._drafts = drafts

    def draft(self, limit: int) -> list[int]:
        return self._drafts.draft(self._tokens, limit)


@pytest.fixture
def oracle(monkeypatch):
    """Record the runs of engines made from now on, and draft from them."""
    drafts = OracleDrafts()
    drafts.record(monkeypatch)
    monkeypatch.setattr(scheduler_module, "PromptLookup", lambda: _OracleLookup(drafts))
    return drafts


def make_engine(tiny_model_dir, speculative_tokens: int, **overrides) -> Engine:
    options: dict = dict(
        prefill_chunk_size=64,
        interleaved_prefill_tokens=16,
        quantization="int8",  # batch- and chunk-invariant: a verified draft's logits are a decode step's
        speculative_tokens=speculative_tokens,
        speculative_max_batch=4,
    )
    engine = Engine(load_model(str(tiny_model_dir), dtype="float32"), tiny_engine_config(**(options | overrides)))
    engine.start()
    return engine


def request(engine: Engine, text: str, sampling: SamplingParams, rid: str | None = None) -> GenerationRequest:
    ids = tuple(engine.encode_chat([{"role": "user", "content": text}]))
    return GenerationRequest(rid or f"r-{time.monotonic_ns()}", ids, sampling)


async def collect(engine: Engine, req: GenerationRequest):
    events = [event async for event in engine.generate(req)]
    return "".join(e.text for e in events), events[-1]


async def outputs(engine: Engine, cases: list[tuple[str, SamplingParams]], together: bool) -> list[tuple]:
    def summary(result):
        text, final = result
        return text, final.finish_reason, final.usage.completion_tokens

    if together:
        results = await asyncio.gather(*(collect(engine, request(engine, p, s)) for p, s in cases))
    else:
        results = [await collect(engine, request(engine, p, s)) for p, s in cases]
    return [summary(result) for result in results]


async def compare(tiny_model_dir, cases, together: bool, **overrides):
    """(without speculation, with speculation, the speculative engine's stats)."""
    plain = make_engine(tiny_model_dir, 0, **overrides)
    try:
        expected = await outputs(plain, cases, together)
    finally:
        await plain.shutdown()
    engine = make_engine(tiny_model_dir, 4, **overrides)
    try:
        got = await outputs(engine, cases, together)
        stats = engine.stats()
    finally:
        await engine.shutdown()
    return expected, got, stats


@pytest.mark.parametrize("together", [False, True], ids=["alone", "batched"])
async def test_greedy_and_seeded_output_is_unchanged_with_prompt_lookup(tiny_model_dir, monkeypatch, together):
    # The tiny random model seldom repeats two tokens in a row: draft from one-token matches.
    monkeypatch.setattr(speculative, "DRAFT_MIN_NGRAM", 1)
    cases = [(p, GREEDY) for p in PROMPTS] + [(p, SAMPLED) for p in PROMPTS[:2]]
    expected, got, stats = await compare(tiny_model_dir, cases, together)
    assert got == expected
    assert stats.accepted_draft_tokens_total > 0
    assert stats.draft_tokens_total > stats.accepted_draft_tokens_total
    assert stats.running == 0 and stats.kv_cache_used_tokens == 0


@pytest.mark.parametrize("together", [False, True], ids=["alone", "batched"])
async def test_runs_of_accepted_drafts_give_the_same_output(tiny_model_dir, oracle, together):
    cases = [(p, GREEDY) for p in PROMPTS] + [(p, SAMPLED) for p in PROMPTS[:2]]
    expected, got, stats = await compare(tiny_model_dir, cases, together)
    assert got == expected
    # Every third draft token is wrong: about half of them are accepted.
    assert stats.draft_tokens_total > 0
    assert 0.3 < stats.accepted_draft_tokens_total / stats.draft_tokens_total < 0.8
    assert stats.running == 0 and stats.kv_cache_used_tokens == 0


async def test_seeded_sampling_repeats_with_speculation(tiny_model_dir, oracle):
    engine = make_engine(tiny_model_dir, 4)
    try:
        first = await outputs(engine, [(PROMPTS[0], SAMPLED)], False)  # nothing to draft from yet
        assert engine.stats().draft_tokens_total == 0
        second = await outputs(engine, [(PROMPTS[0], SAMPLED)] * 3, True)
        assert second == first * 3
        assert engine.stats().accepted_draft_tokens_total > 0
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 8, 13])
async def test_max_tokens_is_never_exceeded(tiny_model_dir, oracle, max_tokens):
    cases = [(PROMPTS[0], SamplingParams(max_tokens=max_tokens, temperature=0.0))]
    oracle.futures = []
    await compare(tiny_model_dir, [(PROMPTS[0], GREEDY)], False)  # a longer future to draft from
    expected, got, _ = await compare(tiny_model_dir, cases, False)
    assert got == expected
    assert got[0][1:] == (FinishReason.LENGTH, max_tokens)


async def test_context_window_end_inside_a_run(tiny_model_dir, oracle):
    cases = [(PROMPTS[1], SamplingParams(max_tokens=400, temperature=0.0))]
    expected, got, stats = await compare(tiny_model_dir, cases, False, max_model_len=160)
    assert got == expected
    assert got[0][1] is FinishReason.LENGTH
    assert stats.accepted_draft_tokens_total > 0


async def test_stop_string_inside_an_accepted_run(tiny_model_dir, oracle, monkeypatch):
    """The stop string ends at a token that came from a draft, not first in
    its pass: the text stops there, as without speculation."""
    expected, _, _ = await compare(tiny_model_dir, [(PROMPTS[0], GREEDY)], False)
    runs: list[tuple[int, int]] = []  # output positions [start, end) emitted by one verified pass
    real_run = Scheduler._accept_run

    def recording_run(self, seq, *args):
        start = len(seq.output_ids)
        real_run(self, seq, *args)
        runs.append((start, len(seq.output_ids)))

    monkeypatch.setattr(Scheduler, "_accept_run", recording_run)
    engine = make_engine(tiny_model_dir, 4)
    try:
        await collect(engine, request(engine, PROMPTS[0], GREEDY))
        output = oracle.futures[-1][len(engine.encode_chat([{"role": "user", "content": PROMPTS[0]}])) :]
        tokenizer = engine.loaded.tokenizer
        stop = None
        for start, end in runs:
            for index in range(start + 1, end):
                candidate = tokenizer.decode(output[index - 1 : index + 1])
                if candidate.strip() and candidate not in tokenizer.decode(output[: index + 1])[: -len(candidate)]:
                    if "\ufffd" not in candidate:
                        stop, stop_index = candidate, index
                        break
            if stop:
                break
        assert stop is not None, f"no multi-token run to stop in: {runs}"
        sampling = SamplingParams(max_tokens=40, temperature=0.0, stop=(stop,))
        text, final = await collect(engine, request(engine, PROMPTS[0], sampling))
    finally:
        await engine.shutdown()
    expected, _, _ = await compare(tiny_model_dir, [(PROMPTS[0], sampling)], False)
    assert (text, final.finish_reason, final.usage.completion_tokens) == expected[0]
    assert final.finish_reason is FinishReason.STOP
    assert final.usage.completion_tokens == stop_index + 1


async def test_cancel_mid_run_frees_the_slot(tiny_model_dir, oracle):
    long = SamplingParams(max_tokens=200, temperature=0.0)
    await compare(tiny_model_dir, [(PROMPTS[0], long)], False)  # a future to draft from
    engine = make_engine(tiny_model_dir, 4)
    try:
        req = request(engine, PROMPTS[0], long, rid="cancel-me")
        events = []
        async for event in engine.generate(req):
            events.append(event)
            if len(events) == 5:
                engine.abort("cancel-me")
        assert events[-1].finish_reason is FinishReason.CANCELLED
        assert events[-1].usage.completion_tokens < 200
        stats = engine.stats()
        assert stats.running == 0 and stats.kv_cache_used_tokens == 0 and stats.accepted_draft_tokens_total > 0
        again = await outputs(engine, [(PROMPTS[0], GREEDY)], False)
    finally:
        await engine.shutdown()
    expected, _, _ = await compare(tiny_model_dir, [(PROMPTS[0], GREEDY)], False)
    assert again == expected


async def test_prefix_cache_holds_no_rejected_drafts(tiny_model_dir, oracle):
    """A second turn over the first turn's prompt + answer reuses the blocks
    stored with speculation on and answers exactly as an engine computing
    everything."""
    long = SamplingParams(max_tokens=80, temperature=0.0)
    ((answer, _, _),), _, stats = await compare(tiny_model_dir, [(PROMPTS[0], long)], False, prefix_cache_bytes=8 << 20)
    follow = [
        {"role": "user", "content": PROMPTS[0]},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "again"},
    ]
    engine = make_engine(tiny_model_dir, 4, prefix_cache_bytes=8 << 20)
    try:
        await outputs(engine, [(PROMPTS[0], long)], False)
        assert engine.stats().accepted_draft_tokens_total > 0
        ids = tuple(engine.encode_chat(follow))
        text, final = await collect(engine, GenerationRequest("turn-2", ids, GREEDY))
        assert final.usage.cached_prompt_tokens > 0
    finally:
        await engine.shutdown()
    plain = make_engine(tiny_model_dir, 0)
    try:
        expected_text, expected_final = await collect(plain, GenerationRequest("turn-2", ids, GREEDY))
    finally:
        await plain.shutdown()
    assert text == expected_text
    assert final.usage.completion_tokens == expected_final.usage.completion_tokens


# Selection that depends on the tokens so far (penalties) or on logit_bias.
PENALIZED = [
    SamplingParams(max_tokens=40, temperature=0.0, repetition_penalty=1.1),
    SamplingParams(max_tokens=40, temperature=0.0, frequency_penalty=0.5),
    SamplingParams(max_tokens=40, temperature=0.0, presence_penalty=0.5),
    SamplingParams(max_tokens=40, temperature=0.0, logit_bias=((5, 1.0),)),
    dataclasses.replace(SAMPLED, repetition_penalty=1.05, frequency_penalty=0.2),
]


@pytest.mark.parametrize("sampling", PENALIZED, ids=["repetition", "frequency", "presence", "logit_bias", "sampled"])
async def test_penalties_and_logit_bias_speculate_with_the_same_output(tiny_model_dir, oracle, sampling):
    """Each draft row is selected over the tokens accepted before it, as a
    decode step would: penalties (the server's default repetition_penalty is
    1.05) do not turn speculation off, and change nothing in the output."""
    cases = [(prompt, sampling) for prompt in PROMPTS[:2]]
    expected, got, stats = await compare(tiny_model_dir, cases, False)
    assert got == expected
    assert stats.accepted_draft_tokens_total > 0


async def test_no_drafts_above_the_batch_limit_or_with_logprobs(tiny_model_dir, oracle):
    with_logprobs = SamplingParams(max_tokens=40, temperature=0.0, logprobs=True)
    await compare(tiny_model_dir, [(PROMPTS[2], GREEDY), (PROMPTS[0], with_logprobs)], False)  # futures
    engine = make_engine(tiny_model_dir, 4, speculative_max_batch=1)
    try:
        await outputs(engine, [(PROMPTS[0], with_logprobs)], False)
        assert engine.stats().draft_tokens_total == 0
        await outputs(engine, [(PROMPTS[0], GREEDY)], False)  # the same prompt without logprobs drafts
        assert engine.stats().draft_tokens_total > 0
        drafted = engine.stats().draft_tokens_total
        # Two streams of the same length decode together from start to end.
        await outputs(engine, [(PROMPTS[2], GREEDY), (PROMPTS[2], GREEDY)], True)
        assert engine.stats().draft_tokens_total == drafted
    finally:
        await engine.shutdown()


async def test_n_choices_speculate_each_and_match_without(tiny_model_dir, oracle):
    """The forked choices of a request for n draft on their own (their own
    slot and generator): each choice's text is the one without speculation."""

    async def choices(engine: Engine, sampling: SamplingParams) -> dict[int, tuple]:
        events = [event async for event in engine.generate(request(engine, PROMPTS[0], sampling))]
        return {
            index: (
                "".join(e.text for e in events if e.index == index),
                *[(e.finish_reason, e.usage.completion_tokens) for e in events if e.index == index and e.usage][0],
            )
            for index in range(sampling.n)
        }

    greedy = SamplingParams(max_tokens=40, temperature=0.0, n=2)
    sampled = SamplingParams(max_tokens=40, temperature=0.05, top_p=0.95, top_k=40, seed=7, n=3)
    results = []
    for tokens in (0, 4):
        engine = make_engine(tiny_model_dir, tokens)
        try:
            results.append((await choices(engine, greedy), await choices(engine, sampled)))
            stats = engine.stats()
        finally:
            await engine.shutdown()
    assert results[1] == results[0]
    assert results[0][0][0] == results[0][0][1]  # greedy choices agree
    assert stats.accepted_draft_tokens_total > 0
    assert stats.running == 0 and stats.kv_cache_used_tokens == 0


async def test_drafts_share_the_step_budget_with_prompt_chunks(tiny_model_dir, oracle, monkeypatch):
    # The first stream outlives the others' prompts (~60 tokens, prefilled 6 a
    # pass, while it accepts ~3 drafted tokens a pass), however many steps it
    # has run before they arrive.
    longest = SamplingParams(max_tokens=300, temperature=0.0)
    long = SamplingParams(max_tokens=60, temperature=0.0)
    cases = [(PROMPTS[2], longest), (PROMPTS[0], long), (PROMPTS[1], long)]
    await compare(tiny_model_dir, cases, False)  # futures to draft from
    steps: list[tuple[int, int]] = []  # (prompt tokens, draft tokens) of passes with decoding requests
    real_plan = Scheduler._plan_drafts

    def recording_plan(self, decoding, chunks):
        drafts = real_plan(self, decoding, chunks)
        if decoding:
            steps.append((sum(len(chunk.token_ids) for chunk in chunks), sum(map(len, drafts))))
        return drafts

    monkeypatch.setattr(Scheduler, "_plan_drafts", recording_plan)
    engine = make_engine(tiny_model_dir, 4, interleaved_prefill_tokens=6)
    try:
        # Staggered: later prompts are prefilled while the first streams decode with drafts.
        first = asyncio.ensure_future(outputs(engine, cases[:1], False))
        while not steps:
            await asyncio.sleep(0.01)
        rest = await outputs(engine, cases[1:], True)
        got = await first + rest
    finally:
        await engine.shutdown()
    expected, _, _ = await compare(tiny_model_dir, cases, False)
    assert got == expected
    assert all(prompt + draft <= 6 for prompt, draft in steps)
    assert any(prompt and draft for prompt, draft in steps)  # both in one pass
    assert any(draft == 4 for _, draft in steps)


class _WrongLookup(_OracleLookup):
    """Drafts the true continuation with every token wrong: each is rejected."""

    def draft(self, limit: int) -> list[int]:
        return [token + 1 for token in self._drafts.draft(self._tokens, limit)]


async def test_rejected_drafts_pause_drafting_and_leave_the_output_alone(tiny_model_dir, oracle, monkeypatch):
    cases = [(PROMPTS[2], SamplingParams(max_tokens=40, temperature=0.0))]
    expected, _, _ = await compare(tiny_model_dir, cases, False)  # records the futures
    monkeypatch.setattr(scheduler_module, "PromptLookup", lambda: _WrongLookup(oracle))
    engine = make_engine(tiny_model_dir, 4)
    try:
        assert await outputs(engine, cases, False) == expected
        stats = engine.stats()
    finally:
        await engine.shutdown()
    assert stats.accepted_draft_tokens_total == 0
    # 39 steps could draft; paced, drafts go at steps 1, 3, 6, 11, 20 and 37,
    # the first of FIRST_DRAFT_LENGTH tokens, each later one a token shorter
    # down to 1 (the limit, speculative_tokens, is 4).
    assert stats.draft_tokens_total == 2 + 1 + 1 + 1 + 1 + 1
