from __future__ import annotations

import torch

from service.engine.sampling import apply_repetition_penalty, make_generator, select_tokens
from service.engine.types import SamplingParams


def _draws(logits, params, seed, n=20):
    gen = make_generator(seed)
    return [select_tokens(logits.clone(), [params], [gen], [None])[0] for _ in range(n)]


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    params = [SamplingParams(max_tokens=1, temperature=0.0)] * 2
    assert select_tokens(logits, params, [make_generator(0)] * 2, [None, None]) == [1, 0]


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.zeros(1, 1000)
    params = SamplingParams(max_tokens=1, temperature=1.0)
    assert _draws(logits[0:1], params, 7) == _draws(logits[0:1], params, 7)
    assert _draws(logits[0:1], params, 7) != _draws(logits[0:1], params, 8)


def test_top_k_limits_the_candidates():
    logits = torch.arange(100, dtype=torch.float32).unsqueeze(0)
    params = SamplingParams(max_tokens=1, temperature=2.0, top_k=3)
    assert set(_draws(logits, params, 1, n=200)) <= {97, 98, 99}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7)
    assert set(_draws(probs.log(), params, 3, n=300)) == {0, 1}


def test_top_p_always_keeps_the_most_likely_token():
    probs = torch.tensor([[0.9, 0.05, 0.05]])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.01)
    assert set(_draws(probs.log(), params, 3, n=50)) == {0}


def test_repetition_penalty_discourages_seen_tokens_both_signs():
    logits = torch.tensor([2.0, -2.0, 1.0])
    seen = torch.tensor([True, True, False])
    apply_repetition_penalty(logits, seen, 2.0)
    assert logits.tolist() == [1.0, -4.0, 1.0]


def test_penalty_applies_to_greedy_rows_too():
    logits = torch.tensor([[3.0, 2.5]])
    seen = torch.tensor([True, False])
    params = [SamplingParams(max_tokens=1, temperature=0.0, repetition_penalty=1.5)]
    assert select_tokens(logits, params, [make_generator(0)], [seen]) == [1]
