"""Speculative decoding without a second model: prompt-lookup drafts.

A request's next tokens often repeat an earlier stretch of its own text (code
being edited, a passage being summarised or quoted, names, lists). The draft
for a request is what followed the most recent earlier occurrence of its last
n tokens (n from DRAFT_MAX_NGRAM down to DRAFT_MIN_NGRAM). The scheduler runs
the pending token and the draft through one forward pass, as a short chunk at
the request's current position, and keeps the draft up to the first token the
model would not have chosen itself.

Exact, greedy or sampled: row j of the pass gives bitwise the logits a
single decode step would (the forward is batch- and chunk-invariant), the
token of row j is selected exactly as a decode step would select it (same
processing, same generator draw), and draft token j is accepted iff it equals
that token. For a deterministic draft x under the processed distribution p
this accepts x with probability p(x), and a rejection yields a token drawn
from p with x removed and renormalised: the rule of speculative sampling,
drawn so that the request's generator is consumed exactly as without
speculation, so a seed gives the same text with or without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

DRAFT_MAX_NGRAM = 3
# Measured (bench/speculative.py --acceptance, real model): a single-token
# match drafted 49 tokens over a 48-token chat answer, none accepted; two
# tokens cut that to 4, and kept code editing at 4.27 tokens per pass
# (summarising: 2.47 instead of 2.76).
DRAFT_MIN_NGRAM = 2


class PromptLookup:
    """The draft source of one request: its tokens so far and where each of
    their n-grams (DRAFT_MIN_NGRAM..DRAFT_MAX_NGRAM tokens) starts. It grows
    with the request, so a draft costs a dictionary lookup, not a scan of
    the whole context at every step (measured on a busy host at 4,000
    tokens: 6 us per step instead of 1.6 ms; 10 ms once, to index the prompt)."""

    def __init__(self) -> None:
        self._tokens: list[int] = []
        # n-gram -> its start positions, ascending; the n-grams that end with
        # the last token (the suffix a draft looks up) are not in it yet.
        self._starts: dict[tuple[int, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            end = len(self._tokens)  # the n-grams ending here stop being the suffix
            for n in range(DRAFT_MIN_NGRAM, min(DRAFT_MAX_NGRAM, end) + 1):
                self._starts.setdefault(tuple(self._tokens[end - n : end]), []).append(end - n)
            self._tokens.append(token)

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed an earlier occurrence of the
        longest matching suffix (DRAFT_MAX_NGRAM..DRAFT_MIN_NGRAM tokens): the
        most recent occurrence followed by `limit` tokens, else the earliest
        (in a run of one repeated token, the most recent is followed by one
        token only); [] when no suffix occurs earlier."""
        length = len(self._tokens)
        if limit <= 0:
            return []
        for n in range(min(DRAFT_MAX_NGRAM, length - 1), DRAFT_MIN_NGRAM - 1, -1):
            starts = self._starts.get(tuple(self._tokens[length - n :]))
            if starts:
                # Only the last few starts can lack `limit` tokens after them.
                start = next((s for s in reversed(starts) if s + n + limit <= length), starts[0])
                return self._tokens[start + n : start + n + limit]
        return []


# The longest pause (in steps) of a request whose drafts keep being rejected.
MAX_DRAFT_PAUSE = 16
# The length of a request's first draft; then +2 after a draft kept whole, -1
# after one cut short (transformers' "heuristic" schedule for assisted
# generation).
FIRST_DRAFT_LENGTH = 2


class DraftPacing:
    """When a request drafts, and how long a draft. At every step while its
    drafts are accepted; after a wholly rejected draft it skips 1 step, after
    the next 2, then 4, up to MAX_DRAFT_PAUSE, and one accepted draft token
    ends the pause. A draft kept whole lets the next one be 2 tokens longer,
    one cut short makes it 1 shorter (never below 1).

    A pass that verifies a draft costs more than a plain decode step (its
    rows go through every product and the output layer), and each rejected
    token is a row computed for nothing: a request whose text does not
    repeat its context keeps paying for few, short drafts, one whose text
    does (code being edited) soon drafts the most allowed. Pacing changes
    only which passes carry drafts and how many rows, never the tokens
    (speculation is exact)."""

    def __init__(self) -> None:
        self._pause = 0  # the current pause length
        self._skip = 0  # steps left in it
        self._length = FIRST_DRAFT_LENGTH

    def may_draft(self) -> bool:
        """Whether to draft at this step (called once per step the request could)."""
        if self._skip:
            self._skip -= 1
            return False
        return True

    def length(self, limit: int) -> int:
        """The length of this step's draft, at most `limit`."""
        return min(self._length, limit)

    def drafted(self, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens was verified and `accepted` of them kept."""
        if accepted:
            self._pause = 0
        else:
            self._pause = min(max(1, 2 * self._pause), MAX_DRAFT_PAUSE)
            self._skip = self._pause
        self._length = drafted + 2 if accepted == drafted else max(1, self._length - 1)


def propose_draft(token_ids: Sequence[int], limit: int) -> list[int]:
    """PromptLookup.draft for a whole sequence at once (tests, benchmarks)."""
    lookup = PromptLookup()
    lookup.extend(token_ids)
    return lookup.draft(limit)
