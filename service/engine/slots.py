"""Slot table: which request's KV lives in which cache slot (mechanism; the
policy is in policy.py).

Slots are kept compact: decoding requests occupy slots 0..B-1 (so a decode
step reads a view of the cache, never a gather) and admitted prompts follow
in queue order. Only the head of the prefill queue may have KV positions
written (see policy.prompt_chunk_lengths), so a prompt's slot is
B + its queue index. When a request leaves, the last decoder moves into its
slot (a copy of only its cached positions) and the prefill head follows the
decoders down.
"""

from __future__ import annotations

import collections
from typing import Generic, Protocol, TypeVar


class SlotStorage(Protocol):
    """The KV cache operations the table needs (ModelRunner provides them)."""

    def move_slot(self, source: int, target: int, length: int) -> None: ...

    def release_slot(self, slot: int) -> None: ...


class HoldsPositions(Protocol):
    cached: int  # KV positions written in the request's slot


S = TypeVar("S", bound=HoldsPositions)


class SlotTable(Generic[S]):
    def __init__(self, storage: SlotStorage) -> None:
        self._storage = storage
        self.decoding: list[S] = []  # index == slot
        self.prefilling: collections.deque[S] = collections.deque()  # admitted, prompt not done

    def __len__(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    def admit(self, seq: S) -> None:
        self.prefilling.append(seq)

    def holds(self, seq: S) -> bool:
        return seq in self.decoding or seq in self.prefilling

    def slot_of(self, seq: S) -> int:
        if seq in self.prefilling:
            return len(self.decoding) + self.prefilling.index(seq)
        return self.decoding.index(seq)

    def prompt_done(self) -> S:
        """The prefill head's prompt is complete: it joins the decoders (its
        slot, right after theirs, already is the next one)."""
        seq = self.prefilling.popleft()
        self.decoding.append(seq)
        return seq

    def fork(self, seq: S, source: int) -> None:
        """A new decoder whose first seq.cached positions are a copy of slot
        `source`'s (another choice of the same prompt). It takes the slot
        after the decoders', so the prefill head (if it holds positions)
        moves one slot up first."""
        target = len(self.decoding)
        if self.prefilling and self.prefilling[0].cached:
            self._storage.move_slot(target, target + 1, self.prefilling[0].cached)
        self._storage.move_slot(source, target, seq.cached)
        self.decoding.append(seq)

    def remove(self, seq: S) -> None:
        """Free the slot of a request, keeping the others compact."""
        if seq in self.prefilling:
            # Only the head has cache rows (in slot B); when it leaves, the next head starts from nothing.
            self.prefilling.remove(seq)
        else:
            slot = self.decoding.index(seq)
            last = self.decoding.pop()
            if last is not seq:
                self._storage.move_slot(len(self.decoding), slot, last.cached)
                self.decoding[slot] = last
            if self.prefilling and self.prefilling[0].cached:
                self._storage.move_slot(len(self.decoding) + 1, len(self.decoding), self.prefilling[0].cached)
        # Slots stay compact, so the one just past the occupied ones is the one freed.
        self._storage.release_slot(len(self.decoding) + bool(self.prefilling and self.prefilling[0].cached))
