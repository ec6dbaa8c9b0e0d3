"""The scheduling policy and the slot table, on their own: no model thread,
no sleeps."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from service.engine.config import EngineConfig
from service.engine.loader import load_model
from service.engine.model_runner import ModelRunner
from service.engine.policy import prompt_chunk_lengths, reusable_blocks, storable_blocks
from service.engine.slots import SlotTable


@pytest.mark.parametrize(
    "decoding, remaining, expected",
    [
        (0, [5, 7, 3], [5, 7, 3]),  # a burst fits one pass
        (0, [10, 20], [10, 6]),  # only the last is cut
        (0, [16, 4], [16]),  # the budget is spent exactly
        (2, [10, 20], [4]),  # next to decoders, the interleaved budget
        (0, [], []),
        (0, [40], [16]),  # a long prompt spreads over passes
    ],
)
def test_prompt_chunks_are_fifo_within_the_budget(decoding, remaining, expected):
    assert prompt_chunk_lengths(decoding, remaining, prefill_chunk_size=16, interleaved_prefill_tokens=4) == expected


def test_reuse_leaves_a_prompt_token_to_compute_and_stores_whole_blocks():
    assert [reusable_blocks(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 0, 0, 1, 1, 2]
    assert [storable_blocks(n, 16) for n in (0, 15, 16, 47, 48)] == [0, 0, 1, 2, 3]


@dataclasses.dataclass(eq=False)
class Request:
    name: str
    cached: int = 0


@pytest.fixture
def runner(tiny_model_dir) -> ModelRunner:
    return ModelRunner(
        load_model(str(tiny_model_dir), dtype="float32"),
        EngineConfig.defaults(max_batch_size=4, max_model_len=32, quantization="none"),
    )


def fill(runner: ModelRunner, slot: int, length: int, value: float) -> None:
    runner.slot_positions(slot, 0, length).fill_(value)


def test_slots_stay_compact_when_requests_leave(runner):
    table: SlotTable[Request] = SlotTable(runner)
    a, b, c, head, queued = (Request(n) for n in "abcpq")
    for seq in (a, b, c, head, queued):
        table.admit(seq)
    for seq, length, value in ((a, 3, 1.0), (b, 4, 2.0), (c, 5, 3.0)):
        seq.cached = length
        fill(runner, table.slot_of(seq), length, value)
        assert table.prompt_done() is seq
    head.cached = 2  # part-way through its prompt, in slot 3
    fill(runner, 3, 2, 4.0)
    assert [table.slot_of(s) for s in (a, b, c, head, queued)] == [0, 1, 2, 3, 4]

    table.remove(a)  # the last decoder moves into slot 0, the prefill head follows the decoders down
    assert table.decoding == [c, b] and list(table.prefilling) == [head, queued]
    assert torch.all(runner.slot_positions(0, 0, 5) == 3.0)
    assert torch.all(runner.slot_positions(2, 0, 2) == 4.0)
    assert torch.all(runner.slot_positions(3, 0, 32) == 0.0), "the freed slot's pages were released"

    table.remove(queued)  # never written: nothing moves
    table.remove(head)
    assert table.decoding == [c, b] and not table.prefilling
    assert torch.all(runner.slot_positions(2, 0, 32) == 0.0)
    assert len(table) == 2
