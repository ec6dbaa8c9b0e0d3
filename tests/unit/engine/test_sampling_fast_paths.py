"""The cheaper implementations in sampling.py (numpy argmax, the repetition
penalty by ids) against the torch formulations they replaced: bitwise equal,
edge values included."""

from __future__ import annotations

import pytest
import torch

from service.engine.sampling import apply_repetition_penalty, argmax, make_generator, select_tokens
from service.engine.types import SamplingParams

VOCAB = 151_936  # Qwen2.5's: the width the engine really reduces over
INF, NAN = float("inf"), float("nan")


def _edge_rows() -> torch.Tensor:
    """Rows whose argmax depends on the tie and NaN rules."""
    rows = torch.randn(8, VOCAB)
    rows[0, [5, 70_000, 151_000]] = 50.0  # tie: the first wins
    rows[1, [9, 100_000]] = NAN  # a NaN counts as the largest, the first one
    rows[2] = -INF  # all -inf (a grammar forbidding everything): index 0
    rows[3, [3, 4]] = INF
    rows[4, 7] = INF
    rows[4, 8] = NAN
    rows[5] = 0.0
    rows[5, 11] = -0.0
    rows[6, -1] = 1e30  # the last column
    return rows


def test_argmax_matches_torch_on_every_row_shape():
    logits = torch.cat([_edge_rows(), torch.randn(8, VOCAB)])
    expected = torch.argmax(logits, -1).tolist()
    assert argmax(logits).tolist() == expected
    assert [int(argmax(row)) for row in logits] == expected
    rows = torch.tensor([3, 0, 12])
    assert argmax(logits[rows]).tolist() == [expected[3], expected[0], expected[12]]
    strided = logits[:, ::3]  # not contiguous
    assert argmax(strided).tolist() == torch.argmax(strided, -1).tolist()


def test_greedy_selection_takes_torchs_argmax_batched_and_mixed():
    logits = _edge_rows()
    expected = torch.argmax(logits, -1).tolist()
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    generators = [make_generator(0) for _ in logits]
    assert select_tokens(logits.clone(), [greedy] * len(logits), generators, [None] * len(logits)) == expected
    # One sampled row sends the greedy rows through the per-row path.
    sampled = SamplingParams(max_tokens=1, temperature=1.0)
    params = [greedy] * (len(logits) - 1) + [sampled]
    chosen = select_tokens(logits.clone(), params, generators, [None] * len(logits))
    assert chosen[:-1] == expected[:-1]


def _penalty_by_mask(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """The boolean-mask formulation apply_repetition_penalty replaced."""
    scores = logits[seen]
    boosted = (scores / penalty).clamp(max=torch.finfo(logits.dtype).max)
    logits[seen] = torch.where(scores > 0, boosted, scores * penalty)


@pytest.mark.parametrize("penalty", [1.05, 0.9, 2.0, 1e-38, 100.0])
def test_repetition_penalty_by_ids_is_bitwise_the_mask_formulation(penalty):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, VOCAB, generator=generator) * 20
    logits[0, :40] = torch.tensor([0.0, -0.0, INF, -INF, 1e38, -1e38] * 6 + [3.0, -3.0, 0.5, -0.5])
    seen = torch.rand(3, VOCAB, generator=generator) < 0.01
    seen[0, :40] = True
    seen[2] = False  # nothing seen: nothing changes
    original, expected = logits.clone(), logits.clone()
    for row in range(3):
        _penalty_by_mask(expected[row], seen[row], penalty)
        apply_repetition_penalty(logits[row], seen[row], penalty)  # a row view: in place in the batch
    assert torch.equal(logits, expected)
    assert not torch.equal(logits[0], original[0]) and torch.equal(logits[2], original[2])
