"""Prefix cache: the KV of token prefixes already computed, reused by later
requests (a shared system prompt, the earlier turns of a chat, the model's
own answers).

Why a copy-in/copy-out block store and not paged attention: the engine keeps
one contiguous KV slot per request, and decoders sit compact in slots
0..B-1 so that a decode step attends over a view of the cache; paged blocks
(vLLM) would turn that view into a gather on every decode step, and decode
steps dominate. Copying a cached prefix into a slot costs once per request
instead: for 1024 tokens of float32 KV, 0.14 % of the time to recompute them
(bench/prefix_cache_copy.py; measured on a loaded machine, README: Prefix cache).

Blocks hold `block_size` consecutive KV positions. A block's key is a
SHA-256 chained over every token from position 0 to the block's end
(vLLM's scheme), so equal keys mean equal prefixes and the longest match of a
prompt is one dict lookup per block. Stored blocks are never written again:
a request copies them into its own slot. Blocks matched at admission are
pinned (reference-counted) until the copy into the request's slot has run in
a successful step, so storing other requests' blocks cannot evict them in
between. Unpinned blocks are evicted least recently used when a new block
needs room under the memory budget. A chain is touched from its last block
to its first, so the first blocks, shared by the most prompts, are the most
recent and a chain is evicted from its end.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from collections.abc import Sequence
from typing import Protocol

import torch

BLOCK_SIZE = 16  # tokens; a finer grain reuses more of a prompt, a coarser one copies fewer pieces


class KVSlots(Protocol):
    """What the cache needs of the model runner (ModelRunner provides it)."""

    def slot_positions(self, slot: int, start: int, end: int) -> torch.Tensor: ...

    def allocate_kv_blocks(self, count: int, block_size: int) -> torch.Tensor: ...


def block_keys(
    token_ids: Sequence[int], count: int, block_size: int = BLOCK_SIZE, known: Sequence[bytes] = ()
) -> list[bytes]:
    """Keys of the first `count` full blocks of `token_ids`; `known` are keys
    already computed for its first blocks (they are kept, not recomputed)."""
    keys = list(known[:count])
    for block in range(len(keys), count):
        tokens = array("q", token_ids[block * block_size : (block + 1) * block_size]).tobytes()
        keys.append(hashlib.sha256((keys[-1] if keys else b"") + tokens).digest())
    return keys


class PrefixCache:
    def __init__(self, kv: KVSlots, capacity_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self._kv = kv
        self._store = kv.allocate_kv_blocks(capacity_blocks, block_size)
        self._free = list(range(capacity_blocks - 1, -1, -1))  # rows of _store
        # key -> row, least recently used first
        self._blocks: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._pins: collections.Counter[bytes] = collections.Counter()
        self.evictions = 0

    @property
    def blocks_used(self) -> int:
        return len(self._blocks)

    def match(self, keys: Sequence[bytes]) -> list[bytes]:
        """The longest run of `keys` from the first that is stored, pinned
        until `unpin`."""
        matched = []
        for key in keys:
            if key not in self._blocks:
                break
            matched.append(key)
        self._touch(matched)
        self._pins.update(matched)
        return matched

    def unpin(self, keys: Sequence[bytes]) -> None:
        self._pins.subtract(keys)
        for key in keys:
            if self._pins[key] <= 0:
                del self._pins[key]

    def copy_into(self, keys: Sequence[bytes], slot: int) -> None:
        """Write the (pinned) blocks `keys`, a prefix from position 0, into a slot."""
        size = self.block_size
        for block, key in enumerate(keys):
            self._kv.slot_positions(slot, block * size, (block + 1) * size).copy_(self._store[self._blocks[key]])

    def store(self, keys: Sequence[bytes], slot: int) -> int:
        """Keep the blocks `keys` (a prefix from position 0) that are not stored
        yet, copied from a slot that holds them. Returns how many of `keys`
        are stored afterwards (from the first; storing stops when every
        block is pinned)."""
        size = self.block_size
        stored = 0
        self._pins.update(keys)  # room for a block is never made by evicting its own prefix
        try:
            for key in keys:
                if key not in self._blocks:
                    row = self._free.pop() if self._free else self._evict()
                    if row is None:
                        break
                    self._store[row].copy_(self._kv.slot_positions(slot, stored * size, (stored + 1) * size))
                    self._blocks[key] = row
                stored += 1
        finally:
            self.unpin(keys)
        self._touch(keys[:stored])
        return stored

    def _touch(self, keys: Sequence[bytes]) -> None:
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def _evict(self) -> int | None:
        for key, row in self._blocks.items():
            if key not in self._pins:
                del self._blocks[key]
                self.evictions += 1
                return row
        return None
