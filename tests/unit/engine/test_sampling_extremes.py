"""Regression tests for the sampler at the edges of the accepted parameter
ranges (found by tests/test_fuzz.py: repetition_penalty=1.4e-45 came back as
INTERNAL "internal error while sampling", because boosted logits overflowed
to +inf and the softmax turned them into NaN)."""

from __future__ import annotations

import pytest
import torch

from service.engine.sampling import make_generator, select_tokens
from service.engine.types import SamplingParams

TINIEST = 1.401298464324817e-45  # the smallest positive float32


def _logits(seed: int = 0, vocab: int = 500) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, vocab, generator=generator) * 8


@pytest.mark.parametrize("temperature", [TINIEST, 1e-38, 1e-30, 1e-7])
def test_tiny_temperature_is_the_greedy_limit(temperature):
    for seed in range(5):
        logits = _logits(seed)
        expected = int(logits.argmax())
        params = SamplingParams(max_tokens=1, temperature=temperature, top_p=0.8, top_k=20)
        (token,) = select_tokens(logits.clone(), [params], [make_generator(seed)], [None])
        assert token == expected


@pytest.mark.parametrize("penalty", [TINIEST, 1e-38, 1e-20])
@pytest.mark.parametrize("temperature", [0.0, 0.7, TINIEST])
def test_tiny_repetition_penalty_picks_a_seen_token(penalty, temperature):
    """A penalty near 0 boosts the seen tokens with positive logits without
    bound: one of them must be chosen, and never a NaN failure."""
    for seed in range(5):
        logits = _logits(seed)
        seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
        seen[[3, 17, 42, 99]] = True
        logits[0, [3, 17, 42, 99]] = torch.tensor([0.5, 2.0, -1.0, -3.0])  # two seen tokens with positive logits
        params = SamplingParams(max_tokens=1, temperature=temperature, top_p=0.9, top_k=0, repetition_penalty=penalty)
        (token,) = select_tokens(logits.clone(), [params], [make_generator(seed)], [seen])
        assert token in (3, 17)


def test_batch_with_extreme_rows_matches_rows_alone():
    """Extreme rows in a batch neither fail nor disturb the other rows."""
    logits = torch.cat([_logits(1), _logits(2), _logits(3)])
    params = [
        SamplingParams(max_tokens=1, temperature=TINIEST, top_k=20, top_p=0.8),
        SamplingParams(max_tokens=1, temperature=0.7, top_k=20, top_p=0.8, seed=7),
        SamplingParams(max_tokens=1, temperature=2.0, top_p=TINIEST, repetition_penalty=TINIEST),
    ]
    seen = [None, None, torch.zeros(logits.shape[-1], dtype=torch.bool)]
    batch = select_tokens(logits.clone(), params, [make_generator(p.seed) for p in params], seen)
    alone = [
        select_tokens(logits[i : i + 1].clone(), [params[i]], [make_generator(params[i].seed)], [seen[i]])[0]
        for i in range(3)
    ]
    assert batch == alone
    assert batch[0] == int(logits[0].argmax())
    assert batch[2] == int(logits[2].argmax())  # top_p ~ 0 keeps only the best token


def test_a_failing_row_leaves_the_other_rows_exactly_as_without_it(monkeypatch):
    """One request's sampling failure must not change its batch neighbours:
    their penalty is applied once and their generators drawn from once
    (previously the scheduler re-ran every row after a batch failure)."""
    from service.engine import sampling

    real_sample_one = sampling.sample_one

    def sample_one(logits, params, generator):
        if params.seed == 13:
            raise RuntimeError("injected sampler fault")
        return real_sample_one(logits, params, generator)

    monkeypatch.setattr(sampling, "sample_one", sample_one)
    vocab = 500
    params = [
        SamplingParams(max_tokens=1, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.3, seed=1),
        SamplingParams(max_tokens=1, temperature=0.9, seed=13),
        SamplingParams(max_tokens=1, temperature=0.0, repetition_penalty=1.5),
        SamplingParams(max_tokens=1, temperature=1.2, repetition_penalty=0.7, seed=2),
    ]
    seen = [torch.rand(vocab, generator=torch.Generator().manual_seed(i)) < 0.3 for i in range(4)]
    keep = [0, 2, 3]
    with_fault = [make_generator(p.seed) for p in params]
    without = [make_generator(params[i].seed) for i in keep]
    for step in range(4):
        logits = torch.cat([_logits(10 * step + i, vocab) for i in range(4)])
        chosen = select_tokens(logits.clone(), params, with_fault, seen)
        assert isinstance(chosen[1], RuntimeError)
        reference = select_tokens(logits[keep].clone(), [params[i] for i in keep], without, [seen[i] for i in keep])
        assert [chosen[i] for i in keep] == reference
