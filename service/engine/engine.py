"""The engine's asyncio face: `generate(request) -> async iterator of TokenEvent`
and `abort(request_id)`. Compute happens on the scheduler's own thread;
events come back to the event loop through one call_soon_threadsafe per step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import typing
from collections.abc import AsyncGenerator, Callable, Sequence

from transformers import BatchEncoding

from .config import EngineConfig
from .detokenizer import token_bytes
from .grammar import Grammar, GrammarCompiler
from .loader import LoadedModel
from .scheduler import Emit, Scheduler
from .types import (
    EngineObserver,
    EngineStats,
    FinishReason,
    GenerationRequest,
    OutputConstraint,
    SamplingParams,
    TokenEvent,
)

_LOG = logging.getLogger(__name__)


def _max_token_bytes(tokenizer) -> int:
    """The most bytes of text one token can stand for (128 for Qwen2.5: a
    run of spaces), so that a text of N bytes is at least N / this many
    tokens. A vocabulary entry's UTF-8 length bounds its text from above
    (byte-level BPE spells each byte as one 1-2 byte character; SentencePiece
    spells a space as the 3-byte "▁"), so only the longest entries need
    decoding: stop once that bound falls below the longest text found."""
    added = {token.content for token in tokenizer.added_tokens_decoder.values()}
    longest = max((len(text.encode("utf-8")) for text in added), default=1)
    entries = sorted(((len(t.encode("utf-8")), t) for t in tokenizer.get_vocab() if t not in added), reverse=True)
    for bound, token in entries:
        if bound <= longest:
            break
        longest = max(longest, len(tokenizer.convert_tokens_to_string([token]).encode("utf-8")))
    return longest


class Engine:
    def __init__(
        self,
        model: LoadedModel | Callable[[str], LoadedModel],
        config: EngineConfig,
        *,
        observer: EngineObserver | None = None,
    ) -> None:
        """`model`: a loaded model (the engine takes ownership: the runner
        repacks its weights in place), or a function that loads one for the
        resolved quantization (`auto` is probed first), which then runs on
        the engine's compute thread (the fast way: see Scheduler).
        `config.max_buffered_tokens`: see generate()."""
        self.config = config
        self.max_model_len = config.max_model_len
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduler = Scheduler(
            model if callable(model) else lambda _quantization: model,
            config,
            deliver=self._deliver,
            observer=observer,
        )
        self.loaded = self._scheduler.loaded
        self.setup = self._scheduler.setup
        self.max_token_bytes = _max_token_bytes(self.loaded.tokenizer)
        self._grammars = GrammarCompiler(
            self.loaded.tokenizer, self.loaded.model.config.vocab_size, self.loaded.eos_token_ids
        )

    @property
    def model_name(self) -> str:
        return self.loaded.name

    def start(self) -> None:
        """Deliver events to the running loop from now on (the compute thread
        runs from construction, idle until the first request)."""
        self._loop = asyncio.get_running_loop()

    def _deliver(self, events: list[tuple[Emit, TokenEvent]]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def dispatch() -> None:
            for emit, event in events:
                emit(event)

        loop.call_soon_threadsafe(dispatch)

    def compile_grammar(self, constraint: OutputConstraint) -> Grammar:
        """A constraint compiled for GenerationRequest.grammar (cached per
        distinct constraint). Raises grammar.InvalidGrammar. CPU work of
        milliseconds for a typical schema: call it off the event loop."""
        return self._grammars.compile(constraint)

    def encode_chat(
        self, messages: Sequence[dict[str, object]], tools: Sequence[dict[str, object]] | None = None
    ) -> list[int]:
        """Prompt token ids for a conversation, via the tokenizer's chat
        template (which renders `tools`, OpenAI-style function definitions).
        A trailing assistant message is a prefill: rendered without its end,
        so the answer continues it."""
        prefill = bool(messages) and messages[-1]["role"] == "assistant"
        encoded = self.loaded.tokenizer.apply_chat_template(
            list(messages),  # type: ignore[arg-type]  # (the stub says str values; templates read any JSON)
            tools=list(tools) if tools else None,
            add_generation_prompt=not prefill,
            continue_final_message=prefill,
            tokenize=True,
            return_dict=True,
        )
        if not isinstance(encoded, BatchEncoding):
            raise TypeError(f"the chat template gave {type(encoded)}, not token ids")
        return list(encoded["input_ids"])

    def encode_text(self, text: str) -> list[int]:
        """Prompt token ids for raw text (no chat template); special-token
        spellings in it are read as those tokens."""
        return list(self.loaded.tokenizer.encode(text, add_special_tokens=False))

    def token_ids(self, spellings: Sequence[str]) -> list[int] | None:
        """The ids of these tokens, or None unless the vocabulary has each as a single token."""
        vocab = self.loaded.tokenizer.get_vocab()
        if not all(spelling in vocab for spelling in spellings):
            return None
        return [vocab[spelling] for spelling in spellings]

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        """Queue the request and yield its events until the final one: with
        n > 1 choices, the events of all choices interleaved (TokenEvent.index)
        until each has had its final event, or one ends otherwise than by
        STOP or LENGTH (cancelled, failed: the others are aborted).

        Raises EngineOverloaded / EngineStopped at once if it cannot be queued.
        Leaving the iteration early (the consumer was cancelled or closed it)
        aborts the request, which frees its slot before the next engine step.

        Backpressure: at most max_buffered_tokens events wait for the consumer.
        One that falls further behind (its transport is blocked on a client
        that does not read; n choices may buffer n times as much) has the request aborted; the events buffered so
        far stay readable, then the final event says SLOW_CONSUMER."""
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        overflowed = False
        buffer_limit = self.config.max_buffered_tokens * request.sampling.n

        def emit(event: TokenEvent) -> None:
            nonlocal overflowed
            if event.finished:
                if overflowed and event.finish_reason is not FinishReason.ERROR:
                    event = dataclasses.replace(event, finish_reason=FinishReason.SLOW_CONSUMER)
                queue.put_nowait(event)
            elif overflowed:
                pass  # generated before the abort took effect; the answer is cut here anyway
            elif queue.qsize() >= buffer_limit:
                overflowed = True
                self.abort(request.request_id)  # the usual abort path: the slot is freed before the next step
            else:
                queue.put_nowait(event)

        self._scheduler.submit(request, emit)
        finished = False
        choices_left = request.sampling.n
        try:
            while True:
                event = await queue.get()
                if event.finished:
                    choices_left -= 1
                    ended = event.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
                    finished = choices_left == 0 or not ended
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._scheduler.abort(request_id)

    def stats(self) -> EngineStats:
        return self._scheduler.stats()

    @property
    def vocab_size(self) -> int:
        """Token ids are 0..vocab_size-1 (the width of the logits)."""
        return typing.cast(int, self.loaded.model.config.vocab_size)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of text one token stands for (for logprobs)."""
        return token_bytes(self.loaded.tokenizer, token_id)

    async def warmup(self, sampling: SamplingParams) -> None:
        """One short generation with `sampling` (the server's defaults: the
        code paths real requests take), so the first real request does not
        pay for lazy initialisation (allocator, kernels, tokenizer caches)."""
        prompt = tuple(self.encode_chat([{"role": "user", "content": "Hello"}]))
        async for _ in self.generate(GenerationRequest("warmup", prompt, sampling)):
            pass

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._scheduler.stop)
