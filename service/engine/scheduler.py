"""Continuous batching on a dedicated compute thread.

Each iteration of the loop: apply aborts and expired deadlines (their slots
are freed before any further compute), admit waiting requests FIFO into free
KV-cache slots, then run one forward pass over a mixed batch: the next token
of every decoding request plus prompt chunks of admitted requests, FIFO, up
to a budget of prompt tokens per pass (`prefill_chunk_size` when nothing is
decoding, the smaller `interleaved_prefill_tokens` when streams are, since
every prompt token in the pass delays their next token). A burst of short
prompts is prefilled together in one pass, a long prompt is spread over
several passes, and the running streams advance in every pass.

With speculation on (speculative.py), a decoding request may also carry a
draft of a few tokens through the pass and keep those the model agrees with:
several tokens per pass for the price of one weight read.

The policy (what runs in the next pass) is in policy.py, the slot table
(which request's KV is in which slot) in slots.py; this module applies them
on the compute thread.

With the prefix cache (prefix_cache.py) on, an admitted prompt is matched
against the stored blocks; the matched positions are copied into its slot
in the step that computes its first chunk, which then starts after them.
Its `cached` counts them only once that step succeeded: a failed step
leaves it as it was, and the copy is redone. The full blocks of a slot are
stored as its prompt is computed and when the request ends (its answer
included, so the next turn of a chat finds prompt and answer).

A request for n > 1 choices is admitted with n slots reserved and its prompt
is computed once: when it is complete, the request forks (_fork) into n
sequences, the n - 1 new ones taking the next decoding slots with a copy of
the prompt's KV and sampling their first token from the same logits row,
each with its own generator (seed + i).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .grammar import GrammarMatcher
from .kernels import resolve_quantization
from .loader import LoadedModel
from .model_runner import ModelRunner, PrefillChunk
from .policy import prompt_chunk_lengths, reusable_blocks, storable_blocks
from .prefix_cache import BLOCK_SIZE, PrefixCache, block_keys
from .sampling import make_generator, select_tokens, token_logprobs
from .slots import SlotTable
from .speculative import DraftPacing, PromptLookup
from .types import (
    EngineObserver,
    EngineOverloaded,
    EngineSetup,
    EngineStats,
    EngineStopped,
    FinishReason,
    GenerationRequest,
    RequestTiming,
    TokenEvent,
    TokenLogprobs,
    Usage,
)

_LOG = logging.getLogger(__name__)

Emit = Callable[[TokenEvent], None]
# Called on the compute thread with every event of one iteration, in order;
# it hands them to the consumers' event loop.
Deliver = Callable[[list[tuple[Emit, TokenEvent]]], None]


@dataclasses.dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    emit: Emit
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator
    submitted: float  # time.monotonic() stamps, reported in the final event's RequestTiming
    seen: torch.Tensor | None = None  # bool [vocab] of prompt+output ids, for repetition penalty (set on admission)
    index: int = 0  # the choice (of n) this sequence generates
    reserved: int = 1  # slots it holds: n until the prompt is done and it forks, then 1
    grammar: GrammarMatcher | None = None  # constrained decoding state
    admitted: float | None = None
    first_token: float | None = None
    cached: int = 0  # KV positions written
    next_token: int = -1  # sampled, not yet in the cache
    generated: int = 0
    output_ids: list[int] = dataclasses.field(default_factory=list)
    block_keys: list[bytes] = dataclasses.field(default_factory=list)  # of the full blocks of prompt + output
    reused: list[bytes] = dataclasses.field(default_factory=list)  # matched blocks, pinned until copied in
    cached_prompt_tokens: int = 0  # prompt positions taken from the prefix cache
    stored_blocks: int = 0  # of block_keys, in the prefix cache
    lookup: PromptLookup | None = None  # draft source over token_ids(), made at the first draft
    pacing: DraftPacing = dataclasses.field(default_factory=DraftPacing)  # when it drafts

    @property
    def start(self) -> int:
        """First prompt position the next chunk computes."""
        return self.cached or len(self.reused) * BLOCK_SIZE

    def token_ids(self) -> tuple[int, ...]:
        """The tokens whose KV the slot holds or will hold."""
        return self.request.prompt_token_ids + tuple(self.output_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)


class Scheduler:
    def __init__(
        self,
        load: Callable[[str], LoadedModel],
        config: EngineConfig,
        *,
        deliver: Deliver,
        observer: EngineObserver | None = None,
    ) -> None:
        self._max_batch = config.max_batch_size
        self._speculative_tokens = config.speculative_tokens
        self._speculative_max_batch = config.speculative_max_batch
        self._max_waiting = config.max_waiting
        self._max_model_len = config.max_model_len
        self._chunk = config.prefill_chunk_size
        self._interleaved_chunk = config.interleaved_prefill_tokens
        self._threads = config.threads
        self._deliver = deliver
        self._observer = observer
        self._cond = threading.Condition()
        # Shared with other threads, guarded by _cond:
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._aborts: set[str] = set()
        self._active_count = 0
        self._stopping = False
        # Owned by the compute thread:
        self._outbox: list[tuple[Emit, TokenEvent]] = []
        self._generated_total = 0
        self._kv_used = 0
        self._prompt_tokens_total = 0  # of admitted prompts
        self._prefix_hit_tokens_total = 0
        self._draft_tokens_total = 0
        self._accepted_draft_tokens_total = 0
        self._last_progress = time.monotonic()  # see EngineStats.last_progress
        # All parallel torch work happens on the compute thread: the
        # `--quantization auto` probe, loading and repacking included. libgomp
        # keeps a worker pool per thread that enters a parallel region; with
        # more pool threads than cores it stops spinning between regions and
        # every region pays a futex wake-up. Loading on another thread made
        # each decode step 20 % slower on 2 cores (14.3 -> 17.0 ms); the probe
        # on a start-up executor thread, 40 % (44-50 vs 60-68 ms per token
        # over gRPC, real model, AVX2 host).
        built = threading.Event()
        failure: list[BaseException] = []

        def build() -> None:
            quantization = resolve_quantization(config.quantization, config.threads)
            self.loaded = load(quantization)
            self._eos = self.loaded.eos_token_ids
            self._runner = ModelRunner(self.loaded, dataclasses.replace(config, quantization=quantization))
            self._slots: SlotTable[_Sequence] = SlotTable(self._runner)
            self._decoding, self._prefilling = self._slots.decoding, self._slots.prefilling
            blocks = config.prefix_cache_bytes // (self._runner.kv_bytes_per_token * BLOCK_SIZE)
            self._prefix_cache = PrefixCache(self._runner, blocks) if blocks else None
            self.setup = EngineSetup(
                quantization=quantization,
                requested_quantization=config.quantization,
                native_layers=self._runner.native_layers,
                kv_cache_dtype=self._runner.kv_cache_dtype,
                kernels=self._runner.kernels,
            )

        self._thread = threading.Thread(target=self._run, args=(build, built, failure), name="qwen-engine", daemon=True)
        self._thread.start()
        built.wait()
        if failure:
            raise failure[0]

    # ----- called from other threads ------------------------------------
    def submit(self, request: GenerationRequest, emit: Emit) -> None:
        sampling = request.sampling
        sequence = _Sequence(
            request=request,
            emit=emit,
            detokenizer=IncrementalDetokenizer(self.loaded.tokenizer, sampling.stop),
            generator=make_generator(sampling.seed),
            submitted=time.monotonic(),
            grammar=request.grammar.matcher() if request.grammar is not None else None,
            reserved=sampling.n,
        )
        with self._cond:
            if self._stopping:
                raise EngineStopped("engine is shutting down")
            waiting = sum(s.reserved for s in self._waiting)
            if self._active_count + waiting + sequence.reserved > self._max_batch + self._max_waiting:
                raise EngineOverloaded(self._active_count, len(self._waiting))
            self._waiting.append(sequence)
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            running, waiting = self._active_count, len(self._waiting)
        cache = self._prefix_cache
        return EngineStats(
            running=running,
            waiting=waiting,
            kv_cache_used_tokens=self._kv_used,
            kv_cache_capacity_tokens=self._max_batch * self._max_model_len,
            generated_tokens_total=self._generated_total,
            prompt_tokens_total=self._prompt_tokens_total,
            prefix_cache_hit_tokens_total=self._prefix_hit_tokens_total,
            prefix_cache_blocks_used=cache.blocks_used if cache else 0,
            prefix_cache_blocks_capacity=cache.capacity_blocks if cache else 0,
            prefix_cache_evictions_total=cache.evictions if cache else 0,
            draft_tokens_total=self._draft_tokens_total,
            accepted_draft_tokens_total=self._accepted_draft_tokens_total,
            compute_threads=self._runner.compute_threads,
            last_progress=self._last_progress,
        )

    def stop(self, timeout: float | None = None) -> None:
        """Cancel everything still queued or running and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ----- the compute thread -------------------------------------------
    def _run(self, build: Callable[[], None], built: threading.Event, failure: list) -> None:
        torch.set_num_threads(self._threads)
        try:
            build()
        except BaseException as exc:  # reported by the constructor
            failure.append(exc)
            return
        finally:
            built.set()
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._aborts or self._waiting or self._decoding or self._prefilling):
                    self._cond.wait()
                if self._stopping:
                    break
                self._last_progress = time.monotonic()
                aborts, self._aborts = self._aborts, set()
                self._admit_locked()
            try:
                self._drop_aborted_and_expired(aborts)
                self._step()
            except Exception:  # the engine must outlive any bug in one step
                _LOG.exception("engine step failed; failing the requests in flight")
                for seq in list(self._prefilling) + list(self._decoding):
                    self._release(seq, FinishReason.ERROR, error="internal engine error")
            finally:
                self._publish()
                self._last_progress = time.monotonic()
        self._cancel_everything()

    def _admit_locked(self) -> None:
        if not self._waiting or self._active_count >= self._max_batch:
            return
        now = time.monotonic()
        # FIFO: a request for n choices waits at the head until n slots are free.
        while self._waiting and self._active_count + self._waiting[0].reserved <= self._max_batch:
            seq = self._waiting.popleft()
            seq.admitted = now
            if seq.request.sampling.repetition_penalty != 1.0:  # a torch op: on this thread (see __init__)
                seq.seen = torch.zeros(self._runner.vocab_size, dtype=torch.bool)
                seq.seen[list(seq.request.prompt_token_ids)] = True
            if self._prefix_cache is not None:
                prompt = seq.request.prompt_token_ids
                seq.block_keys = block_keys(prompt, reusable_blocks(len(prompt), BLOCK_SIZE))
                seq.reused = self._prefix_cache.match(seq.block_keys)
            self._slots.admit(seq)
            self._active_count += seq.reserved
            self._prompt_tokens_total += seq.prompt_len

    def _drop_aborted_and_expired(self, aborts: set[str]) -> None:
        now = time.monotonic()

        def doomed(seq: _Sequence) -> bool:
            deadline = seq.request.deadline
            return seq.request.request_id in aborts or (deadline is not None and now >= deadline)

        with self._cond:
            for seq in [s for s in self._waiting if doomed(s)]:
                self._waiting.remove(seq)
                self._finish(seq, FinishReason.CANCELLED)
        for seq in [s for s in self._prefilling if doomed(s)]:
            self._release(seq, FinishReason.CANCELLED)
        for seq in [s for s in self._decoding if doomed(s)]:
            self._release(seq, FinishReason.CANCELLED)

    def _plan_chunks(self) -> list[PrefillChunk]:
        """Prompt chunks for this step (policy.prompt_chunk_lengths), after
        copying the reused prefix of each prompt that starts now into its slot."""
        remaining = [seq.prompt_len - seq.start for seq in self._prefilling]
        lengths = prompt_chunk_lengths(len(self._decoding), remaining, self._chunk, self._interleaved_chunk)
        chunks = []
        for slot, seq, length in zip(range(len(self._decoding), len(self._slots)), self._prefilling, lengths):
            if seq.reused:  # starts now: copy the reused prefix in (again, after a failed step)
                self._reused_from().copy_into(seq.reused, slot)
            chunks.append(PrefillChunk(slot, seq.request.prompt_token_ids[seq.start : seq.start + length], seq.start))
        return chunks

    def _may_speculate(self, seq: _Sequence) -> bool:
        """Whether a request may take drafts: not one constrained by a grammar
        or that reports logprobs (a draft row's selection would need its mask
        or its distribution). Penalties and logit_bias are no obstacle: each
        draft row is selected after the tokens before it were accepted
        (_accept_run), so over the same tokens a decode step would see. The
        choices of a request for n are sequences of their own once forked
        (each its own slot, KV and generator), so they may."""
        return seq.grammar is None and not seq.request.sampling.logprobs

    def _plan_drafts(self, decoding: list[_Sequence], chunks: list[PrefillChunk]) -> list[list[int]]:
        """Prompt-lookup drafts for this step, one list per decoding request
        (speculative.py). Draft tokens share the step's token budget with the
        prompt chunks, which go first; none past max_tokens or the context
        window; none when the batch is large (the step is then compute-bound,
        and rejected drafts cost more than accepted ones save); none while a
        request's drafts are being rejected (DraftPacing)."""
        drafts: list[list[int]] = [[] for _ in decoding]
        if not self._speculative_tokens or len(decoding) > self._speculative_max_batch:
            return drafts
        budget = self._interleaved_chunk - sum(len(chunk.token_ids) for chunk in chunks)
        for draft, seq in zip(drafts, decoding):
            if budget <= 0:
                break
            if self._may_speculate(seq) and seq.pacing.may_draft():
                limit = min(
                    self._speculative_tokens,
                    budget,
                    seq.request.sampling.max_tokens - seq.generated - 1,
                    self._max_model_len - 1 - seq.cached,
                )
                draft.extend(self._lookup(seq).draft(seq.pacing.length(limit)))
                budget -= len(draft)
        return drafts

    @staticmethod
    def _lookup(seq: _Sequence) -> PromptLookup:
        """The sequence's PromptLookup, given the tokens it has not seen yet."""
        if seq.lookup is None:
            seq.lookup = PromptLookup()
        seen = len(seq.lookup)
        if seen < seq.prompt_len:
            seq.lookup.extend(seq.request.prompt_token_ids[seen:])
            seen = seq.prompt_len
        seq.lookup.extend(seq.output_ids[seen - seq.prompt_len :])
        return seq.lookup

    def _step(self) -> None:
        """One forward pass for every decoding request (with its draft, if any)
        and this step's prompt chunks."""
        decoding = list(self._decoding)
        chunks = self._plan_chunks()
        if not decoding and not chunks:
            return
        drafts = self._plan_drafts(decoding, chunks)
        prefilling = list(self._prefilling)[: len(chunks)]
        try:
            if any(drafts):
                logits = self._verify_step(decoding, drafts, chunks)
            else:
                logits = self._runner.step(
                    [seq.next_token for seq in decoding], [seq.cached for seq in decoding], chunks
                )
        except Exception:  # one bad request must not take the engine, or the others, down
            _LOG.exception("engine step failed (%d decoding, %d prompt chunks)", len(decoding), len(chunks))
            self._isolate_failure(decoding, chunks, prefilling)
            return
        # Logits rows: each decoding request's pending token and draft, then one per prompt chunk.
        first_rows, row = [], 0
        for seq, draft in zip(decoding, drafts):
            first_rows.append(row)
            row += 1 + len(draft)
            # Every written position, drafts included, until the draft is
            # checked: a slot that moves meanwhile (another request ending)
            # takes them along.
            self._set_cached(seq, seq.cached + 1 + len(draft))
        if decoding:
            self._observe("decode_step", len(decoding))
        # Requests whose prompt is complete join the decoders: their slots
        # (right after the decoders', in order) already are the next ones.
        sampled, rows = list(decoding), list(first_rows)
        for index, (seq, chunk) in enumerate(zip(prefilling, chunks)):
            if seq.reused:
                self._reuse_done(seq, chunk.start)
            self._kv_used += chunk.end - seq.cached
            seq.cached = chunk.end
            self._store_blocks(seq, chunk.slot)
            if seq.cached == seq.prompt_len:
                self._slots.prompt_done()
                sampled = sampled + [seq]
                rows.append(row + index)
        # After every completed prompt joined the decoders: the choices of a
        # forked one take the slots after theirs, sampling from its logits row.
        for seq, parent_row in list(zip(sampled, rows)):
            if seq.reserved > 1:
                choices = self._fork(seq)
                sampled = sampled + choices
                rows += [parent_row] * len(choices)
        runs = {
            seq: (draft, logits[first + 1 : first + 1 + len(draft)])
            for seq, draft, first in zip(decoding, drafts, first_rows)
            if draft
        }
        if sampled:
            self._sample(sampled, logits if rows == list(range(len(logits))) else logits[rows], runs)

    def _verify_step(
        self, decoding: list[_Sequence], drafts: list[list[int]], chunks: list[PrefillChunk]
    ) -> torch.Tensor:
        """The forward pass of a step with drafts: each decoding request's
        pending token and draft go in as a chunk at its current position (its
        logits bitwise those of as many decode steps); logits of every such
        row, then of each prompt chunk's last token."""
        verify = [
            PrefillChunk(slot, (seq.next_token, *draft), seq.cached)
            for slot, (seq, draft) in enumerate(zip(decoding, drafts))
        ]
        verified = sum(len(chunk.token_ids) for chunk in verify)
        logit_rows, end = list(range(verified)), verified
        for chunk in chunks:
            end += len(chunk.token_ids)
            logit_rows.append(end - 1)
        return self._runner.step([], [], verify + chunks, logit_rows=logit_rows)

    def _fork(self, seq: _Sequence) -> list[_Sequence]:
        """The prompt of a request for n choices is complete: n - 1 more
        sequences decode from a copy of its KV (see the module doc)."""
        sampling = seq.request.sampling
        choices = []
        for index in range(1, seq.reserved):
            choice = dataclasses.replace(
                seq,
                detokenizer=IncrementalDetokenizer(self.loaded.tokenizer, sampling.stop),
                generator=make_generator(None if sampling.seed is None else sampling.seed + index),
                seen=None if seq.seen is None else seq.seen.clone(),
                grammar=seq.request.grammar.matcher() if seq.request.grammar is not None else None,
                index=index,
                reserved=1,
                output_ids=[],
                lookup=None,
                pacing=DraftPacing(),
                block_keys=list(seq.block_keys),
                reused=[],
            )
            self._slots.fork(choice, self._slots.slot_of(seq))
            self._kv_used += choice.cached
            choices.append(choice)
        seq.reserved = 1
        return choices

    def _reused_from(self) -> PrefixCache:
        """The prefix cache, where a sequence's `reused` blocks come from."""
        if self._prefix_cache is None:
            raise RuntimeError("reused blocks without a prefix cache")
        return self._prefix_cache

    def _reuse_done(self, seq: _Sequence, reused_tokens: int) -> None:
        """The step that started after a prompt's reused prefix succeeded."""
        seq.cached_prompt_tokens = reused_tokens
        self._prefix_hit_tokens_total += reused_tokens
        self._reused_from().unpin(seq.reused)
        seq.reused = []
        self._observe("prefix_reused", reused_tokens)

    def _store_blocks(self, seq: _Sequence, slot: int) -> None:
        """Keep the full blocks of a slot's valid positions in the prefix cache."""
        if self._prefix_cache is None:
            return
        count = storable_blocks(seq.cached, BLOCK_SIZE)
        if count <= seq.stored_blocks:
            return
        seq.block_keys = block_keys(seq.token_ids(), count, known=seq.block_keys)
        evictions = self._prefix_cache.evictions
        seq.stored_blocks = self._prefix_cache.store(seq.block_keys[:count], slot)
        if self._prefix_cache.evictions > evictions:
            self._observe("prefix_blocks_evicted", self._prefix_cache.evictions - evictions)

    def _observe(self, hook: str, value: int) -> None:
        if self._observer is not None:
            try:
                getattr(self._observer, hook)(value)
            except Exception:  # an observer bug must not fail requests
                _LOG.exception("engine observer failed")

    def _isolate_failure(
        self, decoding: list[_Sequence], chunks: list[PrefillChunk], prefilling: list[_Sequence]
    ) -> None:
        """Run each part of a failed step on its own and end only the requests
        whose part fails again; the others redo the step next iteration
        (writing the same cache positions again is harmless)."""
        failed: list[tuple[_Sequence, str]] = []
        if decoding:
            try:
                self._runner.step([seq.next_token for seq in decoding], [seq.cached for seq in decoding], [])
            except Exception:
                _LOG.exception("decode step failed for a batch of %d", len(decoding))
                failed += [(seq, "internal error during decoding") for seq in decoding]
        for seq, chunk in zip(prefilling, chunks):
            try:
                self._runner.step([], [], [chunk])
            except Exception:
                _LOG.exception("prefill failed for %s", seq.request.request_id)
                failed.append((seq, "internal error during prefill"))
        if not failed:  # only the combination fails (e.g. out of memory): end them all
            failed = [(seq, "internal engine error") for seq in decoding + prefilling]
        for seq, error in failed:
            self._release(seq, FinishReason.ERROR, error=error)

    def _sample(
        self,
        batch: list[_Sequence],
        logits: torch.Tensor,
        runs: dict[_Sequence, tuple[list[int], torch.Tensor]] | None = None,
    ) -> None:
        """Select and accept one token per request from logits [B, vocab]; a
        request in `runs` then continues through its draft (_accept_run)."""
        # A row that fails comes back as its exception; only its request fails.
        try:
            chosen = select_tokens(
                logits,
                [seq.request.sampling for seq in batch],
                [seq.generator for seq in batch],
                [seq.seen for seq in batch],
                [seq.grammar for seq in batch],
                [seq.output_ids for seq in batch],
            )
        except Exception:  # a failure of the batch as a whole: try each row alone
            _LOG.exception("batched token selection failed for a batch of %d", len(batch))
            chosen = [self._select_alone(seq, row) for seq, row in zip(batch, logits)]
        params = [seq.request.sampling for seq in batch]
        logprobs = token_logprobs(logits, params, chosen) if any(p.logprobs for p in params) else [None] * len(batch)
        for seq, selected, token_logprob in zip(batch, chosen, logprobs):
            token = self._checked(seq, selected)
            if token is None:
                self._release(seq, FinishReason.ERROR, error="internal error while sampling")
            elif runs and seq in runs:
                self._accept_run(seq, token, *runs[seq])
            else:
                self._accept(seq, token, token_logprob)

    def _accept_run(self, seq: _Sequence, token: int, draft: list[int], draft_logits: torch.Tensor) -> None:
        """Accept the token selected after a request's pending token, then,
        while each selected token equals the draft's next one (so the KV of
        the pass holds it), the token selected from that draft position's
        logits (speculative.py: why this is exact). The request's KV ends
        after the last accepted draft token; the rest of the pass's positions
        are overwritten by later steps and never reach the prefix cache."""
        written = seq.cached
        base = written - len(draft)  # positions valid with the pending token alone
        accepted = 0
        while True:
            self._set_cached(seq, base + accepted)
            self._accept(seq, token)
            if not self._slots.holds(seq) or accepted == len(draft) or token != draft[accepted]:
                break
            selected = self._checked(seq, self._select_alone(seq, draft_logits[accepted]))
            if selected is None:
                self._release(seq, FinishReason.ERROR, error="internal error while sampling")
                break
            token = selected
            accepted += 1
        seq.pacing.drafted(len(draft), accepted)
        self._speculated(len(draft), accepted)

    def _set_cached(self, seq: _Sequence, positions: int) -> None:
        """Set a decoding request's count of valid KV positions."""
        self._kv_used += positions - seq.cached
        seq.cached = positions

    def _speculated(self, drafted: int, accepted: int) -> None:
        self._draft_tokens_total += drafted
        self._accepted_draft_tokens_total += accepted
        self._observe("draft_tokens", drafted)
        self._observe("accepted_draft_tokens", accepted)

    @staticmethod
    def _checked(seq: _Sequence, token: int | Exception) -> int | None:
        if isinstance(token, Exception):
            _LOG.error("sampling failed for %s", seq.request.request_id, exc_info=token)
            return None
        return token

    @staticmethod
    def _select_alone(seq: _Sequence, logits: torch.Tensor) -> int | Exception:
        """Select one row's token on its own."""
        try:
            (token,) = select_tokens(
                logits.unsqueeze(0),
                [seq.request.sampling],
                [seq.generator],
                [seq.seen],
                [seq.grammar],
                [seq.output_ids],
            )
        except Exception as exc:  # noqa: BLE001 - reported by _checked
            return exc
        return token

    def _accept(self, seq: _Sequence, token: int, logprobs: TokenLogprobs | None = None) -> None:
        """Record one sampled token: emit its text (and logprobs), finish the request if done."""
        seq.generated += 1
        self._generated_total += 1
        if seq.first_token is None:
            seq.first_token = time.monotonic()
        seq.next_token = token
        seq.output_ids.append(token)
        if seq.seen is not None:
            seq.seen[token] = True
        if token in self._eos:  # not part of the answer: its logprobs are not reported (as OpenAI)
            self._release(seq, FinishReason.STOP, text=seq.detokenizer.flush())
            return
        text = seq.detokenizer.add_token(token)
        if seq.detokenizer.stopped:
            self._release(seq, FinishReason.STOP, text=text, logprobs=logprobs)
        elif seq.generated >= seq.request.sampling.max_tokens or seq.cached + 1 >= self._max_model_len:
            self._release(seq, FinishReason.LENGTH, text=text + seq.detokenizer.flush(), logprobs=logprobs)
        else:
            self._outbox.append((seq.emit, TokenEvent(text=text, index=seq.index, logprobs=logprobs)))

    def _release(
        self,
        seq: _Sequence,
        reason: FinishReason,
        text: str = "",
        error: str | None = None,
        logprobs: TokenLogprobs | None = None,
    ) -> None:
        """Free the slot of an admitted request and send its final event."""
        self._kv_used -= seq.cached
        if reason is not FinishReason.ERROR and not self._stopping:  # after an error its KV is suspect
            self._store_blocks(seq, self._slots.slot_of(seq))
        if seq.reused:
            self._reused_from().unpin(seq.reused)
        self._slots.remove(seq)
        with self._cond:
            self._active_count -= seq.reserved
        self._finish(seq, reason, text=text, error=error, logprobs=logprobs)

    def _finish(
        self,
        seq: _Sequence,
        reason: FinishReason,
        text: str = "",
        error: str | None = None,
        logprobs: TokenLogprobs | None = None,
    ) -> None:
        usage = Usage(
            prompt_tokens=seq.prompt_len, completion_tokens=seq.generated, cached_prompt_tokens=seq.cached_prompt_tokens
        )
        timing = RequestTiming(seq.submitted, seq.admitted, seq.first_token, time.monotonic())
        event = TokenEvent(
            text=text,
            finish_reason=reason,
            usage=usage,
            error=error,
            timing=timing,
            index=seq.index,
            logprobs=logprobs,
        )
        self._outbox.append((seq.emit, event))

    def _publish(self) -> None:
        if self._outbox:
            events, self._outbox = self._outbox, []
            self._deliver(events)

    def _cancel_everything(self) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for seq in waiting:
            self._finish(seq, FinishReason.CANCELLED)
        for seq in list(self._prefilling) + list(self._decoding):
            self._release(seq, FinishReason.CANCELLED)
        self._publish()
