"""Engine-facing types. Nothing here knows about gRPC, HTTP or torch."""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .grammar import Grammar


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached or the context window is full
    CANCELLED = "cancelled"  # aborted (client cancel, deadline, shutdown)
    ERROR = "error"  # the engine failed this request
    # Ended because its consumer fell max_buffered_tokens behind (a client
    # not reading its stream): the slot is freed instead of generating
    # max_tokens into a buffer nobody drains.
    SLOW_CONSUMER = "slow_consumer"


class ConstraintKind(str, enum.Enum):
    JSON_SCHEMA = "json_schema"  # a JSON Schema as JSON text
    LARK = "lark"  # a Lark grammar (llguidance's dialect; may embed JSON Schemas)


@dataclasses.dataclass(frozen=True)
class OutputConstraint:
    """The answer must match this grammar (constrained decoding)."""

    kind: ConstraintKind
    source: str


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Fully resolved sampling settings (server defaults already applied)."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    # time.monotonic() after which the request is aborted; None = no deadline.
    deadline: float | None = None
    # Constrained decoding: from Engine.compile_grammar (compiled off the
    # compute thread); None = unconstrained.
    grammar: Grammar | None = None


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # of prompt_tokens, taken from the prefix cache instead of computed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    """time.monotonic() stamps of one request's life inside the engine, carried
    by its final event so that callers can derive queue, prefill and decode
    time without the engine knowing about metrics or tracing."""

    submitted: float  # accepted into the waiting queue
    admitted: float | None  # given a KV-cache slot (None: ended while waiting)
    first_token: float | None  # first token sampled, i.e. prefill done (None: no token)
    finished: float  # final event created


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token's worth of output (the final event may carry no
    token). `text` may be empty: a token can end inside a multi-byte character,
    or its text is held back because it may start a stop string. The last event
    has `finish_reason` and `usage` set."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None  # set when finish_reason is ERROR
    timing: RequestTiming | None = None  # set on the final event

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineOverloaded(Exception):
    """Running and waiting requests are at their configured limits."""

    def __init__(self, running: int, waiting: int) -> None:
        super().__init__(f"server is at capacity ({running} running, {waiting} waiting); retry later")
        self.running = running
        self.waiting = waiting


class EngineStopped(Exception):
    """The engine no longer accepts requests (shutting down)."""


@dataclasses.dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_used_tokens: int
    kv_cache_capacity_tokens: int
    generated_tokens_total: int
    prompt_tokens_total: int = 0  # of admitted requests
    prefix_cache_hit_tokens_total: int = 0  # of those, taken from the prefix cache
    prefix_cache_blocks_used: int = 0
    prefix_cache_blocks_capacity: int = 0
    prefix_cache_evictions_total: int = 0
    draft_tokens_total: int = 0  # speculative draft tokens verified
    accepted_draft_tokens_total: int = 0  # of those, kept (each one a token gained without its own pass)
    # time.monotonic() when the compute thread last woke up for work or
    # finished a step: the liveness check's sign of progress.
    last_progress: float = 0.0

    def stalled_seconds(self, now: float) -> float:
        """How long requests have been queued or running without the compute
        thread making progress (0 when idle): a wedged engine thread grows it."""
        if not (self.running or self.waiting):
            return 0.0
        return max(0.0, now - self.last_progress)


class EngineObserver(Protocol):
    """Optional hooks the compute thread calls between forward passes. Keep
    them cheap and non-blocking."""

    def decode_step(self, batch_size: int) -> None:
        """One decode forward pass ran for `batch_size` requests."""

    def prefix_reused(self, tokens: int) -> None:
        """A prompt's first `tokens` positions came from the prefix cache."""

    def prefix_blocks_evicted(self, count: int) -> None:
        """The prefix cache evicted `count` blocks to store new ones."""

    def draft_tokens(self, count: int) -> None:
        """A request's pass verified `count` speculative draft tokens."""

    def accepted_draft_tokens(self, count: int) -> None:
        """`count` of a request's draft tokens were accepted."""
