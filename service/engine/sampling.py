"""Next-token selection for a batch of requests with their own settings.

The logits of a step are processed in place, in this order, each stage one
batched operation over the rows that use it (a batch where no row does pays
nothing for it):
1. repetition penalty (CTRL-style, over prompt and output);
2. presence and frequency penalties (OpenAI's, over the generated tokens);
3. logit_bias;
4. the grammar mask (constrained decoding) last, so that no bias or penalty
   can re-allow a token the grammar forbids (-inf stays -inf).
Greedy rows (temperature 0) then take the argmax in one batched call; sampled
rows apply temperature, top-k and top-p, then draw with the request's own
torch.Generator so a seed reproduces the same text whatever else shares the
batch.

Logprobs (token_logprobs) are of the processed logits of step 4: the
distribution after penalties, bias and grammar, before temperature, top-k
and top-p. So a greedy token's logprob is the largest of its alternatives
whatever the temperature, and a token the grammar forbids is never reported
as likely. (vLLM's default reports the raw model logprobs instead.) Every
stage works row by row, so a row's numbers do not depend on the batch.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .grammar import GrammarMatcher, allocate_bitmask, apply_bitmask
from .types import LOGPROB_FLOOR, MAX_TOP_LOGPROBS, SamplingParams, TokenLogprobs


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def argmax(logits: torch.Tensor) -> np.ndarray:
    """The index of the largest logit along the last axis: numpy's argmax,
    which agrees with torch's (the first of equal maxima; a NaN counts as the
    largest) at a tenth of the cost. Over a 152K-token row torch's reduction
    took ~150 us and numpy's ~15 us (2.13 CPU build, 1 thread), which at 16
    greedy streams was most of the engine's time per step outside the
    forward pass."""
    return logits.numpy().argmax(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """In place, CTRL-style (as in transformers): positive logits of seen tokens
    are divided by the penalty, negative ones multiplied. The seen mask is
    turned into ids once (numpy): torch's boolean-mask read and write each
    scan the vocabulary (~400 us a row together, against ~40 us)."""
    ids = torch.from_numpy(np.flatnonzero(seen.numpy()))
    scores = logits[ids]
    # A tiny penalty (down to the smallest float) would turn boosted logits
    # into +inf, and inf - inf is NaN in the softmax: saturate instead.
    boosted = (scores / penalty).clamp(max=torch.finfo(logits.dtype).max)
    logits[ids] = torch.where(scores > 0, boosted, scores * penalty)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]]) -> None:
    """In place, batched: OpenAI's presence and frequency penalties, from
    outputs[i], request i's generated token ids. Only the tokens generated
    so far change, so this costs O(output length), not O(vocabulary): one
    unique-count per row and one scatter for the batch."""
    rows = [row for row, p in enumerate(params) if p.penalized and outputs[row]]
    if not rows:
        return
    row_index, token_index, values = [], [], []
    for row in rows:
        p = params[row]
        tokens, counts = torch.tensor(outputs[row]).unique(return_counts=True)
        row_index.append(torch.full((len(tokens),), row))
        token_index.append(tokens)
        values.append(-(counts * p.frequency_penalty + p.presence_penalty))
    # Ids are distinct within a row: each logit gets exactly one addition.
    logits.index_put_((torch.cat(row_index), torch.cat(token_index)), torch.cat(values).float(), accumulate=True)


@functools.lru_cache(maxsize=256)
def _bias_tensors(bias: tuple[tuple[int, float], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's logit_bias as (token ids, values); cached because the same
    params come back every step of a request (and across requests)."""
    ids, values = zip(*bias)
    return torch.tensor(ids), torch.tensor(values, dtype=torch.float32)


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    """In place, batched: add each request's logit_bias to its row."""
    rows = [row for row, p in enumerate(params) if p.logit_bias]
    if not rows:
        return
    biases = [_bias_tensors(params[row].logit_bias) for row in rows]
    row_index = torch.cat([torch.full((len(ids),), row) for row, (ids, _) in zip(rows, biases)])
    token_index = torch.cat([ids for ids, _ in biases])
    # Ids are distinct within a row, so accumulating adds each bias once.
    logits.index_put_((row_index, token_index), torch.cat([values for _, values in biases]), accumulate=True)


def token_logprobs(
    logits: torch.Tensor, params: list[SamplingParams], chosen: list[int | Exception]
) -> list[TokenLogprobs | None]:
    """The chosen token's logprob and the top alternatives for each row that
    asked for logprobs: logprob = logit - logsumexp(row), with one logsumexp
    and one topk over those rows (no vocabulary-wide log_softmax written).
    The topk is always MAX_TOP_LOGPROBS wide (then cut per row) so that a
    row's alternatives, ties included, do not depend on what its neighbours
    ask; equal ones are listed by token id, the way argmax breaks ties, so
    a greedy row's chosen token comes first (topk's own tie order is unspecified)."""
    result: list[TokenLogprobs | None] = [None] * len(params)
    rows = [row for row, p in enumerate(params) if p.logprobs and isinstance(chosen[row], int)]
    if not rows:
        return result
    selected = logits if len(rows) == len(logits) else logits[torch.tensor(rows)]
    normalizer = selected.logsumexp(-1, keepdim=True)
    tokens = torch.tensor([chosen[row] for row in rows]).unsqueeze(1)
    picked = (selected.gather(1, tokens) - normalizer).clamp_(min=LOGPROB_FLOOR).squeeze(1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in rows]
    if any(params[row].top_logprobs for row in rows):
        values, ids = torch.topk(selected, min(MAX_TOP_LOGPROBS, selected.shape[-1]))
        values = (values - normalizer).clamp_(min=LOGPROB_FLOOR)
        tops = [sorted(zip(i, v), key=lambda top: (-top[1], top[0])) for i, v in zip(ids.tolist(), values.tolist())]
    for index, row in enumerate(rows):
        top = tuple(tops[index][: params[row].top_logprobs])
        result[row] = TokenLogprobs(chosen[row], picked[index], top)  # type: ignore[arg-type]
    return result


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
        return int(argmax(logits))
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
    outputs: list[list[int]] | None = None,
) -> list[int | Exception]:
    """logits: float32 [B, vocab] (processed in place, see the module doc:
    token_logprobs reads them afterwards). seen_tokens[i] holds the
    distinct token ids of request i's prompt + output when it uses a
    repetition penalty, else None. grammars[i] is request i's grammar state
    (None: unconstrained); the selected token is fed to it. outputs[i]:
    request i's generated token ids (for presence/frequency penalties).

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
    if outputs is not None:
        apply_penalties(logits, params, outputs)
    apply_logit_bias(logits, params)
    if grammars is not None:
        constrain(logits, grammars, chosen)
    if all(p.greedy for p in params) and not any(chosen):
        chosen = argmax(logits).tolist()
    for row, (p, generator) in enumerate(zip(params, generators)):
        if chosen[row] is None:
            try:
                chosen[row] = int(argmax(logits[row])) if p.greedy else sample_one(logits[row], p, generator)
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
