"""Incremental detokenization with stop strings.

Byte-level BPE tokens may end inside a UTF-8 character (common for Chinese),
so text is only released once it decodes cleanly. Text that could be the
start of a stop string is held back until it is either confirmed (generation
stops before it) or ruled out.
"""

from __future__ import annotations

import functools

from transformers import PreTrainedTokenizerBase

_REPLACEMENT = "\ufffd"


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's spelling of bytes as printable characters (GPT-2's
    bytes_to_unicode), reversed: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in spelled:
            spelled[byte] = chr(256 + extra)
            extra += 1
    return {char: byte for byte, char in spelled.items()}


@functools.lru_cache(maxsize=1 << 16)
def token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes:
    """The exact bytes one token stands for (a token may hold part of a
    UTF-8 character, so its text alone cannot say)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    alphabet = _byte_level_alphabet()
    if isinstance(piece, str) and all(char in alphabet for char in piece):
        return bytes(alphabet[char] for char in piece)
    # Not byte-level BPE (or an id past the tokenizer's): its decoded text.
    return str(tokenizer.decode([token_id])).encode("utf-8")


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self._ids: list[int] = []
        self._prefix_offset = 0  # decode from here for context (BPE merges, spaces)
        self._read_offset = 0  # ids before this are already in the text
        self._pending = ""  # decoded but held back (possible stop-string prefix)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if not isinstance(text, str):  # a list only for a batch of sequences
            raise TypeError(f"decode() gave {type(text)}")
        return text

    def add_token(self, token_id: int) -> str:
        """Feed one generated token; return the text that may be released now.
        After a stop string matched, `stopped` is True and later calls are no-ops."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if full_text.endswith(_REPLACEMENT) or len(full_text) <= len(prefix_text):
            return ""  # incomplete character, or a token that renders as nothing yet
        new_text = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._release(new_text)

    def _release(self, new_text: str) -> str:
        if not self._stop:
            return new_text
        text = self._pending + new_text
        # Search only where a match could involve the new text.
        search_from = max(0, len(self._pending) - self._max_stop + 1)
        hits = [i for i in (text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)]
        keep = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:length]):
                    keep = length
                    break
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Text still held back when generation ends for another reason."""
        pending, self._pending = self._pending, ""
        return pending
