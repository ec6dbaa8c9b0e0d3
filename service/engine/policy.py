"""Scheduling policy: what runs in the next forward pass. Pure functions of
counts, no model and no threads, so every rule is unit-tested on its own
(tests/unit/engine/test_policy.py); the Scheduler applies them and the slot
table (slots.py) carries them out.
"""

from __future__ import annotations

from collections.abc import Sequence


def prompt_chunk_lengths(
    decoding: int, remaining: Sequence[int], prefill_chunk_size: int, interleaved_prefill_tokens: int
) -> list[int]:
    """Prompt tokens to run this step for each admitted prompt, FIFO, given
    how many of each prompt's tokens are still to compute.

    The budget is `prefill_chunk_size` when nothing is decoding (nobody waits
    on the pass) and `interleaved_prefill_tokens` when streams are (every
    prompt token in the pass delays their next token). Only the last prompt
    may be cut short, so at most one request is ever part-way through its
    prompt, and it is the head of the prefill queue."""
    budget = interleaved_prefill_tokens if decoding else prefill_chunk_size
    lengths = []
    for left in remaining:
        if budget <= 0:
            break
        lengths.append(min(left, budget))
        budget -= lengths[-1]
    return lengths


def reusable_blocks(prompt_len: int, block_size: int) -> int:
    """Cached blocks a prompt may take from the prefix cache: whole blocks
    only, and at least one prompt token is left to compute, since its logits
    give the first output token."""
    return max(prompt_len - 1, 0) // block_size


def storable_blocks(cached_positions: int, block_size: int) -> int:
    """Full blocks of a slot's valid KV positions worth keeping."""
    return cached_positions // block_size
