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

Slots are kept compact: decoding requests occupy slots 0..B-1 and the
requests being prefilled follow in queue order. When a request leaves, the
last decoder moves into its slot (a copy of only its cached positions).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

import torch

from .detokenizer import IncrementalDetokenizer
from .grammar import GrammarMatcher
from .loader import LoadedModel
from .model_runner import ModelRunner, PrefillChunk
from .sampling import make_generator, select_tokens
from .types import (
    EngineObserver,
    EngineOverloaded,
    EngineStats,
    EngineStopped,
    FinishReason,
    GenerationRequest,
    RequestTiming,
    TokenEvent,
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
    grammar: GrammarMatcher | None = None  # constrained decoding state
    admitted: float | None = None
    first_token: float | None = None
    cached: int = 0  # KV positions written
    next_token: int = -1  # sampled, not yet in the cache
    generated: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)


class Scheduler:
    def __init__(
        self,
        load: Callable[[], LoadedModel],
        *,
        max_batch_size: int,
        max_waiting: int,
        max_model_len: int,
        prefill_chunk_size: int,
        threads: int,
        interleaved_prefill_tokens: int,
        deliver: Deliver,
        quantization: str = "none",
        kv_cache_dtype: str = "auto",
        observer: EngineObserver | None = None,
    ) -> None:
        self._max_batch = max_batch_size
        self._max_waiting = max_waiting
        self._max_model_len = max_model_len
        self._chunk = prefill_chunk_size
        self._interleaved_chunk = interleaved_prefill_tokens
        self._threads = threads
        self._deliver = deliver
        self._observer = observer
        self._cond = threading.Condition()
        # Shared with other threads, guarded by _cond:
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._aborts: set[str] = set()
        self._active_count = 0
        self._stopping = False
        # Owned by the compute thread:
        self._decoding: list[_Sequence] = []  # index == slot
        self._prefilling: collections.deque[_Sequence] = collections.deque()  # admitted, prompt not done
        self._outbox: list[tuple[Emit, TokenEvent]] = []
        self._generated_total = 0
        self._kv_used = 0
        # All parallel torch work happens on the compute thread, loading and
        # repacking included. libgomp keeps a worker pool per thread that
        # enters a parallel region; with more pool threads than cores it
        # stops spinning between regions and every region pays a futex
        # wake-up. Loading on another thread made each decode step 20 %
        # slower on 2 cores (14.3 -> 17.0 ms).
        built = threading.Event()
        failure: list[BaseException] = []

        def build() -> None:
            self.loaded = load()
            self._eos = self.loaded.eos_token_ids
            self._runner = ModelRunner(self.loaded, max_batch_size, max_model_len, quantization, kv_cache_dtype)

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
        )
        with self._cond:
            if self._stopping:
                raise EngineStopped("engine is shutting down")
            if self._active_count + len(self._waiting) >= self._max_batch + self._max_waiting:
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
        return EngineStats(
            running=running,
            waiting=waiting,
            kv_cache_used_tokens=self._kv_used,
            kv_cache_capacity_tokens=self._max_batch * self._max_model_len,
            generated_tokens_total=self._generated_total,
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
        self._cancel_everything()

    def _admit_locked(self) -> None:
        if not self._waiting or self._active_count >= self._max_batch:
            return
        now = time.monotonic()
        while self._waiting and self._active_count < self._max_batch:
            seq = self._waiting.popleft()
            seq.admitted = now
            if seq.request.sampling.repetition_penalty != 1.0:  # a torch op: on this thread (see __init__)
                seq.seen = torch.zeros(self._runner.vocab_size, dtype=torch.bool)
                seq.seen[list(seq.request.prompt_token_ids)] = True
            self._prefilling.append(seq)
            self._active_count += 1

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
        """Prompt chunks for this step: admitted prompts in FIFO order, up to
        the per-step token budget. Only the last one may be cut short, so at
        most one request is ever part-way through its prompt, and it is the
        head of the prefill queue."""
        chunks: list[PrefillChunk] = []
        # Nobody waits on a pass without decoders; with decoders, each prompt token delays all of them.
        budget = self._interleaved_chunk if self._decoding else self._chunk
        slot = len(self._decoding)
        for seq in self._prefilling:
            if budget <= 0:
                break
            prompt = seq.request.prompt_token_ids
            tokens = prompt[seq.cached : seq.cached + budget]
            chunks.append(PrefillChunk(slot, tokens, seq.cached))
            budget -= len(tokens)
            slot += 1
        return chunks

    def _step(self) -> None:
        """One forward pass for every decoding request and this step's prompt chunks."""
        decoding = list(self._decoding)
        chunks = self._plan_chunks()
        if not decoding and not chunks:
            return
        prefilling = list(self._prefilling)[: len(chunks)]
        try:
            logits = self._runner.step(
                [seq.next_token for seq in decoding], [seq.cached for seq in decoding], chunks
            )
        except Exception:  # one bad request must not take the engine, or the others, down
            _LOG.exception("engine step failed (%d decoding, %d prompt chunks)", len(decoding), len(chunks))
            self._isolate_failure(decoding, chunks, prefilling)
            return
        for seq in decoding:
            seq.cached += 1
        self._kv_used += len(decoding)
        if decoding and self._observer is not None:
            try:
                self._observer.decode_step(len(decoding))
            except Exception:  # an observer bug must not fail requests
                _LOG.exception("engine observer failed")
        # Requests whose prompt is complete join the decoders: their slots
        # (right after the decoders', in order) already are the next ones.
        sampled, rows = decoding, list(range(len(decoding)))
        for index, (seq, chunk) in enumerate(zip(prefilling, chunks)):
            seq.cached += len(chunk.token_ids)
            self._kv_used += len(chunk.token_ids)
            if seq.cached == seq.prompt_len:
                self._prefilling.popleft()
                self._decoding.append(seq)
                sampled = sampled + [seq]
                rows.append(len(decoding) + index)
        if sampled:
            self._sample(sampled, logits[rows] if len(rows) < len(logits) else logits)

    def _isolate_failure(self, decoding: list[_Sequence], chunks: list[PrefillChunk], prefilling: list[_Sequence]) -> None:
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

    def _sample(self, batch: list[_Sequence], logits: torch.Tensor) -> None:
        # A row that fails comes back as its exception; only its request fails.
        try:
            chosen = select_tokens(
                logits,
                [seq.request.sampling for seq in batch],
                [seq.generator for seq in batch],
                [seq.seen for seq in batch],
                [seq.grammar for seq in batch],
            )
        except Exception:  # a failure of the batch as a whole: try each row alone
            _LOG.exception("batched token selection failed for a batch of %d", len(batch))
            chosen = [self._select_alone(seq, row) for seq, row in zip(batch, logits)]
        for seq, token in zip(batch, chosen):
            token = self._checked(seq, token)
            if token is None:
                self._release(seq, FinishReason.ERROR, error="internal error while sampling")
            else:
                self._accept(seq, token)

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
                logits.unsqueeze(0), [seq.request.sampling], [seq.generator], [seq.seen], [seq.grammar]
            )
        except Exception as exc:  # noqa: BLE001 - reported by _checked
            return exc
        return token

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Record one sampled token: emit its text, finish the request if done."""
        seq.generated += 1
        self._generated_total += 1
        if seq.first_token is None:
            seq.first_token = time.monotonic()
        seq.next_token = token
        if seq.seen is not None:
            seq.seen[token] = True
        if token in self._eos:
            self._release(seq, FinishReason.STOP, text=seq.detokenizer.flush())
            return
        text = seq.detokenizer.add_token(token)
        if seq.detokenizer.stopped:
            self._release(seq, FinishReason.STOP, text=text)
        elif seq.generated >= seq.request.sampling.max_tokens or seq.cached + 1 >= self._max_model_len:
            self._release(seq, FinishReason.LENGTH, text=text + seq.detokenizer.flush())
        else:
            self._outbox.append((seq.emit, TokenEvent(text=text)))

    def _release(self, seq: _Sequence, reason: FinishReason, text: str = "", error: str | None = None) -> None:
        """Free the slot of an admitted request and send its final event."""
        self._kv_used -= seq.cached
        if seq in self._prefilling:
            # Only the head of the prefill queue has written cache rows (in
            # slot B); when it leaves, the next head starts from nothing.
            self._prefilling.remove(seq)
        else:
            slot = self._decoding.index(seq)
            last = self._decoding.pop()
            if last is not seq:
                self._runner.move_slot(len(self._decoding), slot, last.cached)
                self._decoding[slot] = last
            if self._prefilling and self._prefilling[0].cached:
                self._runner.move_slot(len(self._decoding) + 1, len(self._decoding), self._prefilling[0].cached)
        # Slots stay compact, so the one just past the occupied ones is the one freed.
        self._runner.release_slot(len(self._decoding) + bool(self._prefilling and self._prefilling[0].cached))
        with self._cond:
            self._active_count -= 1
        self._finish(seq, reason, text=text, error=error)

    def _finish(self, seq: _Sequence, reason: FinishReason, text: str = "", error: str | None = None) -> None:
        usage = Usage(prompt_tokens=seq.prompt_len, completion_tokens=seq.generated)
        timing = RequestTiming(seq.submitted, seq.admitted, seq.first_token, time.monotonic())
        event = TokenEvent(text=text, finish_reason=reason, usage=usage, error=error, timing=timing)
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
