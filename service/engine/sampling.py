"""Next-token selection for a batch of requests with their own settings.

Greedy rows (temperature 0) take the argmax in one batched call; sampled rows
apply repetition penalty, temperature, top-k and top-p, then draw with the
request's own torch.Generator so a seed reproduces the same text whatever
else shares the batch. Rows with a grammar are masked to the tokens it
allows before selection (a batch without one pays nothing for this).
"""

from __future__ import annotations

import torch

from .grammar import GrammarMatcher, allocate_bitmask, apply_bitmask
from .types import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """In place, CTRL-style (as in transformers): positive logits of seen tokens
    are divided by the penalty, negative ones multiplied."""
    scores = logits[seen]
    # A tiny penalty (down to the smallest float) would turn boosted logits
    # into +inf, and inf - inf is NaN in the softmax: saturate instead.
    boosted = (scores / penalty).clamp(max=torch.finfo(logits.dtype).max)
    logits[seen] = torch.where(scores > 0, boosted, scores * penalty)


def _candidates(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (at most top_k) best logits in descending order, with their token ids.
    top_k keeps this O(vocab) instead of a full sort; 0 means all tokens."""
    if 0 < top_k < logits.shape[-1]:
        return torch.topk(logits, top_k)
    return torch.sort(logits, descending=True)


def sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits: float32 [vocab], penalties already applied. Order as in
    transformers: temperature, then top-k, then top-p."""
    if params.greedy:
        return int(logits.argmax())
    values, token_ids = _candidates(logits, params.top_k)
    # Shift so the best logit is 0 before dividing: for a tiny temperature the
    # others go to -inf (probability 0) instead of overflowing to +inf.
    probs = ((values - values[0]) / params.temperature).softmax(-1)
    if params.top_p < 1.0:
        # Keep a candidate while the mass before it is below top_p (so the
        # most likely token always stays).
        keep = (probs.cumsum(-1) - probs) < params.top_p
        probs = probs * keep
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(token_ids[choice])


def constrain(
    logits: torch.Tensor, grammars: list[GrammarMatcher | None], failed: list[int | Exception | None]
) -> None:
    """In place: mask each grammar row of logits [B, vocab] to the tokens its
    grammar allows next. A row whose mask cannot be computed gets the
    exception in failed[row] and is left alone."""
    rows = [row for row, grammar in enumerate(grammars) if grammar is not None and failed[row] is None]
    if not rows:
        return
    bitmask = allocate_bitmask(len(rows), logits.shape[-1])
    masked = []
    for index, row in enumerate(rows):
        try:
            grammars[row].fill_mask(bitmask, index)  # type: ignore[union-attr]
            masked.append(index)
        except Exception as exc:  # noqa: BLE001 - reported per row
            failed[row] = exc
    if masked:
        selected = torch.tensor([rows[index] for index in masked])
        constrained = logits[selected]
        apply_bitmask(constrained, bitmask[masked])
        logits[selected] = constrained


def select_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    seen_tokens: list[torch.Tensor | None],
    grammars: list[GrammarMatcher | None] | None = None,
) -> list[int | Exception]:
    """logits: float32 [B, vocab] (modified in place). seen_tokens[i] holds the
    distinct token ids of request i's prompt + output when it uses a
    repetition penalty, else None. grammars[i] is request i's grammar state
    (None: unconstrained); the selected token is fed to it.

    Rows are independent: a row whose selection raises gets the exception in
    its place, and every other row is computed exactly as without it (its
    penalty applied once, its generator drawn from once)."""
    chosen: list[int | Exception | None] = [None] * len(params)
    for row, (p, seen) in enumerate(zip(params, seen_tokens)):
        if seen is not None and p.repetition_penalty != 1.0:
            try:
                apply_repetition_penalty(logits[row], seen, p.repetition_penalty)
            except Exception as exc:  # noqa: BLE001 - reported per row
                chosen[row] = exc
    if grammars is not None:
        constrain(logits, grammars, chosen)
    if all(p.greedy for p in params) and not any(chosen):
        chosen = logits.argmax(-1).tolist()
    for row, (p, generator) in enumerate(zip(params, generators)):
        if chosen[row] is None:
            try:
                chosen[row] = int(logits[row].argmax()) if p.greedy else sample_one(logits[row], p, generator)
            except Exception as exc:  # noqa: BLE001 - reported per row
                chosen[row] = exc
    for row, grammar in enumerate(grammars or ()):
        token = chosen[row]
        if grammar is not None and isinstance(token, int):
            try:
                grammar.accept(token)
            except Exception as exc:  # noqa: BLE001 - reported per row
                chosen[row] = exc
    return chosen  # type: ignore[return-value]
