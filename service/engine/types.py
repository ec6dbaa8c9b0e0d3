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


class EngineObserver(Protocol):
    """Optional hook the compute thread calls once per engine step. Keep it
    cheap and non-blocking: it runs between forward passes."""

    def decode_step(self, batch_size: int) -> None:
        """One decode forward pass ran for `batch_size` requests."""
